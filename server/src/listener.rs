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
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(a).await?)),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                Ok(Listener::Unix(tokio::net::UnixListener::bind(path)?))
            }
        }
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
