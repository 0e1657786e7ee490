//! `--grpc-keepalive-min-time`: grpc-go's keepalive enforcement policy, which etcd sets on its
//! client listeners (`MinTime` from the flag, `PermitWithoutStream: false`). A client ping is
//! a strike when it comes sooner than `MinTime` after the previous one while the connection
//! has a stream open, or sooner than two hours when it has none; data or headers sent by the
//! server since the previous ping clear the strikes. On the third strike the server sends
//! GOAWAY with ENHANCE_YOUR_CALM and `too_many_pings` (grpc-go clients then ping half as often)
//! and closes the connection.
//!
//! The h2 crate answers pings itself and has no such policy, so this wrapper watches the
//! frames on each client connection: frame headers only, in both directions (streams opened
//! by the client, ended by either side, pings), and writes the GOAWAY between two of the
//! server's frames.

use super::h2::{
    FrameHeader, ACK, DATA, END_STREAM, FRAME_HEADER, GOAWAY, HEADERS, PING, PREFACE, RST_STREAM,
};
use std::collections::HashSet;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const ENHANCE_YOUR_CALM: u32 = 0xb;
/// grpc-go's `maxPingStrikes`.
const MAX_PING_STRIKES: u32 = 2;
/// grpc-go's `defaultPingTimeout`: how far apart pings must be on a connection without
/// streams when the policy does not permit pings without streams.
const NO_STREAM_PING_INTERVAL: Duration = Duration::from_secs(2 * 60 * 60);

/// Follows one direction's frames, header by header.
struct Frames {
    /// Bytes of the client preface still to skip.
    preface: usize,
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload: usize,
}

impl Frames {
    fn new(preface: usize) -> Self {
        Frames {
            preface,
            header: [0; FRAME_HEADER],
            have: 0,
            payload: 0,
        }
    }

    /// Between two frames (where another frame may be written).
    fn at_boundary(&self) -> bool {
        self.preface == 0 && self.have == 0 && self.payload == 0
    }

    /// Feeds bytes; calls `frame(kind, flags, stream)` for each frame header completed.
    fn feed(&mut self, mut bytes: &[u8], mut frame: impl FnMut(u8, u8, u32)) {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
            } else if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                self.payload -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEADER - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == FRAME_HEADER {
                    let h = FrameHeader::parse(&self.header);
                    self.have = 0;
                    self.payload = h.len;
                    frame(h.kind, h.flags, h.stream);
                }
            }
        }
    }
}

/// The policy's view of one connection.
struct Policy {
    min_time: Duration,
    open: HashSet<u32>,
    last_stream: u32,
    last_ping: Option<Instant>,
    reset_strikes: bool,
    strikes: u32,
}

impl Policy {
    fn on_client_frame(&mut self, kind: u8, flags: u8, stream: u32) -> bool {
        match kind {
            HEADERS if stream > self.last_stream => {
                self.last_stream = stream;
                self.open.insert(stream);
            }
            RST_STREAM => {
                self.open.remove(&stream);
            }
            PING if flags & ACK == 0 => return self.ping(Instant::now()),
            _ => {}
        }
        false
    }

    fn on_server_frame(&mut self, kind: u8, flags: u8, stream: u32) {
        match kind {
            DATA | HEADERS => {
                self.reset_strikes = true;
                if flags & END_STREAM != 0 {
                    self.open.remove(&stream);
                }
            }
            RST_STREAM => {
                self.open.remove(&stream);
            }
            _ => {}
        }
    }

    /// grpc-go's `handlePing`: whether this ping is one strike too many.
    fn ping(&mut self, now: Instant) -> bool {
        let previous = self.last_ping.replace(now);
        if std::mem::take(&mut self.reset_strikes) {
            self.strikes = 0;
            return false;
        }
        let least = if self.open.is_empty() {
            NO_STREAM_PING_INTERVAL
        } else {
            self.min_time
        };
        if previous.is_some_and(|p| now.duration_since(p) < least) {
            self.strikes += 1;
        }
        self.strikes > MAX_PING_STRIKES
    }

    fn goaway(&self) -> Vec<u8> {
        let debug = b"too_many_pings";
        let len = (8 + debug.len()) as u32;
        let mut f = Vec::with_capacity(FRAME_HEADER + len as usize);
        f.extend_from_slice(&len.to_be_bytes()[1..]);
        f.extend_from_slice(&[GOAWAY, 0, 0, 0, 0, 0]);
        f.extend_from_slice(&self.last_stream.to_be_bytes());
        f.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        f.extend_from_slice(debug);
        f
    }
}

/// A client connection under the keepalive policy.
pub struct KeepaliveEnforced<T> {
    inner: T,
    policy: Policy,
    incoming: Frames,
    outgoing: Frames,
    /// The GOAWAY still to write; then the connection is closed.
    goaway: Option<Vec<u8>>,
    closed: bool,
}

impl<T> KeepaliveEnforced<T> {
    pub fn new(inner: T, min_time: Duration) -> Self {
        KeepaliveEnforced {
            inner,
            policy: Policy {
                min_time,
                open: HashSet::new(),
                last_stream: 0,
                last_ping: None,
                reset_strikes: false,
                strikes: 0,
            },
            incoming: Frames::new(PREFACE.len()),
            outgoing: Frames::new(0),
            goaway: None,
            closed: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> KeepaliveEnforced<T> {
    /// Writes a due GOAWAY if the server's output is between frames. Ready(Ok) when nothing is
    /// left to write first.
    fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.outgoing.at_boundary() {
            return Poll::Ready(Ok(()));
        }
        while let Some(g) = self.goaway.as_mut() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, g) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            g.drain(..n);
            if g.is_empty() || n == 0 {
                self.goaway = None;
                self.closed = true;
                tracing::warn!(
                    "a client sent too many pings (--grpc-keepalive-min-time); sent GOAWAY too_many_pings and closed the connection"
                );
                let _ = Pin::new(&mut self.inner).poll_flush(cx);
                let _ = Pin::new(&mut self.inner).poll_shutdown(cx);
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Before a server write: a due GOAWAY goes first, and nothing goes after it.
    fn poll_ready_to_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.goaway.is_some() && self.poll_goaway(cx)?.is_pending() {
            return Poll::Pending;
        }
        if self.closed {
            return Poll::Ready(Err(Self::closed_error()));
        }
        Poll::Ready(Ok(()))
    }

    fn closed_error() -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            "connection closed: too many pings",
        )
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for KeepaliveEnforced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let (policy, incoming) = (&mut this.policy, &mut this.incoming);
            let mut violated = false;
            incoming.feed(&buf.filled()[before..], |kind, flags, stream| {
                violated |= policy.on_client_frame(kind, flags, stream);
            });
            if violated && this.goaway.is_none() {
                this.goaway = Some(this.policy.goaway());
                // The server answers the ping, which writes the GOAWAY; try now as well.
                let _ = this.poll_goaway(cx);
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for KeepaliveEnforced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.poll_ready_to_write(cx)?.is_pending() {
            return Poll::Pending;
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            let policy = &mut this.policy;
            this.outgoing.feed(&buf[..*n], |kind, flags, stream| {
                policy.on_server_frame(kind, flags, stream)
            });
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.poll_ready_to_write(cx)?.is_pending() {
            return Poll::Pending;
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            let mut left = *n;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let take = left.min(b.len());
                let policy = &mut this.policy;
                this.outgoing.feed(&b[..take], |kind, flags, stream| {
                    policy.on_server_frame(kind, flags, stream)
                });
                left -= take;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for KeepaliveEnforced<T>
{
    type ConnectInfo = T::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::super::h2::frame;
    use super::*;

    fn policy(min_time: Duration) -> Policy {
        KeepaliveEnforced::new((), min_time).policy
    }

    #[test]
    fn frames_are_followed_across_arbitrary_splits() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(HEADERS, 0x4, 1, &[0x82; 20]));
        bytes.extend(frame(PING, 0, 0, &[0; 8]));
        bytes.extend(frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]));
        let mut seen = Vec::new();
        let mut f = Frames::new(PREFACE.len());
        for chunk in bytes.chunks(5) {
            f.feed(chunk, |k, fl, s| seen.push((k, fl, s)));
        }
        assert_eq!(seen, [(HEADERS, 0x4, 1), (PING, 0, 0), (RST_STREAM, 0, 1)]);
        assert!(f.at_boundary());
        f.feed(&frame(DATA, 0, 3, b"abc")[..10], |_, _, _| {});
        assert!(!f.at_boundary(), "inside a payload");
    }

    #[test]
    fn strikes_follow_grpc_go() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        // No stream open: pings closer than two hours are strikes; the third one is too many.
        let mut p = policy(Duration::from_secs(5));
        assert!(!p.ping(ms(0)));
        assert!(!p.ping(ms(10)));
        assert!(!p.ping(ms(20)));
        assert!(p.ping(ms(30)));
        // A stream open: only pings closer than MinTime count.
        let mut p = policy(Duration::from_millis(100));
        p.on_client_frame(HEADERS, 0x4, 1);
        for i in 0..10 {
            assert!(!p.ping(ms(i * 150)), "ping {i} respects MinTime");
        }
        // The server sending data clears the strikes.
        let mut p = policy(Duration::from_secs(5));
        p.on_client_frame(HEADERS, 0x4, 1);
        for i in 0..10 {
            p.on_server_frame(DATA, 0, 1);
            assert!(!p.ping(ms(i)), "ping {i} after data");
        }
        // The stream ended by the server's trailers: back to the no-stream rule.
        p.on_server_frame(HEADERS, 0x4 | END_STREAM, 1);
        assert!(p.open.is_empty());
        assert_eq!(&p.goaway()[3..5], &[GOAWAY, 0]);
        assert!(p.goaway().ends_with(b"too_many_pings"));
    }
}
