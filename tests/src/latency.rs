//! A [`meridian_wire::delay`] proxy for tests, on a runtime thread of its own, so blocking test
//! code cannot stall it: latency between regions without netem.

use std::time::Duration;

use anyhow::{Context, Result};
use meridian_wire::delay::{self, Delay};

pub struct LatencyProxy {
    addr: std::net::SocketAddr,
    delay: Delay,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LatencyProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `target` with `one_way` delay.
    pub fn start(target: &str, one_way: Duration) -> Result<Self> {
        let target: std::net::SocketAddr = target.parse().with_context(|| format!("proxy target {target}"))?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let delay = Delay::new(one_way);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let d = delay.clone();
        let thread = std::thread::Builder::new().name("latency-proxy".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                tokio::select! {
                    _ = stopped => {}
                    _ = delay::run(listener, target, d) => {}
                }
            });
        })?;
        Ok(Self { addr, delay, stop: Some(stop), thread: Some(thread) })
    }

    /// `127.0.0.1:port` to dial instead of the target.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Changes the one-way delay (for bytes read from now on).
    pub fn set_delay(&self, one_way: Duration) {
        self.delay.set(one_way);
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
