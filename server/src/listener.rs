//! Listening sockets for the client, peer and metrics URLs (etcd's `pkg/transport`
//! listeners): TCP for http:// and https:// URLs, unix sockets for unix:// and unixs://.
//! etcd names a unix socket by the URL's host and port (`unix://etcd.unix:1` is the file
//! `etcd.unix:1` in the working directory; URLs have no path) and removes a stale socket file
//! before binding, and so does oxcd.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where a listener listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The socket file a unix:// or unixs:// URL names: host and port (and a path, which etcd's
/// URL check has refused before).
pub fn unix_socket_path(url: &url::Url) -> PathBuf {
    let mut s = url.host_str().unwrap_or_default().to_string();
    if let Some(port) = url.port() {
        s.push_str(&format!(":{port}"));
    }
    s.push_str(url.path());
    PathBuf::from(s)
}

/// A bound listener.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        let listener = match addr {
            ListenAddr::Tcp(a) => Listener::Tcp(tokio::net::TcpListener::bind(a).await?),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                Listener::Unix(tokio::net::UnixListener::bind(path)?)
            }
        };
        let fd = match &listener {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        };
        widen_backlog(fd)?;
        Ok(listener)
    }

    /// The next connection; TCP ones with Nagle off (Raft and gRPC messages are small).
    pub async fn accept(&self) -> std::io::Result<Socket> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Socket::Tcp(s))
            }
            Listener::Unix(l) => Ok(Socket::Unix(l.accept().await?.0)),
        }
    }
}

/// The accept queue etcd's listeners get (Go's net package): the kernel's
/// `net.core.somaxconn`. Rust's std and tokio listen with 128: a burst of connections (a
/// thousand clients starting at once) overflows that queue, the kernel drops the SYNs, and
/// clients wait for their 1 s, 3 s, ... retransmissions.
pub fn backlog() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<i32>().ok())
        .filter(|&n| n > 0)
        .map_or(4096, |n| n.min(65535))
}

/// Raises the soft limit on open files to the hard one, as every Go program does at start
/// (Go 1.19+): etcd takes as many connections as the hard limit allows, and so must oxcd, its
/// tools and its load generator.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Sets a listening socket's queue to [`backlog`] (Linux takes a second `listen` on a
/// listening socket as a new backlog).
pub fn widen_backlog(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: `fd` is a listening socket owned by the caller for the duration of the call.
    if unsafe { libc::listen(fd, backlog()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A socket file left by an earlier run would make the bind fail; anything else at that path
/// is not ours to remove.
fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        _ => Ok(()),
    }
}

/// An accepted connection.
pub enum Socket {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Socket {
    /// Reads the first bytes without consuming them (how a listener that serves several
    /// protocols tells them apart).
    pub async fn peek(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.peek(buf).await,
            Socket::Unix(s) => {
                s.async_io(tokio::io::Interest::READABLE, || {
                    // SAFETY: recv writes at most buf.len() bytes into buf, a valid
                    // exclusive buffer, on a descriptor the stream owns.
                    let n = unsafe {
                        libc::recv(
                            s.as_raw_fd(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            libc::MSG_PEEK,
                        )
                    };
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                })
                .await
            }
        }
    }

    /// The remote TCP address; None for a unix socket.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        match self {
            Socket::Tcp(s) => s.peer_addr().ok(),
            Socket::Unix(_) => None,
        }
    }

    pub fn connect_info(&self) -> tonic::transport::server::TcpConnectInfo {
        match self {
            Socket::Tcp(s) => tonic::transport::server::Connected::connect_info(s),
            Socket::Unix(_) => tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Socket::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Socket::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Socket::Tcp(s) => s.is_write_vectored(),
            Socket::Unix(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn socket_paths_join_host_port_and_path_as_etcd_does() {
        let p = |u: &str| unix_socket_path(&url::Url::parse(u).unwrap());
        assert_eq!(p("unix://etcd.unix:1"), PathBuf::from("etcd.unix:1"));
        assert_eq!(p("unixs://localhost:2379"), PathBuf::from("localhost:2379"));
    }

    /// More connections than std's queue of 128, none accepted: each completes its handshake
    /// in the kernel's queue. (Past a full queue the kernel drops the SYN, and the connect
    /// waits a whole second for its retransmission.)
    #[tokio::test]
    async fn connections_queue_up_to_the_kernels_backlog() {
        assert!(backlog() >= 128);
        let l = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let Listener::Tcp(tcp) = &l else {
            unreachable!()
        };
        let addr = tcp.local_addr().unwrap();
        let mut conns = Vec::new();
        for i in 0..backlog().min(1000) {
            let c = tokio::time::timeout(
                std::time::Duration::from_millis(900),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            .unwrap_or_else(|_| panic!("connection {i} waits: the accept queue is full"))
            .unwrap();
            conns.push(c);
        }
    }

    #[tokio::test]
    async fn a_unix_listener_replaces_a_stale_socket_and_peeks_without_consuming() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s:1");
        let addr = ListenAddr::Unix(path.clone());
        drop(Listener::bind(&addr).await.unwrap());
        assert!(path.exists(), "the first listener left its socket file");
        let l = Listener::bind(&addr).await.unwrap();
        let mut c = tokio::net::UnixStream::connect(&path).await.unwrap();
        c.write_all(b"PRI * HTTP/2.0").await.unwrap();
        let mut s = l.accept().await.unwrap();
        let mut first = [0u8; 4];
        assert_eq!(s.peek(&mut first).await.unwrap(), 4);
        assert_eq!(&first, b"PRI ");
        let mut all = [0u8; 14];
        s.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"PRI * HTTP/2.0");
        assert!(s.peer_addr().is_none());
        // Not a socket: left alone, and the bind fails.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(Listener::bind(&ListenAddr::Unix(file.clone()))
            .await
            .is_err());
        assert!(file.exists());
    }
}
