//! Accepts HTTP/2 requests whose `:authority` carries a URL scheme.
//!
//! etcd's Go client dials a member URL taken from MemberList verbatim
//! (`passthrough:///http://10.0.0.1:2379`), so its requests arrive with
//! `:authority: http://10.0.0.1:2379`. etcd's gRPC server ignores the
//! authority; the Rust HTTP/2 stack rejects it as malformed and resets the
//! stream. `etcdctl endpoint status --cluster` is the everyday casualty.
//!
//! [`AuthorityFix`] sits between the socket and the HTTP/2 server on the
//! read side only. It parses the frame layer of the client's byte stream;
//! in each header block (HEADERS plus CONTINUATION) a literal `:authority`
//! with a scheme is cut to `host:port` ([`hpack`] says how the server's
//! HPACK table stays in step). A block with none passes as it came, and so
//! does every other frame, and every byte of a non-HTTP/2 connection (plain
//! HTTP/1 for /health).
//!
//! Memory is bounded by the limits the HTTP/2 server itself is configured
//! with ([`MAX_FRAME`], [`MAX_HEADER_LIST`]), before h2 sees a byte: a frame
//! that declares more than the frame limit, or a compressed header block
//! past what a header list within the limit can take, is never buffered.
//! The connection is then closed with a protocol error: the server is
//! handed a frame header over its frame limit, which h2 answers with
//! GOAWAY(FRAME_SIZE_ERROR), and nothing more is read from the client. The
//! decoded size of a block is h2's to bound (it is configured with the same
//! header list limit); the fix decodes no indexed field, so a small block
//! that names large entries costs it nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod hpack;
#[cfg(test)]
use hpack::strip_scheme;
use hpack::Scanner;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE of the client listeners (HTTP/2's default); the
/// server is configured with it too (`lib.rs::serve`).
pub const MAX_FRAME: usize = 16_384;
/// SETTINGS_MAX_HEADER_LIST_SIZE of the client listeners (hyper's default),
/// counted as HTTP/2 does: name + value + 32 per field. The server is
/// configured with it too.
pub const MAX_HEADER_LIST: usize = 16 * 1024;
/// The most compressed header block bytes held: room for any block whose
/// decoded list fits [`MAX_HEADER_LIST`], even Huffman-coded at its worst.
const MAX_HEADER_BLOCK: usize = 4 * MAX_HEADER_LIST;

#[derive(PartialEq)]
enum Mode {
    Preface,
    Frames,
    Passthrough,
    /// Past a limit: the server has been handed a frame it refuses; the
    /// rest of the client's bytes are dropped unread.
    Closed,
}

/// A header block being assembled from HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

pub struct AuthorityFix<S> {
    inner: S,
    raw: BytesMut,
    ready: BytesMut,
    mode: Mode,
    block: Option<Block>,
    hpack: Scanner,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            mode: Mode::Preface,
            block: None,
            hpack: Scanner::default(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves every complete unit of `raw` into `ready`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.mode {
                Mode::Passthrough => {
                    let all = self.raw.split();
                    self.ready.unsplit(all);
                    return Ok(());
                }
                Mode::Preface => {
                    let n = self.raw.len().min(PREFACE.len());
                    if self.raw[..n] != PREFACE[..n] {
                        self.mode = Mode::Passthrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    let preface = self.raw.split_to(PREFACE.len());
                    self.ready.unsplit(preface);
                    self.mode = Mode::Frames;
                }
                Mode::Closed => {
                    self.raw.clear();
                    return Ok(());
                }
                Mode::Frames => {
                    if self.raw.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
                    if len > MAX_FRAME {
                        // Hand h2 the header alone: it refuses the size.
                        let header = self.raw.split_to(FRAME_HEADER);
                        self.close_with(&header);
                        continue;
                    }
                    if self.raw.len() < FRAME_HEADER + len {
                        return Ok(());
                    }
                    let frame = self.raw.split_to(FRAME_HEADER + len);
                    let kind = frame[3];
                    let in_block = self.block.is_some();
                    if kind == HEADERS && !in_block {
                        self.start_block(frame)?;
                    } else if kind == CONTINUATION && in_block {
                        let flags = frame[4];
                        let Some(b) = self.block.as_mut() else { continue };
                        if b.fragment.len() + len > MAX_HEADER_BLOCK {
                            self.close_with(&frame[..FRAME_HEADER]);
                            continue;
                        }
                        b.fragment.extend_from_slice(&frame[FRAME_HEADER..]);
                        if flags & END_HEADERS != 0 {
                            self.finish_block()?;
                        }
                    } else {
                        // Anything else (including a protocol violation, which
                        // the server will report) passes through unchanged.
                        self.ready.unsplit(frame);
                    }
                }
            }
        }
    }

    /// Ends the connection with a protocol error: after the complete frames
    /// already handed on, the server gets `header` (a frame header) with its
    /// length raised past [`MAX_FRAME`], which h2 answers with
    /// GOAWAY(FRAME_SIZE_ERROR) before it closes. The block being assembled
    /// and every later byte from the client are dropped.
    fn close_with(&mut self, header: &[u8]) {
        tracing::warn!("closing a client connection past the HTTP/2 frame or header list limit");
        let len = (MAX_FRAME as u32 + 1).to_be_bytes();
        let mut h = [0u8; FRAME_HEADER];
        h.copy_from_slice(&header[..FRAME_HEADER]);
        h[..3].copy_from_slice(&len[1..]);
        self.ready.put_slice(&h);
        self.block = None;
        self.raw = BytesMut::new();
        self.mode = Mode::Closed;
    }

    /// A HEADERS frame: a whole block passes as it came unless it needs
    /// a rewrite; the start of one spread over CONTINUATION frames waits
    /// for the rest.
    fn start_block(&mut self, frame: BytesMut) -> io::Result<()> {
        let flags = frame[4];
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let mut payload = &frame[FRAME_HEADER..];
        let mut pad = 0usize;
        if flags & PADDED != 0 {
            let (&p, rest) = payload.split_first().ok_or_else(|| bad("empty padded HEADERS"))?;
            pad = p as usize;
            payload = rest;
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            if payload.len() < 5 {
                return Err(bad("short PRIORITY in HEADERS"));
            }
            priority = Some([payload[0], payload[1], payload[2], payload[3], payload[4]]);
            payload = &payload[5..];
        }
        let fragment = payload
            .get(..payload.len().checked_sub(pad).ok_or_else(|| bad("padding longer than frame"))?)
            .ok_or_else(|| bad("bad padding"))?;
        if flags & END_HEADERS == 0 {
            self.block = Some(Block { stream, flags, priority, fragment: fragment.to_vec() });
            return Ok(());
        }
        match self.hpack.rewrite(fragment) {
            Ok(None) => self.ready.unsplit(frame),
            Ok(Some(block)) => self.put_block(stream, flags, priority, &block),
            Err(_) => self.malformed(frame),
        }
        Ok(())
    }

    /// A block the scanner cannot follow goes to the server as it is (it
    /// decodes it too, and ends the connection), with all that follows.
    fn malformed(&mut self, rest: BytesMut) {
        self.ready.unsplit(rest);
        let rest = self.raw.split();
        self.ready.unsplit(rest);
        self.mode = Mode::Passthrough;
    }

    fn finish_block(&mut self) -> io::Result<()> {
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        match self.hpack.rewrite(&block.fragment) {
            Ok(None) => self.put_block(block.stream, block.flags, block.priority, &block.fragment),
            Ok(Some(rewritten)) => self.put_block(block.stream, block.flags, block.priority, &rewritten),
            Err(_) => {
                self.put_block(block.stream, block.flags, block.priority, &block.fragment);
                self.malformed(BytesMut::new());
            }
        }
        Ok(())
    }

    /// `encoded` as a HEADERS frame, and CONTINUATION frames for what does
    /// not fit in one.
    fn put_block(&mut self, stream: u32, flags: u8, priority: Option<[u8; 5]>, encoded: &[u8]) {
        let mut first_payload = Vec::with_capacity(encoded.len() + 5);
        if let Some(p) = priority {
            first_payload.extend_from_slice(&p);
        }
        let room = MAX_FRAME - first_payload.len();
        let (head, mut rest) = encoded.split_at(encoded.len().min(room));
        first_payload.extend_from_slice(head);
        let mut flags = flags & (END_STREAM | PRIORITY);
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        self.put_frame(HEADERS, flags, stream, &first_payload);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
            rest = tail;
            let flags = if rest.is_empty() { END_HEADERS } else { 0 };
            self.put_frame(CONTINUATION, flags, stream, chunk);
        }
    }

    fn put_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        self.ready.put_slice(&len.to_be_bytes()[1..]);
        self.ready.put_u8(kind);
        self.ready.put_u8(flags);
        self.ready.put_u32(stream);
        self.ready.put_slice(payload);
    }
}

/// Bytes read from the connection at a time while frames are rewritten.
const READ_CHUNK: usize = 16 * 1024;

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::Passthrough && this.raw.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if this.mode == Mode::Closed {
                // End of stream for the server, which has its error to send.
                return Poll::Ready(Ok(()));
            }
            // Straight into `raw`'s spare room: no intermediate copy.
            this.raw.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.raw) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => {
                    // End of stream: hand over whatever is left as it is.
                    let rest = this.raw.split();
                    this.ready.unsplit(rest);
                    if this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(_)) => this.process()?,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
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

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::{Decoder, Encoder};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn run(input: &[u8]) -> Vec<u8> {
        let mut fix = AuthorityFix::new(());
        // Feed in small pieces, as a socket may.
        for piece in input.chunks(7) {
            fix.raw.extend_from_slice(piece);
            fix.process().unwrap();
        }
        fix.ready.to_vec()
    }

    fn headers_out(out: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut dec = Decoder::new();
        let mut at = PREFACE.len();
        let mut blocks = Vec::new();
        let mut cur = Vec::new();
        while at < out.len() {
            let len = u32::from_be_bytes([0, out[at], out[at + 1], out[at + 2]]) as usize;
            let (kind, flags) = (out[at + 3], out[at + 4]);
            let mut payload = &out[at + FRAME_HEADER..at + FRAME_HEADER + len];
            if kind == HEADERS && flags & PADDED != 0 {
                payload = &payload[1..payload.len() - payload[0] as usize];
            }
            if kind == HEADERS && flags & PRIORITY != 0 {
                payload = &payload[5..];
            }
            if kind == HEADERS || kind == CONTINUATION {
                cur.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    blocks.push(dec.decode(&cur).unwrap());
                    cur.clear();
                }
            }
            at += FRAME_HEADER + len;
        }
        blocks
    }

    #[test]
    fn schemed_authority_is_cut_to_host_port_across_requests() {
        let mut enc = Encoder::new();
        let req = |enc: &mut Encoder<'_>, auth: &[u8]| {
            enc.encode([(&b":method"[..], &b"POST"[..]), (b":path", b"/etcdserverpb.KV/Range"), (b":authority", auth)])
        };
        let b1 = req(&mut enc, b"http://127.0.0.1:2379");
        let b2 = req(&mut enc, b"http://127.0.0.1:2379");
        let b3 = req(&mut enc, b"127.0.0.1:2379");
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS passes through
        input.extend(frame(HEADERS, END_HEADERS, 1, &b1));
        input.extend(frame(0x0, END_STREAM, 1, b"data"));
        // A block split over CONTINUATION, with padding and priority.
        let (x, y) = b2.split_at(3);
        let mut padded = vec![2u8, 0, 0, 0, 0, 16];
        padded.extend_from_slice(x);
        padded.extend_from_slice(&[0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 3, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, y));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &b3));
        let out = run(&input);
        assert!(out.starts_with(PREFACE));
        let blocks = headers_out(&out);
        assert_eq!(blocks.len(), 3);
        for b in &blocks {
            let auth = b.iter().find(|(n, _)| n == b":authority").map(|(_, v)| v.clone());
            assert_eq!(auth.as_deref(), Some(&b"127.0.0.1:2379"[..]));
        }
        assert!(out.windows(4).any(|w| w == b"data"), "DATA frames pass through");
    }

    /// What the server is handed once a limit is passed: the bytes before
    /// the offending frame, then a frame header over the frame limit, and
    /// nothing of what the client sends after it.
    fn assert_closed(out: &[u8], before: usize) {
        assert_eq!(out.len(), before + FRAME_HEADER, "nothing after the refused frame header");
        let tail = &out[before..];
        let len = u32::from_be_bytes([0, tail[0], tail[1], tail[2]]) as usize;
        assert_eq!(len, MAX_FRAME + 1, "the server is handed a frame over its limit");
    }

    #[test]
    fn a_frame_over_the_limit_is_never_buffered() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        let before = input.len();
        // A DATA frame that declares 16 MiB, followed by some of its bytes.
        let mut huge = frame(0x0, 0, 1, &[]);
        huge[..3].copy_from_slice(&[0xff, 0xff, 0xff]);
        input.extend(huge);
        input.extend(vec![0u8; 100_000]);
        let mut fix = AuthorityFix::new(());
        for piece in input.chunks(4096) {
            fix.raw.extend_from_slice(piece);
            fix.process().unwrap();
            assert!(fix.raw.len() <= MAX_FRAME + FRAME_HEADER, "buffered {} bytes", fix.raw.len());
        }
        assert_closed(&fix.ready, before);
    }

    #[test]
    fn endless_continuation_frames_are_cut_off() {
        let mut enc = Encoder::new();
        let block = enc.encode([(&b":method"[..], &b"POST"[..])]);
        let mut input = PREFACE.to_vec();
        let before = input.len();
        input.extend(frame(HEADERS, 0, 1, &block));
        for _ in 0..1000 {
            input.extend(frame(CONTINUATION, 0, 1, &[0x40; 1000]));
        }
        let mut fix = AuthorityFix::new(());
        for piece in input.chunks(4096) {
            fix.raw.extend_from_slice(piece);
            fix.process().unwrap();
            let held = fix.block.as_ref().map_or(0, |b| b.fragment.len());
            assert!(held <= MAX_HEADER_BLOCK, "held a {held}-byte header block");
        }
        assert_closed(&fix.ready, before);
    }

    #[test]
    fn a_small_block_that_decodes_large_passes_unread() {
        // One literal of 4,000 bytes indexed into the table, then 100 one-byte
        // references to it: 400 KB decoded from 4 KB on the wire. The fix
        // decodes no indexed field; the bytes go to h2, which bounds them.
        let mut enc = Encoder::new();
        let value = vec![b'x'; 4000];
        let first = enc.encode([(&b"big"[..], &value[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        let bomb = vec![0x80 | 62; 100]; // indexed: the newest dynamic table entry
        input.extend(frame(HEADERS, END_HEADERS, 3, &bomb));
        assert_eq!(run(&input), input);
    }

    /// How Rust's HTTP/2 client sends a request: the path as a
    /// Huffman-coded literal without indexing (here "www.example.com",
    /// RFC 7541 C.4.1), the rest indexed.
    #[test]
    fn blocks_without_a_schemed_authority_pass_byte_for_byte() {
        let huffman_path = [0x80 | 12, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff];
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
        block.push(0x04); // literal without indexing, name :path (static 4)
        block.extend_from_slice(&huffman_path);
        block.push(0x81); // :authority "" from the static table
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        input.extend(frame(HEADERS, END_HEADERS | PADDED, 3, &[[1u8].as_slice(), &block, &[0]].concat()));
        assert_eq!(run(&input), input);
        let blocks = headers_out(&input);
        assert_eq!(blocks[0][2], (b":path".to_vec(), b"www.example.com".to_vec()));
    }

    /// Every kind of literal `:authority`: with incremental indexing (then
    /// indexed), without indexing, never indexed, with a literal name, and
    /// with its name from a dynamic entry; each reaches the server cut,
    /// and the fields around it as they were.
    #[test]
    fn every_literal_kind_of_authority_is_cut() {
        let lit = |first: u8, v: &[u8]| [vec![first, v.len() as u8], v.to_vec()].concat();
        let auth = b"http://10.0.0.1:2379";
        let blocks = [
            // incremental indexing, static name: the entry is 62 from now on
            [lit(0x41, auth), lit(0x40 | 58, b"grpc-go/1.26")].concat(),
            // indexed: the dynamic entry (63 now: user-agent is newer)
            vec![0x80 | 63],
            // without indexing, name from the dynamic :authority entry
            [vec![0x0f, 63 - 15, auth.len() as u8], auth.to_vec()].concat(),
            // never indexed, literal name
            [vec![0x10, 10], b":authority".to_vec(), vec![auth.len() as u8], auth.to_vec()].concat(),
            // an unschemed authority passes
            lit(0x01, b"10.0.0.1:2379"),
        ];
        let mut input = PREFACE.to_vec();
        for (i, b) in blocks.iter().enumerate() {
            input.extend(frame(HEADERS, END_HEADERS, 1 + 2 * i as u32, b));
        }
        let out = headers_out(&run(&input));
        assert_eq!(out.len(), blocks.len());
        for (i, b) in out.iter().enumerate() {
            let a: Vec<_> = b.iter().filter(|(n, _)| n == b":authority").map(|(_, v)| v.clone()).collect();
            assert_eq!(a, vec![b"10.0.0.1:2379".to_vec()], "block {i}: {b:?}");
        }
        assert_eq!(out[0][1], (b"user-agent".to_vec(), b"grpc-go/1.26".to_vec()));
    }

    #[test]
    fn http1_passes_through_untouched() {
        let req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(run(req), req);
    }

    #[test]
    fn strip_scheme_table() {
        for (input, want) in [
            (&b"http://a:1"[..], Some(&b"a:1"[..])),
            (b"https://a:1/x", Some(b"a:1")),
            (b"a:1", None),
            (b"unix://sock", Some(b"sock")),
        ] {
            assert_eq!(strip_scheme(input).as_deref(), want);
        }
    }
}
