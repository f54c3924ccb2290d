//! A `dlq-bridge serve` process under test, and an HTTP receiver that
//! captures what its alert sinks send.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::routing::post;
use serde_json::Value;

pub const TOKEN: &str = "s3cret-token";

/// Captures every POST it receives, by path.
#[derive(Clone, Default)]
pub struct Receiver {
    pub got: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Receiver {
    pub async fn start() -> (Self, String) {
        let r = Receiver::default();
        let app = axum::Router::new()
            .route(
                "/{*path}",
                post(
                    |State(r): State<Receiver>, Path(path): Path<String>, Json(v): Json<Value>| async move {
                        r.got.lock().unwrap().push((path, v));
                        "ok"
                    },
                ),
            )
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, format!("http://{addr}"))
    }

    pub fn webhook(&self) -> Vec<Value> {
        self.on("webhook")
    }

    pub fn on(&self, path: &str) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.starts_with(path))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

pub struct Serve {
    pub child: Child,
    /// Every line serve has written to stderr so far (its log).
    pub log: Arc<Mutex<Vec<String>>>,
    pub url: String,
    pub http: reqwest::Client,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    pub async fn start(config: &str) -> Self {
        Self::start_with_env(config, &[]).await
    }

    /// Start `dlq-bridge serve` with `config` (`{listen}` becomes `127.0.0.1:0`)
    /// and wait until it is ready. The kernel picks the port at bind time and
    /// serve prints it: a probed-then-released port can be taken in between by
    /// any outgoing connection's ephemeral port.
    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        let s = Self::start_until_ready(config, env).await;
        // Ready needs one queue polled per backend; the tests read every queue.
        s.wait_for(Duration::from_secs(30), || async { s.all_polled().await })
            .await;
        s
    }

    fn spawn(config: &str, env: &[(&str, &str)]) -> Self {
        let path = std::env::temp_dir().join(format!("dlqb-serve-{}.yaml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, config.replace("{listen}", "127.0.0.1:0")).unwrap();
        let data = std::env::temp_dir().join(format!("dlqb-serve-data-{}", uuid::Uuid::new_v4().simple()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_dlq-bridge"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("DLQ_BRIDGE_TEST_TOKEN", TOKEN)
            .env("XDG_STATE_HOME", data)
            .env("DLQ_BRIDGE_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dlq-bridge serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let addr = bound_address(child.stderr.take().expect("piped stderr"), log.clone());
        Serve {
            child,
            log,
            url: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    /// Start `dlq-bridge serve` and wait only until `/readyz` says ready.
    pub async fn start_until_ready(config: &str, env: &[(&str, &str)]) -> Self {
        let s = Self::spawn(config, env);
        s.wait_for(Duration::from_secs(30), || async { s.get("/readyz").await.0 == 200 })
            .await;
        s
    }

    /// Send SIGTERM and wait (up to 30 s) for serve to exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = i32::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) only sends a signal to the child we started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM sent");
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "exits after SIGTERM");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether `/v1/queues` shows every queue polled.
    pub async fn all_polled(&self) -> bool {
        let (code, body) = self.get("/v1/queues").await;
        code == 200
            && serde_json::from_str::<Vec<Value>>(&body).is_ok_and(|qs| qs.iter().all(|q| !q["polled_at"].is_null()))
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        match self.http.get(format!("{}{path}", self.url)).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    /// A GET with the bearer token (runs, messages).
    pub async fn get_auth(&self, path: &str) -> (u16, String) {
        match self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
            .send()
            .await
        {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    /// Wait until run `id` is no longer running and return its view.
    pub async fn wait_run(&self, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let (_, text) = self.get_auth(&format!("/v1/runs/{id}")).await;
            let view: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if view["status"] != "running" {
                return view;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "run {id} did not finish: {view}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A GET with an `Accept` header: status, content type and body.
    pub async fn get_accepting(&self, path: &str, accept: &str) -> (u16, String, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        let content_type = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (r.status().as_u16(), content_type, r.text().await.unwrap_or_default())
    }

    pub async fn post(&self, path: &str, body: Value, token: Option<&str>) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.url)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn wait_for<F, Fut>(&self, limit: Duration, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while !f().await {
            assert!(start.elapsed() < limit, "condition not met within {limit:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Start an API redrive and wait until it finished.
    pub async fn redrive(&self, queue: &str, body: Value) -> Value {
        let (code, started) = self
            .post(&format!("/v1/queues/{queue}/redrive"), body, Some(TOKEN))
            .await;
        assert_eq!(code, 202, "{started}");
        let id = started["run_id"].as_str().unwrap().to_string();
        self.wait_run(&id).await
    }
}

/// Forward serve's stderr to the test's (so failures show its log) and to
/// `log`, and return the address from its "listening on http://ADDR" line.
fn bound_address(stderr: ChildStderr, log: Arc<Mutex<Vec<String>>>) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            log.lock().unwrap().push(line.clone());
            if let Some(addr) = line.split("listening on http://").nth(1)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("dlq-bridge serve exited or did not say where it listens within 30 s")
}
