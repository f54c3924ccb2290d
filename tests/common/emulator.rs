//! Emulator processes owned by a test binary.
//!
//! Each is started once per test binary on a free loopback port, through
//! `scripts/run-tied.py`, so it dies when the test process exits.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Emulator {
    pub name: &'static str,
    pub port: u16,
    _child: Mutex<Child>,
}

impl Emulator {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where the emulator's stdout and stderr go.
    pub fn log_path(&self) -> std::path::PathBuf {
        log_path(self.name, self.port)
    }

    /// The emulator's own process ID (the child of the `run-tied.py` wrapper),
    /// for tests that freeze or kill it.
    pub fn server_pid(&self) -> u32 {
        let wrapper = self._child.lock().unwrap().id();
        let children = std::fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the {} emulator's wrapper {wrapper} has no child", self.name))
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn log_path(name: &str, port: u16) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("dlq-bridge-test-{name}-{port}.log"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Start `command` (with `{port}` replaced) and wait until `GET ready_path`
/// answers. Panics with the emulator's name and log when it cannot start: a
/// missing emulator fails the suite.
pub fn spawn(name: &'static str, command: &[&str], env: &[(&str, &str)], ready_path: &str) -> Emulator {
    let port = free_port();
    let port_text = port.to_string();
    let log = log_path(name, port);
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("scripts/run-tied.py"));
    for (k, v) in env {
        cmd.arg("--env").arg(format!("{k}={}", v.replace("{port}", &port_text)));
    }
    cmd.arg("--");
    cmd.args(command.iter().map(|a| a.replace("{port}", &port_text)));
    let log_file = std::fs::File::create(&log).expect("emulator log file");
    let child = cmd
        .stdin(Stdio::piped())
        .stdout(log_file.try_clone().expect("log handle"))
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the {name} emulator: {e}"));
    let child = Mutex::new(child);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if http_status(port, ready_path).is_some_and(|s| s < 500) {
            break;
        }
        if let Ok(Some(status)) = child.lock().unwrap().try_wait() {
            panic!(
                "the {name} emulator exited during start-up ({status}); log {}:\n{}",
                log.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "the {name} emulator was not ready on port {port} after 90 s; log {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Emulator {
        name,
        port,
        _child: child,
    }
}

/// The status code of a plain `GET`, or None when nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
