//! `check`: the config parses, every filter compiles, what `serve` reads
//! from the environment is there, and (unless `--offline`) every queue
//! answers.

use std::path::Path;

use anyhow::Context as _;

use super::exit::{self, Failure};
use crate::engine::registry::{Registry, configured_source};
use crate::output::human_age;

pub(crate) async fn check(registry: &Registry, path: &Path, offline: bool) -> Result<u8, Failure> {
    let n = registry.config().queues.len();
    outln!(
        "config {}: ok ({n} {})",
        path.display(),
        if n == 1 { "queue" } else { "queues" }
    )?;
    if registry.config().queues.is_empty() {
        note!(
            "warning: {}: no queue is configured; every command but check, serve and runs needs one",
            path.display()
        );
    }
    // The worst outcome: a config problem (exit 2) outranks a failure (exit 1).
    let mut code = exit::OK;
    // What `serve` would refuse to start without, read from the environment.
    let problems = registry.config().serve_env_problems(|var| std::env::var(var).ok());
    for (field, message) in &problems {
        note!("error: {field}: {message}; serve would not start");
    }
    if !problems.is_empty() {
        outln!("serve settings: FAILED")?;
        code = exit::USAGE;
    }
    if offline {
        if n > 0 {
            outln!("queues: not contacted (--offline)")?;
        }
        return Ok(code);
    }
    for q in &registry.config().queues {
        let result = async {
            // Connect errors name the queue already; the backend's own do not.
            let b = registry.backend(&q.name).await?;
            // First, so that a failure is told once, as an error (`stats`
            // would go on without, with a warning).
            b.check_optional_reads()
                .await
                .with_context(|| format!("queue {}", q.name))?;
            let stats = b.stats().await.with_context(|| format!("queue {}", q.name))?;
            // Where copies go without `--to`: a redrive resolves it first,
            // and one that is not there fails every redrive of the queue.
            configured_source(q, &*b).await?;
            anyhow::Ok(stats)
        }
        .await;
        match result {
            Ok(s) => {
                let age = match s.oldest_age {
                    Some(_) => format!(", oldest {} ({})", human_age(s.oldest_age), s.age_exactness()),
                    None => String::new(),
                };
                outln!(
                    "queue {} ({}): ok, depth {}{age}",
                    q.name,
                    q.kind.backend_name(),
                    s.depth
                )?
            }
            Err(e) => {
                code = code.max(exit::code_of(&e));
                // The verdict on stdout with the others, the error (which
                // names the queue) on stderr, as every command reports errors.
                outln!("queue {} ({}): FAILED", q.name, q.kind.backend_name())?;
                note!("error: {e:#}");
            }
        }
    }
    Ok(code)
}
