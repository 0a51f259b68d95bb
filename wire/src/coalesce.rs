//! Writes gathered into fewer syscalls.
//!
//! HTTP/2 in hyper flushes its connection each time it runs out of frames
//! to send: a unary response (HEADERS, DATA, then trailers from another
//! task) often leaves in two `writev`s, and a busy connection pays one
//! syscall, and one loopback round of the kernel's TCP stack, per frame
//! batch. [`Coalesce`] holds written bytes and, on the first flush after
//! new bytes, yields once: every task that became ready meanwhile (other
//! streams' answers, requests for the same connection) runs and queues its
//! frames first, and the next flush sends them all in one write. An idle
//! connection pays one extra poll of its task, not a timer.
//!
//! Memory is bounded: past [`LIMIT`] held bytes a write first drains them,
//! and a write that large on its own goes straight through.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes held before they are written.
pub const LIMIT: usize = 64 * 1024;

pub struct Coalesce<S> {
    inner: S,
    held: Vec<u8>,
    /// How much of `held` the socket has taken.
    sent: usize,
    /// The current flush has yielded once already.
    yielded: bool,
}

impl<S> Coalesce<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, held: Vec::new(), sent: 0, yielded: false }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes every held byte.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if this.held.len() + len > LIMIT {
            ready!(this.poll_drain(cx))?;
        }
        if len >= LIMIT {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held.len() > this.sent {
            if !this.yielded {
                // Run once more after the tasks that are ready now: what
                // they queue leaves with what is held.
                this.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_drain(cx))?;
        }
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesce<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A socket that records each write call.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_between_flushes_leave_in_one_write() {
        use tokio::io::AsyncWriteExt;
        let rec = Recorder::default();
        let mut c = Coalesce::new(rec.clone());
        c.write_all(b"HEADERS").await.unwrap();
        c.write_all(b"DATA").await.unwrap();
        c.flush().await.unwrap();
        c.write_all(b"TRAILERS").await.unwrap();
        c.flush().await.unwrap();
        c.flush().await.unwrap(); // nothing held: nothing written
        assert_eq!(*rec.0.lock().unwrap(), vec![b"HEADERSDATA".to_vec(), b"TRAILERS".to_vec()]);
    }

    #[tokio::test]
    async fn the_first_flush_yields_once_and_later_writes_join_it() {
        let rec = Recorder::default();
        let mut c = Coalesce::new(rec.clone());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(Pin::new(&mut c).poll_write(&mut cx, b"a"), Poll::Ready(Ok(1))));
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending(), "the first flush yields");
        assert!(rec.0.lock().unwrap().is_empty());
        assert!(matches!(Pin::new(&mut c).poll_write(&mut cx, b"b"), Poll::Ready(Ok(1))));
        assert!(matches!(Pin::new(&mut c).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(*rec.0.lock().unwrap(), vec![b"ab".to_vec()]);
    }

    #[tokio::test]
    async fn held_bytes_stay_under_the_limit() {
        use tokio::io::AsyncWriteExt;
        let rec = Recorder::default();
        let mut c = Coalesce::new(rec.clone());
        for _ in 0..100 {
            c.write_all(&[7u8; 1000]).await.unwrap();
            assert!(c.held.len() <= LIMIT);
        }
        c.write_all(&vec![8u8; 2 * LIMIT]).await.unwrap(); // straight through
        c.flush().await.unwrap();
        let writes = rec.0.lock().unwrap();
        let total: usize = writes.iter().map(Vec::len).sum();
        assert_eq!(total, 100 * 1000 + 2 * LIMIT);
        assert!(writes.iter().any(|w| w.len() == 2 * LIMIT));
    }
}
