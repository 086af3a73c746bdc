//! Lets every gRPC client talk to the Unix socket, whatever it sends as `:authority`.
//!
//! grpcio (Python, C++), grpc-java and grpcurl send the socket path (or its
//! percent-encoding) as `:authority` on a Unix socket. hyper's HTTP/2 layer (h2) rejects
//! that as a malformed header with RST_STREAM(PROTOCOL_ERROR) before tonic sees the call,
//! and offers no switch to relax it (hyperium/h2#487 is unmerged). The authority means
//! nothing on a local socket, so the read side of each accepted connection is rewritten
//! on the fly: every header block is HPACK-decoded and re-encoded as plain literals, and an
//! authority that does not parse as one becomes `localhost` (what Go clients send).
//! Re-encoding every block, not only the bad ones, keeps h2's decoder state trivially in
//! step: its dynamic table is never used. Frames other than HEADERS and CONTINUATION pass
//! through byte for byte; the write side is untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
/// h2's SETTINGS_MAX_FRAME_SIZE as tonic leaves it (the protocol's minimum): no frame the
/// server accepts is larger, so neither is any frame written here.
const MAX_FRAME: usize = 16_384;
/// A header block (HEADERS plus CONTINUATIONs) larger than this closes the connection.
const MAX_BLOCK: usize = 1 << 20;
/// The HPACK table size h2 advertises (the protocol default).
const TABLE_SIZE: usize = 4_096;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// What a local socket's authority is taken to be when the client's is not one.
pub const LOCAL_AUTHORITY: &[u8] = b"localhost";

struct Pending {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

enum Phase {
    Preface(usize),
    Frames,
    /// The peer broke framing; h2 will answer it, so bytes pass unchanged from here on.
    Raw,
}

/// An accepted connection whose incoming header blocks are normalised (see module doc).
pub struct NormalizeAuthority<S> {
    inner: S,
    phase: Phase,
    raw: BytesMut,
    out: BytesMut,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
    eof: bool,
}

impl<S> NormalizeAuthority<S> {
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            inner,
            phase: Phase::Preface(PREFACE_LEN),
            raw: BytesMut::with_capacity(MAX_FRAME + FRAME_HEADER),
            out: BytesMut::with_capacity(MAX_FRAME + FRAME_HEADER),
            pending: None,
            decoder,
            eof: false,
        }
    }

    /// Moves every complete unit of `raw` to `out`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.phase {
                Phase::Raw => {
                    let all = self.raw.split();
                    self.out.extend_from_slice(&all);
                    return Ok(());
                }
                Phase::Preface(left) => {
                    let n = left.min(self.raw.len());
                    let head = self.raw.split_to(n);
                    self.out.extend_from_slice(&head);
                    if n < left {
                        self.phase = Phase::Preface(left - n);
                        return Ok(());
                    }
                    self.phase = Phase::Frames;
                }
                Phase::Frames => {
                    if self.raw.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let len =
                        u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
                    let kind = self.raw[3];
                    if len > MAX_FRAME || (self.pending.is_some() && kind != CONTINUATION) {
                        self.phase = Phase::Raw;
                        self.flush_pending_raw();
                        continue;
                    }
                    if self.raw.len() < FRAME_HEADER + len {
                        return Ok(());
                    }
                    let frame = self.raw.split_to(FRAME_HEADER + len);
                    let flags = frame[4];
                    let stream =
                        u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
                    match kind {
                        HEADERS => self.headers(stream, flags, &frame[FRAME_HEADER..], &frame)?,
                        CONTINUATION => {
                            self.continuation(stream, flags, &frame[FRAME_HEADER..], &frame)?
                        }
                        _ => self.out.extend_from_slice(&frame),
                    }
                }
            }
        }
    }

    fn headers(&mut self, stream: u32, flags: u8, payload: &[u8], frame: &[u8]) -> io::Result<()> {
        let mut body = payload;
        if flags & PADDED != 0 {
            let Some((&pad, rest)) = body.split_first() else {
                return self.give_up(frame);
            };
            if pad as usize > rest.len() {
                return self.give_up(frame);
            }
            body = &rest[..rest.len() - pad as usize];
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            if body.len() < 5 {
                return self.give_up(frame);
            }
            let mut p = [0u8; 5];
            p.copy_from_slice(&body[..5]);
            priority = Some(p);
            body = &body[5..];
        }
        self.pending = Some(Pending {
            stream,
            flags,
            priority,
            block: body.to_vec(),
        });
        if flags & END_HEADERS != 0 {
            self.finish()?;
        }
        Ok(())
    }

    fn continuation(
        &mut self,
        stream: u32,
        flags: u8,
        payload: &[u8],
        frame: &[u8],
    ) -> io::Result<()> {
        let Some(pending) = self.pending.as_mut().filter(|p| p.stream == stream) else {
            return self.give_up(frame);
        };
        if pending.block.len() + payload.len() > MAX_BLOCK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "HTTP/2 header block over 1 MiB",
            ));
        }
        pending.block.extend_from_slice(payload);
        if flags & END_HEADERS != 0 {
            self.finish()?;
        }
        Ok(())
    }

    /// A frame h2 will reject anyway: hand it over unchanged and stop interpreting.
    fn give_up(&mut self, frame: &[u8]) -> io::Result<()> {
        self.flush_pending_raw();
        self.out.extend_from_slice(frame);
        self.phase = Phase::Raw;
        Ok(())
    }

    /// Passes a half-collected block on as it came, so h2 sees (and answers) the fault.
    fn flush_pending_raw(&mut self) {
        if let Some(p) = self.pending.take() {
            let mut payload = Vec::with_capacity(p.block.len() + 5);
            if let Some(prio) = p.priority {
                payload.extend_from_slice(&prio);
            }
            payload.extend_from_slice(&p.block);
            write_frame(
                &mut self.out,
                HEADERS,
                p.flags & (END_STREAM | PRIORITY),
                p.stream,
                &payload,
            );
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        let p = self.pending.take().expect("a header block is pending");
        let fields = self.decoder.decode(&p.block).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("HTTP/2 header block does not decode: {e:?}"),
            )
        })?;
        let mut block = Vec::with_capacity(p.block.len() + 64);
        for (name, value) in &fields {
            let value: &[u8] = if name == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                LOCAL_AUTHORITY
            } else {
                value
            };
            encode_literal(&mut block, name, value);
        }
        emit_block(&mut self.out, p.stream, p.flags, p.priority, &block);
        Ok(())
    }
}

/// HPACK "literal header field without indexing, new name", no Huffman (RFC 7541 §6.2.2).
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_int(out, name.len(), 7, 0);
    out.extend_from_slice(name);
    encode_int(out, value.len(), 7, 0);
    out.extend_from_slice(value);
}

/// HPACK prefix integer (RFC 7541 §5.1).
fn encode_int(out: &mut Vec<u8>, mut n: usize, prefix: u32, high: u8) {
    let max = (1usize << prefix) - 1;
    if n < max {
        out.push(high | n as u8);
        return;
    }
    out.push(high | max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

fn write_frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// One HEADERS frame, then CONTINUATIONs, none over the server's frame size.
fn emit_block(out: &mut BytesMut, stream: u32, flags: u8, priority: Option<[u8; 5]>, block: &[u8]) {
    let prio_len = priority.map_or(0, |_| 5);
    let first_room = MAX_FRAME - prio_len;
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut head_flags = flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        head_flags |= END_HEADERS;
    }
    let mut payload = Vec::with_capacity(prio_len + first.len());
    if let Some(p) = priority {
        payload.extend_from_slice(&p);
    }
    payload.extend_from_slice(first);
    write_frame(out, HEADERS, head_flags, stream, &payload);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        let f = if tail.is_empty() { END_HEADERS } else { 0 };
        write_frame(out, CONTINUATION, f, stream, chunk);
        rest = tail;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for NormalizeAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        // A truncated frame goes on as it is: h2 sees the cut.
                        this.eof = true;
                        this.flush_pending_raw();
                        let tail = this.raw.split();
                        this.out.extend_from_slice(&tail);
                        continue;
                    }
                    this.raw.extend_from_slice(got);
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NormalizeAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for NormalizeAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn hpack(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut enc = loona_hpack::Encoder::new();
        enc.encode(fields.iter().copied())
    }

    async fn rewrite(input: Vec<u8>) -> Vec<u8> {
        let mut s = NormalizeAuthority::new(std::io::Cursor::new(input));
        let mut out = Vec::new();
        // Cursor is AsyncRead; reading to the end drives every frame through.
        s.read_to_end(&mut out).await.unwrap();
        out
    }

    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while b.len() >= 9 {
            let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
            let sid = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            v.push((b[3], b[4], sid, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        v
    }

    fn preface() -> Vec<u8> {
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_and_a_valid_one_stays() {
        let mut input = preface();
        let mut settings = BytesMut::new();
        write_frame(&mut settings, 0x4, 0, 0, &[]);
        input.extend_from_slice(&settings);
        let mut enc = loona_hpack::Encoder::new();
        // Two requests through one encoder: the second leans on the dynamic table.
        let b1 = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":path", b"/csi.v1.Identity/Probe"),
            (b":authority", b"/var/lib/kubelet/plugins/x/csi.sock"),
            (b"content-type", b"application/grpc"),
        ]);
        let b2 = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":path", b"/csi.v1.Identity/Probe"),
            (b":authority", b"localhost:50051"),
            (b"content-type", b"application/grpc"),
        ]);
        let mut f = BytesMut::new();
        write_frame(&mut f, HEADERS, END_HEADERS, 1, &b1);
        write_frame(&mut f, 0x0, END_STREAM, 1, b"\0\0\0\0\0");
        write_frame(&mut f, HEADERS, END_HEADERS | END_STREAM, 3, &b2);
        input.extend_from_slice(&f);
        let out = rewrite(input).await;
        assert_eq!(&out[..24], &preface()[..]);
        let got = frames(&out[24..]);
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].0, 0x4, "SETTINGS passes through");
        assert_eq!(got[2], (0x0, END_STREAM, 1, b"\0\0\0\0\0".to_vec()));
        let mut dec = loona_hpack::Decoder::new();
        let h1 = dec.decode(&got[1].3).unwrap();
        assert!(h1.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
        assert!(h1.contains(&(b":path".to_vec(), b"/csi.v1.Identity/Probe".to_vec())));
        assert_eq!(got[3].1, END_HEADERS | END_STREAM);
        let h2 = dec.decode(&got[3].3).unwrap();
        assert!(h2.contains(&(b":authority".to_vec(), b"localhost:50051".to_vec())));
        assert!(h2.contains(&(b"content-type".to_vec(), b"application/grpc".to_vec())));
    }

    #[tokio::test]
    async fn continuation_padding_and_priority_are_reassembled() {
        let block = hpack(&[
            (b":method", b"POST"),
            (b":authority", b"%2Frun%2Fcsi.sock"),
            (b"x-long", &[b'a'; 20_000]),
        ]);
        let (a, rest) = block.split_at(100);
        let (b, c) = rest.split_at(10_000);
        let mut payload = vec![3u8]; // pad length
        payload.extend_from_slice(&[0, 0, 0, 0, 16]); // priority
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut f = BytesMut::new();
        write_frame(&mut f, HEADERS, PADDED | PRIORITY, 5, &payload);
        write_frame(&mut f, CONTINUATION, 0, 5, b);
        write_frame(&mut f, CONTINUATION, END_HEADERS, 5, c);
        let mut input = preface();
        input.extend_from_slice(&f);
        let got = frames(&rewrite(input).await[24..]);
        assert_eq!(got[0].0, HEADERS);
        assert_eq!(got[0].1 & (PRIORITY | END_HEADERS | PADDED), PRIORITY);
        assert!(got.iter().all(|f| f.3.len() <= MAX_FRAME));
        assert_eq!(got.last().unwrap().1 & END_HEADERS, END_HEADERS);
        let mut block = got[0].3[5..].to_vec();
        for f in &got[1..] {
            assert_eq!((f.0, f.2), (CONTINUATION, 5));
            block.extend_from_slice(&f.3);
        }
        let h = loona_hpack::Decoder::new().decode(&block).unwrap();
        assert_eq!(h[1], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(h[2].1.len(), 20_000);
    }

    #[tokio::test]
    async fn broken_framing_reaches_h2_unchanged() {
        let mut f = BytesMut::new();
        // CONTINUATION with no HEADERS before it: a protocol error h2 must see as sent.
        write_frame(&mut f, CONTINUATION, END_HEADERS, 7, b"\x82");
        write_frame(&mut f, 0x0, 0, 7, b"data");
        let mut input = preface();
        input.extend_from_slice(&f);
        let out = rewrite(input.clone()).await;
        assert_eq!(out, input);
    }

    #[tokio::test]
    async fn undecodable_block_closes_the_connection() {
        let mut f = BytesMut::new();
        write_frame(
            &mut f,
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0x7f],
        );
        let mut input = preface();
        input.extend_from_slice(&f);
        let mut s = NormalizeAuthority::new(std::io::Cursor::new(input));
        let mut out = Vec::new();
        let err = s.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn prefix_integers_follow_rfc7541() {
        let mut v = Vec::new();
        encode_int(&mut v, 10, 5, 0);
        assert_eq!(v, [10]);
        v.clear();
        encode_int(&mut v, 1337, 5, 0);
        assert_eq!(v, [31, 154, 10]);
        v.clear();
        encode_int(&mut v, 127, 7, 0);
        assert_eq!(v, [127, 0]);
    }
}
