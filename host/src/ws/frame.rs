//! The RFC 6455 frame codec: decoding client frames and encoding server frames.
//!
//! The decoder is strict: reserved bits (but RSV1 on the first frame of a message
//! when `permessage-deflate` was negotiated: see [`super::deflate`]), unknown opcodes, unmasked client frames,
//! fragmented or oversized control frames, non-minimal lengths, misplaced
//! continuations, invalid close codes and invalid UTF-8 are errors that carry the close
//! code the server answers with. Server frames are never masked, so a broadcast frame
//! is encoded once and its bytes shared by every recipient.

use bytes::{BufMut, Bytes, BytesMut};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes the server sends.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
}

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A data message, reassembled from its fragments. `text` payloads are valid UTF-8.
    Message {
        text: bool,
        payload: Bytes,
    },
    Ping(Bytes),
    Pong(Bytes),
    /// A close frame; `code` is `None` for an empty close body.
    Close {
        code: Option<u16>,
        reason: Bytes,
    },
}

/// Why the connection must be failed; each maps to the close code the server sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    #[error("message larger than {0} bytes")]
    TooBig(usize),
    #[error("a compressed message that does not inflate")]
    Corrupt,
}

impl DecodeError {
    pub fn close_code(&self) -> u16 {
        match self {
            Self::Protocol(_) => close_code::PROTOCOL,
            Self::InvalidUtf8 | Self::Corrupt => close_code::INVALID_DATA,
            Self::TooBig(_) => close_code::TOO_BIG,
        }
    }
}

/// The server's ping: empty (a parked session's queue keeps a flag for it).
pub const EMPTY_PING: &[u8] = &[0x80 | OP_PING, 0];

/// Whether `bytes` are whole client pongs and nothing else (each final, masked, no
/// RSV bits, at most 125 bytes of payload): what a parked session's socket may hold
/// without waking the session.
pub fn only_pongs(mut bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return false;
    }
    while let [first, second, rest @ ..] = bytes {
        let len = usize::from(second & 0x7F);
        if *first != 0x80 | OP_PONG || second & 0x80 == 0 || len > 125 || rest.len() < 4 + len {
            return false;
        }
        bytes = &rest[4 + len..];
    }
    bytes.is_empty()
}

/// Decoder state for one connection: the fragments of a message in progress.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    /// `permessage-deflate` was negotiated: RSV1 marks a compressed message.
    inflate: bool,
    /// The message being received in fragments, if any.
    partial: Option<Partial>,
}

/// A fragmented message in progress.
#[derive(Debug)]
struct Partial {
    text: bool,
    /// Its fragments are compressed: checked and inflated once it is whole.
    compressed: bool,
    payload: BytesMut,
    /// For text: how many leading bytes of `payload` are known to be valid UTF-8. Each
    /// fragment is checked as it arrives (RFC 6455 8.1: fail fast), so only an
    /// unfinished character at the end (at most 3 bytes) is ever checked twice.
    valid_up_to: usize,
}

impl Partial {
    /// The first fragment of a message.
    fn start(text: bool, compressed: bool, payload: BytesMut) -> Result<Self, DecodeError> {
        let mut partial = Self { text, compressed, payload, valid_up_to: 0 };
        partial.check()?;
        Ok(partial)
    }

    /// Append a fragment.
    fn extend(&mut self, fragment: &[u8]) -> Result<(), DecodeError> {
        self.payload.extend_from_slice(fragment);
        self.check()
    }

    /// For text, fail as soon as the bytes so far cannot begin valid UTF-8 (an
    /// unfinished character at the end is not yet an error).
    fn check(&mut self) -> Result<(), DecodeError> {
        if self.text && !self.compressed {
            match std::str::from_utf8(&self.payload[self.valid_up_to..]) {
                Ok(_) => self.valid_up_to = self.payload.len(),
                Err(e) if e.error_len().is_none() => self.valid_up_to += e.valid_up_to(),
                Err(_) => return Err(DecodeError::InvalidUtf8),
            }
        }
        Ok(())
    }

    /// The whole message, once its last fragment arrived.
    fn finish(self, max_message: usize) -> Result<Event, DecodeError> {
        if self.compressed {
            let payload = super::deflate::inflate(&self.payload, max_message, self.text)?;
            return Ok(Event::Message { text: self.text, payload });
        }
        if self.text && self.valid_up_to != self.payload.len() {
            return Err(DecodeError::InvalidUtf8); // ends inside a character
        }
        Ok(Event::Message { text: self.text, payload: self.payload.freeze() })
    }
}

impl Decoder {
    pub fn new(max_message: usize) -> Self {
        Self { max_message, inflate: false, partial: None }
    }

    /// A decoder for a connection that negotiated `permessage-deflate`.
    pub fn with_inflate(max_message: usize) -> Self {
        Self { max_message, inflate: true, partial: None }
    }

    /// No fragmented message is in progress: a decoder made anew would carry on the
    /// same (what a session checks before it parks).
    pub fn is_idle(&self) -> bool {
        self.partial.is_none()
    }

    /// Decode the next complete event from `buf`, consuming its bytes. `Ok(None)` means
    /// more bytes are needed; the buffer is then reserved for the rest of the frame.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, DecodeError> {
        loop {
            let Some(header) = parse_header(buf, self.inflate)? else {
                return Ok(None);
            };
            let is_control = header.opcode >= 0x8;
            if !is_control {
                let so_far = self.partial.as_ref().map_or(0, |p| p.payload.len());
                // A compressed message may take a little more than the limit before it
                // inflates: deflate stores what does not compress, with a few bytes of
                // framing per block. Its inflated size is held to the limit itself.
                let compressed = self.partial.as_ref().map_or(header.compressed, |p| p.compressed);
                let limit = if compressed {
                    super::deflate::compressed_bound(self.max_message)
                } else {
                    self.max_message
                };
                if so_far as u64 + header.len > limit as u64 {
                    return Err(DecodeError::TooBig(self.max_message));
                }
            }
            let total = header.header_len + header.len as usize;
            if buf.len() < total {
                buf.reserve(total - buf.len());
                return Ok(None);
            }
            let mut frame = buf.split_to(total);
            let mut payload = frame.split_off(header.header_len);
            unmask(&mut payload, header.mask);

            match header.opcode {
                OP_TEXT | OP_BINARY => {
                    if self.partial.is_some() {
                        return Err(DecodeError::Protocol("new data frame inside a fragmented message"));
                    }
                    let text = header.opcode == OP_TEXT;
                    if header.fin && !header.compressed {
                        return finish(text, payload.freeze()).map(Some);
                    }
                    let partial = Partial::start(text, header.compressed, payload)?;
                    if header.fin {
                        return partial.finish(self.max_message).map(Some);
                    }
                    self.partial = Some(partial);
                }
                OP_CONTINUATION => {
                    let Some(mut partial) = self.partial.take() else {
                        return Err(DecodeError::Protocol("continuation without a message in progress"));
                    };
                    if header.compressed {
                        return Err(DecodeError::Protocol("RSV1 set on a continuation frame"));
                    }
                    partial.extend(&payload)?;
                    if header.fin {
                        return partial.finish(self.max_message).map(Some);
                    }
                    self.partial = Some(partial);
                }
                OP_PING => return Ok(Some(Event::Ping(payload.freeze()))),
                OP_PONG => return Ok(Some(Event::Pong(payload.freeze()))),
                OP_CLOSE => return parse_close(payload.freeze()).map(Some),
                _ => unreachable!("parse_header rejects unknown opcodes"),
            }
        }
    }
}

fn finish(text: bool, payload: Bytes) -> Result<Event, DecodeError> {
    if text && std::str::from_utf8(&payload).is_err() {
        return Err(DecodeError::InvalidUtf8);
    }
    Ok(Event::Message { text, payload })
}

fn parse_close(payload: Bytes) -> Result<Event, DecodeError> {
    match payload.len() {
        0 => Ok(Event::Close { code: None, reason: Bytes::new() }),
        1 => Err(DecodeError::Protocol("close frame with a one-byte body")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !valid_close_code(code) {
                return Err(DecodeError::Protocol("invalid close code"));
            }
            let reason = payload.slice(2..);
            if std::str::from_utf8(&reason).is_err() {
                return Err(DecodeError::InvalidUtf8);
            }
            Ok(Event::Close { code: Some(code), reason })
        }
    }
}

/// Close codes a peer may send (RFC 6455 section 7.4 and the IANA registry).
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

struct Header {
    fin: bool,
    /// RSV1: the message this frame starts is compressed (`permessage-deflate`).
    compressed: bool,
    opcode: u8,
    mask: [u8; 4],
    len: u64,
    header_len: usize,
}

fn parse_header(buf: &[u8], inflate: bool) -> Result<Option<Header>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let compressed = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 || (compressed && !inflate) {
        return Err(DecodeError::Protocol("reserved bits set without a negotiated extension"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if compressed {
                return Err(DecodeError::Protocol("RSV1 set on a control frame"));
            }
            if !fin {
                return Err(DecodeError::Protocol("fragmented control frame"));
            }
            if b1 & 0x7F > 125 {
                return Err(DecodeError::Protocol("control frame longer than 125 bytes"));
            }
        }
        _ => return Err(DecodeError::Protocol("unknown opcode")),
    }
    if b1 & 0x80 == 0 {
        return Err(DecodeError::Protocol("client frame is not masked"));
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let len = u16::from_be_bytes([buf[2], buf[3]]) as u64;
            if len < 126 {
                return Err(DecodeError::Protocol("length not minimally encoded"));
            }
            (len, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(DecodeError::Protocol("length with the most significant bit set"));
            }
            if len <= u16::MAX as u64 {
                return Err(DecodeError::Protocol("length not minimally encoded"));
            }
            (len, 10)
        }
        n => (n as u64, 2),
    };
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mask = buf[at..at + 4].try_into().expect("4 bytes");
    at += 4;
    Ok(Some(Header { fin, compressed, opcode, mask, len, header_len: at }))
}

/// XOR the payload with the client's masking key, eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Encode one unmasked, unfragmented server frame.
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    put_header(&mut out, 0x80 | opcode, payload.len());
    out.extend_from_slice(payload);
    out.freeze()
}

/// Write a server frame's header: its first byte (FIN, RSV bits, opcode) and the
/// length of a payload of `len` bytes.
pub fn put_header(out: &mut BytesMut, first: u8, len: usize) {
    out.put_u8(first);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// The opcode and payload of one whole, unmasked frame that [`encode`] made; `None`
/// for anything else.
pub fn decode_server_frame(frame: &Bytes) -> Option<(u8, Bytes)> {
    let first = *frame.first()?;
    let second = *frame.get(1)?;
    if first & 0x80 == 0 || second & 0x80 != 0 {
        return None;
    }
    let (len, start) = match second & 0x7f {
        126 => (usize::from(u16::from_be_bytes(frame.get(2..4)?.try_into().ok()?)), 4),
        127 => (usize::try_from(u64::from_be_bytes(frame.get(2..10)?.try_into().ok()?)).ok()?, 10),
        len => (usize::from(len), 2),
    };
    (frame.len() == start + len).then(|| (first & 0x0f, frame.slice(start..)))
}

/// Encode a close frame; the reason is cut to fit the 125-byte control frame limit
/// on a character boundary.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut body = Vec::with_capacity(2 + end);
    body.extend_from_slice(&code.to_be_bytes());
    body.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OP_CLOSE, &body)
}

/// Build a masked client frame (used by tests and the load generator).
pub fn encode_client(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let len = payload.len();
    let mut out = Vec::with_capacity(len + 14);
    out.push(if fin { 0x80 } else { 0 } | opcode);
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_masked_pongs_pass() {
        let pong = [0x8A, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        assert!(only_pongs(&pong));
        assert!(only_pongs(&[pong, pong].concat()));
        assert!(!only_pongs(&pong[..7]), "part of a pong");
        assert!(!only_pongs(&[0x8A, 0x02, b'h', b'i']), "unmasked");
        assert!(!only_pongs(&[0x89, 0x80, 1, 2, 3, 4]), "a ping");
        assert!(!only_pongs(&[0x0A, 0x80, 1, 2, 3, 4]), "not final");
        assert!(!only_pongs(&[0x81, 0x80, 1, 2, 3, 4]), "a text frame");
        assert!(!only_pongs(&[pong.as_slice(), &[0x81, 0x80, 1, 2, 3, 4]].concat()), "a pong, then data");
        assert!(!only_pongs(&[]));
    }

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A client frame with RSV1 set.
    fn rsv1(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = encode_client(fin, opcode, payload, MASK);
        frame[0] |= 0x40;
        frame
    }

    /// The raw deflate of `text`, as a client would send it (sync flush, tail dropped).
    fn deflated(text: &[u8]) -> Vec<u8> {
        let frame = super::super::deflate::compress_frame(OP_TEXT, text, 15).expect("compressible");
        let plain = Bytes::from([&[frame[0] & !0x40][..], &frame[1..]].concat());
        decode_server_frame(&plain).unwrap().1.to_vec()
    }

    #[test]
    fn compressed_messages_with_permessage_deflate() {
        let text = "bonjour ".repeat(200);
        let data = deflated(text.as_bytes());
        // Whole, then in three fragments (RSV1 on the first only).
        let (a, b) = data.split_at(data.len() / 3);
        let (b, c) = b.split_at(b.len() / 2);
        let mut bytes = rsv1(true, OP_TEXT, &data);
        bytes.extend(rsv1(false, OP_TEXT, a));
        bytes.extend(encode_client(false, OP_CONTINUATION, b, MASK));
        bytes.extend(encode_client(true, OP_PING, b"p", MASK));
        bytes.extend(encode_client(true, OP_CONTINUATION, c, MASK));
        let mut decoder = Decoder::with_inflate(1 << 20);
        let mut buf = BytesMut::from(&bytes[..]);
        let whole = || Event::Message { text: true, payload: Bytes::from(text.clone()) };
        assert_eq!(decoder.decode(&mut buf), Ok(Some(whole())));
        assert_eq!(decoder.decode(&mut buf), Ok(Some(Event::Ping(Bytes::from_static(b"p")))));
        assert_eq!(decoder.decode(&mut buf), Ok(Some(whole())));
        // Plain messages still pass.
        let mut buf = BytesMut::from(&encode_client(true, OP_TEXT, b"plain", MASK)[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Event::Message { text: true, payload: Bytes::from("plain") }))
        );
        // The limit applies to the inflated size.
        let mut buf = BytesMut::from(&rsv1(true, OP_TEXT, &data)[..]);
        assert_eq!(Decoder::with_inflate(1000).decode(&mut buf), Err(DecodeError::TooBig(1000)));
    }

    #[test]
    fn rsv1_where_it_may_not_be() {
        let data = deflated("hello hello hello hello hello".as_bytes());
        let cases: Vec<(&str, bool, Vec<u8>)> = vec![
            ("not negotiated", false, rsv1(true, OP_TEXT, &data)),
            (
                "on a continuation",
                true,
                [rsv1(false, OP_TEXT, &data), rsv1(true, OP_CONTINUATION, b"")].concat(),
            ),
            ("on a ping", true, rsv1(true, OP_PING, b"")),
            ("on a close", true, rsv1(true, OP_CLOSE, &1000u16.to_be_bytes())),
        ];
        for (name, inflate, bytes) in cases {
            let mut decoder = if inflate { Decoder::with_inflate(1 << 20) } else { Decoder::new(1 << 20) };
            let mut buf = BytesMut::from(&bytes[..]);
            let result = loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            };
            assert!(matches!(result, Err(DecodeError::Protocol(_))), "{name}: {result:?}");
        }
        // RSV2 and RSV3 stay reserved.
        for bit in [0x20, 0x10] {
            let mut frame = encode_client(true, OP_TEXT, b"x", MASK);
            frame[0] |= bit;
            let mut buf = BytesMut::from(&frame[..]);
            assert!(matches!(Decoder::with_inflate(1024).decode(&mut buf), Err(DecodeError::Protocol(_))));
        }
        // A corrupt stream and invalid UTF-8 inside one are 1007.
        let mut buf = BytesMut::from(&rsv1(true, OP_BINARY, &[0xff, 0xfe, 0xfd])[..]);
        let error = Decoder::with_inflate(1024).decode(&mut buf).unwrap_err();
        assert_eq!(error.close_code(), close_code::INVALID_DATA);
        let mut bad = vec![b'a'; 500];
        bad[250] = 0xc3;
        let mut buf = BytesMut::from(&rsv1(true, OP_TEXT, &deflated(&bad))[..]);
        assert_eq!(Decoder::with_inflate(1024).decode(&mut buf), Err(DecodeError::InvalidUtf8));
    }

    fn decode_all(bytes: &[u8], max: usize) -> Vec<Result<Event, DecodeError>> {
        let mut decoder = Decoder::new(max);
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(event)) => out.push(Ok(event)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn round_trip_lengths() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let wire = encode_client(true, OP_BINARY, &payload, MASK);
            let events = decode_all(&wire, 1 << 20);
            assert_eq!(
                events,
                vec![Ok(Event::Message { text: false, payload: Bytes::from(payload.clone()) })],
                "len {len}"
            );
            let server = encode(OP_BINARY, &payload);
            assert_eq!(
                server.len(),
                len + if len < 126 {
                    2
                } else if len < 65536 {
                    4
                } else {
                    10
                }
            );
        }
    }

    #[test]
    fn byte_at_a_time() {
        let mut wire = encode_client(false, OP_TEXT, b"hel", MASK);
        wire.extend(encode_client(true, OP_PING, b"p", MASK));
        wire.extend(encode_client(true, OP_CONTINUATION, b"lo", MASK));
        let mut decoder = Decoder::new(1024);
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        for byte in wire {
            buf.put_u8(byte);
            while let Some(event) = decoder.decode(&mut buf).unwrap() {
                events.push(event);
            }
        }
        assert_eq!(
            events,
            vec![
                Event::Ping(Bytes::from_static(b"p")),
                Event::Message { text: true, payload: Bytes::from_static(b"hello") }
            ]
        );
    }

    /// RFC 6455 8.1: a text message fails at the fragment that makes it invalid, not at
    /// its end; a character split across fragments is fine.
    #[test]
    fn invalid_utf8_fails_at_its_fragment() {
        let euro = "€".as_bytes(); // three bytes
        let mut decoder = Decoder::new(1024);
        let mut buf = BytesMut::new();
        buf.extend(encode_client(false, OP_TEXT, &euro[..1], MASK));
        buf.extend(encode_client(false, OP_CONTINUATION, &euro[1..], MASK));
        buf.extend(encode_client(true, OP_CONTINUATION, b"!", MASK));
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Event::Message { text: true, payload: Bytes::from("€!") }))
        );

        // The second fragment breaks the text; no final fragment ever comes.
        buf.extend(encode_client(false, OP_TEXT, b"ok ", MASK));
        buf.extend(encode_client(false, OP_CONTINUATION, &[0xce, 0xba, 0xff], MASK));
        assert_eq!(decoder.decode(&mut buf), Err(DecodeError::InvalidUtf8));

        // A message that ends inside a character fails at its end.
        let mut decoder = Decoder::new(1024);
        buf.clear();
        buf.extend(encode_client(false, OP_TEXT, b"a", MASK));
        buf.extend(encode_client(true, OP_CONTINUATION, &euro[..2], MASK));
        assert_eq!(decoder.decode(&mut buf), Err(DecodeError::InvalidUtf8));
    }

    #[test]
    fn size_limit_counts_fragments() {
        let mut wire = encode_client(false, OP_BINARY, &[0; 60], MASK);
        wire.extend(encode_client(true, OP_CONTINUATION, &[0; 60], MASK));
        assert_eq!(decode_all(&wire, 100).pop(), Some(Err(DecodeError::TooBig(100))));
        assert!(matches!(decode_all(&wire, 120).pop(), Some(Ok(Event::Message { .. }))));
    }

    #[test]
    fn unmask_matches_bytewise() {
        for len in 0..40 {
            let mut data: Vec<u8> = (0..len as u8).collect();
            let expect: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]).collect();
            unmask(&mut data, MASK);
            assert_eq!(data, expect);
        }
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let frame = encode_close(1008, &"é".repeat(100));
        assert!(frame.len() <= 127);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }
}
