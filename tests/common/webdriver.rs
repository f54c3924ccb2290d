//! A headless Chromium driven over the W3C WebDriver protocol (Debian's
//! `chromium` and `chromium-driver`), for the dashboard tests.
//!
//! WebDriver is JSON over HTTP, so the few commands the tests use are written
//! here with reqwest (already a dependency) instead of pulling a WebDriver
//! crate and its dependency tree into every test build. chromedriver runs
//! through `scripts/run-tied.py` like the emulators: it cannot outlive the test
//! binary. A missing browser or driver fails the test, it never skips.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use super::emulator::repo_root;

/// The key under which W3C WebDriver returns element references.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver under `run-tied.py`, which stops it when its stdin closes:
/// on drop, or when the test process dies whatever the way.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// Start chromedriver on a port the kernel picks (`--port=0`) and return the
/// port it reports: a probed-then-released port could be taken meanwhile.
/// (chromedriver answers HTTP/1.1 only, so the emulators' HTTP/1.0 readiness
/// probe cannot be used here.)
fn start_driver(chromedriver: &str) -> (Driver, u16) {
    let log = std::env::temp_dir().join(format!("dlqb-chromedriver-{}.log", uuid::Uuid::new_v4().simple()));
    let mut child = Command::new("python3")
        .arg(repo_root().join("scripts/run-tied.py"))
        .args(["--", chromedriver, "--port=0", &format!("--log-path={}", log.display())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {chromedriver}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(port) = line
                .split("started successfully on port ")
                .nth(1)
                .and_then(|p| p.trim().trim_end_matches('.').parse::<u16>().ok())
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(port);
            }
        }
    });
    let port = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
        panic!(
            "chromedriver did not report its port within 30 s; log {}",
            log.display()
        )
    });
    (Driver(child), port)
}

pub struct Browser {
    _driver: Driver,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Element(String);

fn tool(env: &str, default: &str) -> String {
    let path = std::env::var(env).unwrap_or_else(|_| default.to_string());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: the dashboard tests need Debian's chromium and chromium-driver \
         (scripts/test.sh installs them; or `apt-get install chromium chromium-driver`, or set {env})"
    );
    path
}

impl Browser {
    /// Start chromedriver and a fresh headless Chromium session (a new
    /// profile directory, no network services: the machine's network is closed).
    pub async fn start() -> Self {
        let chromium = tool("DLQ_BRIDGE_CHROMIUM", "/usr/bin/chromium");
        let chromedriver = tool("DLQ_BRIDGE_CHROMEDRIVER", "/usr/bin/chromedriver");
        let (driver, port) = start_driver(&chromedriver);
        let base = format!("http://127.0.0.1:{port}");
        let profile = std::env::temp_dir().join(format!("dlqb-chromium-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&profile).unwrap();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1360,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .expect("JSON from chromedriver");
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_string();
        Self {
            _driver: driver,
            base,
            session,
            http,
            _profile: profile,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if let Some(err) = v["value"].get("error") {
            panic!("WebDriver {path}: {err}: {}", v["value"]["message"]);
        }
        v["value"].clone()
    }

    async fn try_cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        match v["value"].get("error") {
            Some(err) => Err(format!("{err}: {}", v["value"]["message"])),
            None => Ok(v["value"].clone()),
        }
    }

    pub async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    pub async fn find(&self, css: &str) -> Option<Element> {
        self.try_cmd(
            reqwest::Method::POST,
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )
        .await
        .ok()
        .and_then(|v| v[ELEMENT].as_str().map(|s| Element(s.to_string())))
    }

    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(|s| Element(s.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Wait (up to 30 s) for an element matching `css`.
    pub async fn wait(&self, css: &str) -> Element {
        let start = Instant::now();
        loop {
            if let Some(e) = self.find(css).await {
                return e;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no `{css}` on the page after 30 s; page text:\n{}",
                self.page_text().await
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Wait (up to `limit`) until `f` holds of the page, re-evaluated as it changes.
    pub async fn wait_until<F, Fut>(&self, what: &str, limit: Duration, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while !f().await {
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}; page text:\n{}",
                self.page_text().await
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    pub async fn click(&self, e: &Element) {
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{}/click", e.0),
            Some(json!({})),
        )
        .await;
    }

    pub async fn clear(&self, e: &Element) {
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{}/clear", e.0),
            Some(json!({})),
        )
        .await;
    }

    /// Type into an element, key by key, as a user does.
    pub async fn type_text(&self, e: &Element, text: &str) {
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        )
        .await;
    }

    pub async fn text(&self, e: &Element) -> String {
        self.try_cmd(reqwest::Method::GET, &format!("/element/{}/text", e.0), None)
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// The text of the first element matching `css`, or "" when there is none.
    pub async fn text_of(&self, css: &str) -> String {
        match self.find(css).await {
            Some(e) => self.text(&e).await,
            None => String::new(),
        }
    }

    pub async fn attr(&self, e: &Element, name: &str) -> Option<String> {
        self.try_cmd(
            reqwest::Method::GET,
            &format!("/element/{}/attribute/{name}", e.0),
            None,
        )
        .await
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
    }

    pub async fn page_text(&self) -> String {
        self.try_cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": "return document.body ? document.body.innerText : ''", "args": []})),
        )
        .await
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
    }

    pub async fn script(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 screenshot"))
            .expect("valid base64")
    }

    pub async fn set_window(&self, width: u32, height: u32) {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// The browser console since the last call: `{level, message, source, ...}`
    /// entries (chromedriver's log endpoint, which also carries uncaught
    /// exceptions, CSP violations and failed loads).
    pub async fn console(&self) -> Vec<Value> {
        let body = json!({"type": "browser"});
        let v = match self.try_cmd(reqwest::Method::POST, "/se/log", Some(body.clone())).await {
            Ok(v) => v,
            Err(_) => self.cmd(reqwest::Method::POST, "/log", Some(body)).await,
        };
        v.as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Close the session (and Chromium) synchronously: the runtime may be
        // gone. chromedriver itself dies with its run-tied wrapper.
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    let _ = reqwest::Client::new()
                        .delete(url)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                });
            }
        })
        .join();
        let _ = std::fs::remove_dir_all(&self._profile);
    }
}
