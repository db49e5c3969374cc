//! What a process's listeners admit and keep: at most so many connections per client address
//! (trusted proxies, which carry many clients, excepted) and in all — a connection over either
//! bound is closed as it is accepted — and each connection closed after a while without a byte
//! either way. However many idle sockets a stranger opens, the process never runs out of file
//! descriptors, and a fresh client is served.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The bounds of a process's connections.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most connections one client address holds at once.
    pub per_address: usize,
    /// Most connections the process holds at once, all listeners together.
    pub total: usize,
    /// A connection with no byte read or written for this long is closed.
    pub idle: Duration,
    /// Proxies, which carry many clients: exempt from `per_address`.
    pub proxies: keel_guard::TrustedProxies,
}

/// Counts the connections a process holds, by client address.
pub struct Admission {
    limits: Limits,
    held: Mutex<Held>,
    refused: Option<prometheus::IntCounter>,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("per_address", &self.limits.per_address)
            .field("total", &self.limits.total)
            .field("idle", &self.limits.idle)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// Admission under `limits`, counting refusals in `refused`.
    pub fn new(limits: Limits, refused: Option<prometheus::IntCounter>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            held: Mutex::default(),
            refused,
        })
    }

    /// Admission that admits everything and closes nothing for a day: for tests and tools.
    pub fn unlimited() -> Arc<Self> {
        Self::new(
            Limits {
                per_address: usize::MAX,
                total: usize::MAX,
                idle: Duration::from_secs(24 * 60 * 60),
                proxies: keel_guard::TrustedProxies::default(),
            },
            None,
        )
    }

    /// `io`, from `peer`, kept while it is in use; `None` (drop it: the socket closes) when the
    /// peer or the process holds as many connections as it may.
    pub fn admit<T>(self: &Arc<Self>, io: T, peer: SocketAddr) -> Option<Kept<T>> {
        let ip = peer.ip();
        {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let of_peer = held.by_address.get(&ip).copied().unwrap_or(0);
            let crowded = of_peer >= self.limits.per_address && !self.limits.proxies.contains(ip);
            if held.total >= self.limits.total || crowded {
                drop(held);
                if let Some(refused) = &self.refused {
                    refused.inc();
                }
                tracing::debug!(%peer, "connection refused: too many open");
                return None;
            }
            held.total += 1;
            *held.by_address.entry(ip).or_default() += 1;
        }
        Some(Kept {
            io,
            idle: self.limits.idle,
            deadline: Box::pin(tokio::time::sleep(self.limits.idle)),
            _slot: Slot {
                admission: self.clone(),
                ip,
            },
        })
    }
}

/// A connection's place in its admission, given back when the connection is dropped.
struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self
            .admission
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        held.total = held.total.saturating_sub(1);
        if let Some(count) = held.by_address.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                held.by_address.remove(&self.ip);
            }
        }
    }
}

/// A connection that ends (a read fails with `TimedOut`) after its idle time without a byte
/// either way.
pub struct Kept<T> {
    io: T,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _slot: Slot,
}

impl<T> Kept<T> {
    /// The connection itself.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    fn active(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Kept<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.active();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Kept<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Kept<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// An axum listener whose connections go through `admission`.
pub struct AdmittedListener<L> {
    inner: L,
    admission: Arc<Admission>,
}

impl<L> AdmittedListener<L> {
    /// `inner`'s connections, as `admission` admits them.
    pub fn new(inner: L, admission: Arc<Admission>) -> Self {
        Self { inner, admission }
    }
}

impl<L> axum::serve::Listener for AdmittedListener<L>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    type Io = Kept<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, peer) = self.inner.accept().await;
            if let Some(kept) = self.admission.admit(io, peer) {
                return (kept, peer);
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The process's limit on open files (`RLIMIT_NOFILE`, as `/proc/self/limits` shows it), if
/// it can be read.
pub fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_address: usize, total: usize) -> Limits {
        Limits {
            per_address,
            total,
            idle: Duration::from_secs(60),
            proxies: keel_guard::TrustedProxies::new(["10.0.0.1/32".parse().unwrap()]),
        }
    }

    #[tokio::test]
    async fn an_address_holds_so_many_and_the_process_so_many_and_freed_places_come_back() {
        let admission = Admission::new(limits(2, 3), None);
        let from = |last: u8| SocketAddr::from(([127, 0, 0, last], 1000));
        let a1 = admission.admit((), from(1)).unwrap();
        let _a2 = admission.admit((), from(1)).unwrap();
        assert!(
            admission.admit((), from(1)).is_none(),
            "the address is full"
        );
        let _b1 = admission.admit((), from(2)).unwrap();
        assert!(
            admission.admit((), from(3)).is_none(),
            "the process is full"
        );
        drop(a1);
        assert!(admission.admit((), from(3)).is_some(), "a freed place");
    }

    #[tokio::test]
    async fn a_proxy_is_not_held_to_one_address_share() {
        let admission = Admission::new(limits(1, 10), None);
        let proxy = SocketAddr::from(([10, 0, 0, 1], 1000));
        let held: Vec<_> = (0..5)
            .map(|_| admission.admit((), proxy).unwrap())
            .collect();
        assert_eq!(held.len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_byte_either_way_ends_after_its_idle_time() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let admission = Admission::new(limits(10, 10), None);
        let (server, mut client) = tokio::io::duplex(64);
        let peer = SocketAddr::from(([127, 0, 0, 1], 1000));
        let mut kept = admission.admit(server, peer).unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        kept.read_exact(&mut buf).await.unwrap();
        // A byte moved 59 s in: the minute starts again from there.
        tokio::time::advance(Duration::from_secs(59)).await;
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            kept.read(&mut buf).await
        });
        tokio::time::advance(Duration::from_secs(2)).await;
        let ended = reading.await.unwrap().unwrap_err();
        assert_eq!(ended.kind(), io::ErrorKind::TimedOut);
    }
}
