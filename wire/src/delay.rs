//! Latency between regions, in userspace (this kernel has no netem): a TCP
//! proxy that holds every chunk of bytes, in each direction, for a one-way
//! delay before passing it on, keeping order and pipelining (a delay does
//! not cut throughput to one chunk per round trip). The delay can change
//! while connections are open; it applies to bytes read after the change.
//! `meridian delay-proxy`, the test harness and (later) the lab use it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Chunks in flight per direction of one connection, at most.
const IN_FLIGHT: usize = 1024;

/// The one-way delay of a proxy, changeable while it runs.
#[derive(Clone, Default)]
pub struct Delay(Arc<AtomicU64>);

impl Delay {
    pub fn new(one_way: Duration) -> Self {
        let d = Self::default();
        d.set(one_way);
        d
    }
    pub fn set(&self, one_way: Duration) {
        self.0.store(one_way.as_micros() as u64, Ordering::Relaxed);
    }
    pub fn get(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed))
    }
}

/// Accepts on `listener` and relays each connection to `target`, `delay`
/// each way, until the listener fails.
pub async fn run(listener: TcpListener, target: SocketAddr, delay: Delay) {
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
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Delay) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now() + delay.get(), buf[..n].to_vec())).await.is_err() {
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
