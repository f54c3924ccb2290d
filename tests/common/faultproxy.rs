//! A tiny fault-injecting TCP proxy, put between dlq-bridge and an emulator.
//!
//! It forwards every connection to one upstream address, and the fault it
//! plays can be switched at any time:
//!
//! - [`Fault::Pass`]: forward as is;
//! - [`Fault::Delay`]: hold every chunk for a while before forwarding it;
//! - [`Fault::Drop`]: a black hole: new connections are accepted but never
//!   connected upstream, and live ones stop forwarding (data is held, not
//!   lost, until the fault changes);
//! - [`Fault::Refuse`]: every live connection is reset (RST) and the port is
//!   closed, so new connections are refused: a dead endpoint, as a client
//!   sees a killed server;
//! - [`Fault::CutAfter`]: each connection is reset after it has forwarded
//!   that many more bytes (counted from when the fault was set).
//!
//! [`FaultProxy::cut`] resets every live connection once, whatever the fault.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Delay(Duration),
    Drop,
    Refuse,
    CutAfter(u64),
}

#[derive(Debug, Clone, Copy)]
struct State {
    fault: Fault,
    /// Bumped on every change, so a connection knows when a `CutAfter` starts.
    epoch: u64,
    /// Bumped by [`FaultProxy::cut`].
    cuts: u64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    state: watch::Sender<State>,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Live connections notice and reset themselves.
        self.state.send_modify(|s| {
            s.fault = Fault::Refuse;
            s.cuts += 1;
        });
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // The port is closed and reopened by `Refuse`, with connections of the
    // last opening possibly still in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl FaultProxy {
    /// Listen on `listen_on` (port 0 picks one) and forward to `upstream`.
    pub async fn start(listen_on: SocketAddr, upstream: SocketAddr) -> Self {
        let listener = listen(listen_on).unwrap_or_else(|e| panic!("fault proxy cannot listen on {listen_on}: {e}"));
        let addr = listener.local_addr().expect("bound address");
        let (state, rx) = watch::channel(State {
            fault: Fault::Pass,
            epoch: 0,
            cuts: 0,
        });
        let task = tokio::spawn(accept_loop(listener, addr, upstream, rx));
        FaultProxy { addr, state, task }
    }

    pub fn set(&self, fault: Fault) {
        self.state.send_modify(|s| {
            s.fault = fault;
            s.epoch += 1;
        });
    }

    pub fn fault(&self) -> Fault {
        self.state.borrow().fault
    }

    /// Reset every live connection now.
    pub fn cut(&self) {
        self.state.send_modify(|s| s.cuts += 1);
    }
}

async fn accept_loop(listener: TcpListener, addr: SocketAddr, upstream: SocketAddr, mut rx: watch::Receiver<State>) {
    let mut listener = Some(listener);
    loop {
        let refusing = rx.borrow_and_update().fault == Fault::Refuse;
        if refusing {
            listener = None;
        } else if listener.is_none() {
            match listen(addr) {
                Ok(l) => listener = Some(l),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(l) = &listener else {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            accepted = l.accept() => {
                if let Ok((client, _)) = accepted {
                    tokio::spawn(connection(client, upstream, rx.clone()));
                }
            }
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// Reset a socket instead of closing it cleanly. (A zero linger never blocks
/// on drop, which is what the deprecation is about.)
#[allow(deprecated)]
fn reset(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

async fn connection(mut client: TcpStream, upstream: SocketAddr, mut rx: watch::Receiver<State>) {
    let cuts = rx.borrow().cuts;
    // A black hole holds new connections without connecting them upstream.
    loop {
        let s = *rx.borrow_and_update();
        match s.fault {
            Fault::Drop if s.cuts == cuts => {
                if rx.changed().await.is_err() {
                    return;
                }
            }
            Fault::Refuse => return reset(&client),
            _ if s.cuts != cuts => return reset(&client),
            _ => break,
        }
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return reset(&client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let budget = Arc::new(Mutex::new(Budget::default()));
    let cut = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        tokio::select! {
            c = pump(cr, sw, rx.clone(), budget.clone()) => c,
            c = pump(sr, cw, rx.clone(), budget.clone()) => c,
            () = cut_signal(&mut rx, cuts) => true,
        }
    };
    if cut {
        reset(&client);
        reset(&server);
    }
}

/// Bytes a connection may still forward under `CutAfter`.
#[derive(Default)]
struct Budget {
    epoch: Option<u64>,
    left: u64,
}

/// Resolves when the connection must be reset: a `cut`, or `Refuse`.
async fn cut_signal(rx: &mut watch::Receiver<State>, cuts: u64) {
    loop {
        {
            let s = rx.borrow_and_update();
            if s.cuts != cuts || s.fault == Fault::Refuse {
                return;
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Forward one direction; returns true when the connection must be reset.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    mut rx: watch::Receiver<State>,
    budget: Arc<Mutex<Budget>>,
) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return false;
            }
            Ok(n) => n,
        };
        loop {
            let s = *rx.borrow_and_update();
            match s.fault {
                Fault::Pass => break,
                Fault::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                // Held until the fault changes; `cut_signal` resets on Refuse.
                Fault::Drop => {
                    if rx.changed().await.is_err() {
                        return true;
                    }
                }
                Fault::Refuse => return true,
                Fault::CutAfter(limit) => {
                    let mut b = budget.lock().unwrap();
                    if b.epoch != Some(s.epoch) {
                        b.epoch = Some(s.epoch);
                        b.left = limit;
                    }
                    if (n as u64) > b.left {
                        return true;
                    }
                    b.left -= n as u64;
                    break;
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return true;
        }
    }
}
