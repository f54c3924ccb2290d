//! Asking before a destructive command.

use std::io::{IsTerminal, Write};

use super::exit::{Failure, usage};

/// Ask before a destructive command, or require --yes off a terminal.
pub(crate) fn confirm(yes: bool, question: &str) -> Result<bool, Failure> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Err(usage(
            "this command changes queues: pass --yes to confirm when not run from a terminal (or use --dry-run)",
        ));
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    let ok = matches!(answer.trim(), "y" | "Y" | "yes");
    if !ok {
        note!("aborted; nothing was touched");
    }
    Ok(ok)
}
