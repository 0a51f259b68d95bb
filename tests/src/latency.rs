//! Latency between regions, in userspace (the kernel here has no netem): a TCP proxy on
//! 127.0.0.1 that holds every chunk of bytes, in each direction, for a one-way delay before it
//! passes it on, keeping order and pipelining (a delay does not cut throughput to one chunk per
//! round trip). The delay can change while connections are open; it applies to bytes read after
//! the change. It runs on a runtime thread of its own, so blocking test code cannot stall it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Chunks in flight per direction of one connection, at most.
const IN_FLIGHT: usize = 1024;

pub struct LatencyProxy {
    addr: SocketAddr,
    delay_us: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LatencyProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `target` with `one_way` delay.
    pub fn start(target: &str, one_way: Duration) -> Result<Self> {
        let target: SocketAddr = target.parse().with_context(|| format!("proxy target {target}"))?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let delay_us = Arc::new(AtomicU64::new(one_way.as_micros() as u64));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let delay = delay_us.clone();
        let thread = std::thread::Builder::new().name("latency-proxy".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("listener");
                tokio::select! {
                    _ = stopped => {}
                    _ = accept_loop(listener, target, delay) => {}
                }
            });
        })?;
        Ok(Self { addr, delay_us, stop: Some(stop), thread: Some(thread) })
    }

    /// `127.0.0.1:port` to dial instead of the target.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Changes the one-way delay (for bytes read from now on).
    pub fn set_delay(&self, one_way: Duration) {
        self.delay_us.store(one_way.as_micros() as u64, Ordering::Relaxed);
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, delay: Arc<AtomicU64>) {
    while let Ok((client, _)) = listener.accept().await {
        let delay = delay.clone();
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(target).await else { return };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            tokio::join!(pump(cr, uw, delay.clone()), pump(ur, cw, delay));
        });
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due = Instant::now() + Duration::from_micros(delay.load(Ordering::Relaxed));
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
