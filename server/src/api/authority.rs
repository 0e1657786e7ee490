//! Lets etcd's Go clients connect with a URL as their HTTP/2 `:authority`.
//!
//! etcdctl 3.4's maintenance calls (`endpoint status`, `snapshot save`, `defrag`, ...) dial
//! `passthrough:///http://host:port`, so grpc-go sends `:authority: http://host:port`. etcd
//! (grpc-go) accepts that; the h2 crate under tonic rejects it as a malformed authority and
//! resets the stream. This wrapper sits on each accepted client connection and rewrites the
//! client-to-server HTTP/2 header blocks: every block is HPACK-decoded (keeping the client's
//! table state) and re-encoded with our own encoder (whose table state the server follows),
//! with a scheme prefix cut off the authority. All other frames pass through untouched, and the
//! server-to-client direction is not touched at all.

use super::h2::{
    FrameHeader, CONTINUATION, END_HEADERS, END_STREAM, FRAME_HEADER, HEADERS, PADDED, PREFACE,
    PRIORITY,
};
use loona_hpack::{Decoder, Encoder};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The server's SETTINGS_MAX_FRAME_SIZE (h2's default); re-encoded blocks are split to fit.
const MAX_FRAME: usize = 16_384;

enum Phase {
    Preface(usize),
    /// Expecting a frame header.
    Frame,
    /// Passing this many more bytes of a frame that is not a header block.
    Through(usize),
    /// Not HTTP/2 with prior knowledge: leave the stream alone.
    Raw,
}

struct Block {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

pub struct AuthorityFix<T> {
    inner: T,
    input: Vec<u8>,
    output: Vec<u8>,
    phase: Phase,
    block: Option<Block>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    /// Until the first header block is seen: its frames as received. grpc-go uses one
    /// authority per connection, so that block decides: a plain `host:port` passes the
    /// connection through untouched from then on; a URL makes every block get rewritten.
    first_block: Option<Vec<u8>>,
    eof: bool,
}

impl<T> AuthorityFix<T> {
    pub fn new(inner: T) -> Self {
        AuthorityFix {
            inner,
            input: Vec::new(),
            output: Vec::new(),
            phase: Phase::Preface(0),
            block: None,
            decoder: Decoder::new(),
            encoder: Encoder::new(),
            first_block: Some(Vec::new()),
            eof: false,
        }
    }

    fn bad(why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("http2 header rewrite: {why}"),
        )
    }

    /// Moves every complete unit of `input` to `output`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        let mut pos = 0;
        loop {
            let avail = &self.input[pos..];
            match self.phase {
                Phase::Raw => {
                    self.output.extend_from_slice(avail);
                    pos = self.input.len();
                    break;
                }
                Phase::Preface(seen) => {
                    let n = avail.len().min(PREFACE.len() - seen);
                    if n == 0 {
                        break;
                    }
                    if avail[..n] != PREFACE[seen..seen + n] {
                        self.phase = Phase::Raw;
                        continue;
                    }
                    self.output.extend_from_slice(&avail[..n]);
                    pos += n;
                    self.phase = if seen + n == PREFACE.len() {
                        Phase::Frame
                    } else {
                        Phase::Preface(seen + n)
                    };
                }
                Phase::Through(left) => {
                    let n = avail.len().min(left);
                    if n == 0 {
                        break;
                    }
                    self.output.extend_from_slice(&avail[..n]);
                    pos += n;
                    self.phase = if left == n {
                        Phase::Frame
                    } else {
                        Phase::Through(left - n)
                    };
                }
                Phase::Frame => {
                    if avail.len() < FRAME_HEADER {
                        break;
                    }
                    let mut head = [0; FRAME_HEADER];
                    head.copy_from_slice(&avail[..FRAME_HEADER]);
                    let FrameHeader {
                        len,
                        kind,
                        flags,
                        stream,
                    } = FrameHeader::parse(&head);
                    if kind != HEADERS && kind != CONTINUATION {
                        self.output.extend_from_slice(&avail[..FRAME_HEADER]);
                        pos += FRAME_HEADER;
                        self.phase = if len == 0 {
                            Phase::Frame
                        } else {
                            Phase::Through(len)
                        };
                        continue;
                    }
                    if avail.len() < FRAME_HEADER + len {
                        break;
                    }
                    let payload = avail[FRAME_HEADER..FRAME_HEADER + len].to_vec();
                    if let Some(raw) = self.first_block.as_mut() {
                        if raw.len() + FRAME_HEADER + len
                            > super::limits::MAX_HEADER_LIST_BYTES as usize
                        {
                            return Err(Self::bad("header block over the header list limit"));
                        }
                        raw.extend_from_slice(&avail[..FRAME_HEADER + len]);
                    }
                    pos += FRAME_HEADER + len;
                    self.on_header_frame(kind, flags, stream, payload)?;
                }
            }
        }
        self.input.drain(..pos);
        Ok(())
    }

    fn on_header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    ) -> io::Result<()> {
        let mut block = if kind == HEADERS {
            if self.block.is_some() {
                return Err(Self::bad("HEADERS inside an unfinished header block"));
            }
            let mut p = &payload[..];
            let mut pad = 0;
            if flags & PADDED != 0 {
                pad = *p.first().ok_or_else(|| Self::bad("short padded frame"))? as usize;
                p = &p[1..];
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                if p.len() < 5 {
                    return Err(Self::bad("short priority"));
                }
                priority = Some([p[0], p[1], p[2], p[3], p[4]]);
                p = &p[5..];
            }
            if pad > p.len() {
                return Err(Self::bad("padding longer than frame"));
            }
            Block {
                stream,
                flags,
                priority,
                fragment: p[..p.len() - pad].to_vec(),
            }
        } else {
            let mut b = self
                .block
                .take()
                .ok_or_else(|| Self::bad("CONTINUATION without HEADERS"))?;
            if b.stream != stream {
                return Err(Self::bad("CONTINUATION on another stream"));
            }
            // A header block the server would refuse anyway is not buffered without end.
            if b.fragment.len() + payload.len() > super::limits::MAX_HEADER_LIST_BYTES as usize {
                return Err(Self::bad("header block over the header list limit"));
            }
            b.fragment.extend_from_slice(&payload);
            b
        };
        if flags & END_HEADERS == 0 {
            self.block = Some(block);
            return Ok(());
        }
        let headers = self
            .decoder
            .decode(&block.fragment)
            .map_err(|e| Self::bad(&format!("hpack: {e:?}")))?;
        if let Some(raw) = self.first_block.take() {
            let needs_fix = headers
                .iter()
                .any(|(n, v)| n == b":authority" && strip_scheme(v).len() != v.len());
            if !needs_fix {
                // Forwarded byte for byte, so the server's HPACK state matches the client's.
                self.output.extend_from_slice(&raw);
                self.phase = Phase::Raw;
                return Ok(());
            }
        }
        let fixed: Vec<(Vec<u8>, Vec<u8>)> = headers
            .into_iter()
            .map(|(n, v)| {
                if n == b":authority" {
                    (n, strip_scheme(&v).to_vec())
                } else {
                    (n, v)
                }
            })
            .collect();
        let encoded = self
            .encoder
            .encode(fixed.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        block.fragment.clear();
        let mut first = Vec::new();
        if let Some(p) = block.priority {
            first.extend_from_slice(&p);
        }
        let room = MAX_FRAME - first.len();
        let (head, mut rest) = encoded.split_at(encoded.len().min(room));
        first.extend_from_slice(head);
        let keep = block.flags & (END_STREAM | PRIORITY);
        let end = if rest.is_empty() { END_HEADERS } else { 0 };
        self.frame(HEADERS, keep | end, block.stream, &first);
        while !rest.is_empty() {
            let (chunk, more) = rest.split_at(rest.len().min(MAX_FRAME));
            rest = more;
            self.frame(
                CONTINUATION,
                if rest.is_empty() { END_HEADERS } else { 0 },
                block.stream,
                chunk,
            );
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        self.output.extend_from_slice(&len.to_be_bytes()[1..]);
        self.output.push(kind);
        self.output.push(flags);
        self.output.extend_from_slice(&stream.to_be_bytes());
        self.output.extend_from_slice(payload);
    }
}

/// "http://host:port" -> "host:port"; anything else unchanged.
fn strip_scheme(v: &[u8]) -> &[u8] {
    match v.windows(3).position(|w| w == b"://") {
        Some(i) => {
            let rest = &v[i + 3..];
            match rest.iter().position(|b| *b == b'/') {
                Some(j) => &rest[..j],
                None => rest,
            }
        }
        None => v,
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                        // An incomplete trailing frame is the peer's problem: hand it on as is.
                        let rest = std::mem::take(&mut this.input);
                        this.output.extend_from_slice(&rest);
                    } else {
                        this.input.extend_from_slice(rb.filled());
                        this.process()?;
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<T>
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
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn url_authority_becomes_host_port_and_other_frames_pass() {
        let mut client_enc = Encoder::new();
        let block1 = client_enc.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"http://127.0.0.1:2379"),
        ]);
        let block2 = client_enc.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"http://127.0.0.1:2379"),
        ]);
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                            // First block split over HEADERS + CONTINUATION.
        let (a, b) = block1.split_at(3);
        wire.extend(frame(HEADERS, 0, 1, a));
        wire.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        wire.extend(frame(0x0, END_STREAM, 1, b"payload"));
        wire.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &block2));
        let mut fix = AuthorityFix::new(&wire[..]);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();

        assert!(out.starts_with(PREFACE));
        let mut dec = Decoder::new();
        let mut p = PREFACE.len();
        let mut authorities = Vec::new();
        let mut data = Vec::new();
        while p < out.len() {
            let len = u32::from_be_bytes([0, out[p], out[p + 1], out[p + 2]]) as usize;
            let (kind, payload) = (out[p + 3], &out[p + 9..p + 9 + len]);
            if kind == HEADERS {
                assert!(out[p + 4] & END_HEADERS != 0);
                for (n, v) in dec.decode(payload).unwrap() {
                    if n == b":authority" {
                        authorities.push(v);
                    }
                }
            } else if kind == 0 {
                data.extend_from_slice(payload);
            }
            p += 9 + len;
        }
        assert_eq!(
            authorities,
            vec![b"127.0.0.1:2379".to_vec(), b"127.0.0.1:2379".to_vec()]
        );
        assert_eq!(data, b"payload");
    }

    #[tokio::test]
    async fn plain_authority_passes_the_connection_through_byte_for_byte() {
        let mut client_enc = Encoder::new();
        let block = client_enc.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"127.0.0.1:2379"),
        ]);
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x4, 0, 0, &[]));
        wire.extend(frame(HEADERS, END_HEADERS, 1, &block));
        wire.extend(frame(0x0, END_STREAM, 1, b"payload"));
        // Later blocks are not even parsed: garbage stays garbage.
        wire.extend(frame(HEADERS, END_HEADERS, 3, b"\xff\xff not hpack"));
        let mut fix = AuthorityFix::new(&wire[..]);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, wire);
    }

    #[test]
    fn strip_scheme_keeps_plain_authorities() {
        assert_eq!(strip_scheme(b"127.0.0.1:2379"), b"127.0.0.1:2379");
        assert_eq!(
            strip_scheme(b"https://etcd-0.etcd:2379/"),
            b"etcd-0.etcd:2379"
        );
    }
}
