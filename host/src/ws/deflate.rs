//! Per-message compression, `permessage-deflate` (RFC 7692): the negotiation, the
//! inflation of client messages and the deflation of server messages.
//!
//! **Stateless on both sides.** The server always answers with
//! `server_no_context_takeover` and `client_no_context_takeover`, which RFC 7692 lets
//! it do whatever the offer said (7.1.1.1, 7.1.1.2). So every message is compressed on
//! its own: a broadcast is deflated once and the same frame goes to every member that
//! negotiated the same window, and no connection keeps a compressor or a sliding window
//! between messages. The deflate and inflate states are per thread, reused and reset
//! for each message: an idle compressed connection costs nothing more than a plain one.
//!
//! **Bounded inflation.** A client message is inflated as a whole once its last
//! fragment arrived (its compressed size is bounded by the message limit like any
//! message), into a buffer that may grow only to the message limit: a small frame that
//! would inflate to gigabytes fails at the limit (1009). Text is checked for UTF-8 as
//! it inflates.

use std::cell::RefCell;

use bytes::{BufMut as _, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::frame::DecodeError;

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// What a connection agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// The window the server deflates its messages with (`server_max_window_bits`,
    /// 9 to 15), or `None` when the client asked for 8: zlib cannot deflate with a
    /// 256-byte window, so the server sends that client plain messages (RFC 7692 lets
    /// any message go uncompressed).
    pub server_window: Option<u8>,
}

/// The first acceptable `permessage-deflate` offer among the `Sec-WebSocket-Extensions`
/// header values, in order, and the answer to send; `None` if there is none. Offers
/// with unknown or repeated parameters or bad values are skipped (RFC 7692 5: the
/// server declines them).
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<(Agreement, String)> {
    values.into_iter().flat_map(split_list).find_map(accept)
}

/// The elements of one header value (`a; x=1, b` → `a; x=1`, `b`), commas inside
/// quoted strings kept.
fn split_list(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (at, byte) in value.bytes().enumerate() {
        match byte {
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                out.push(&value[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    out.push(&value[start..]);
    out
}

/// The answer to one offer, if it is a valid `permessage-deflate` offer.
fn accept(offer: &str) -> Option<(Agreement, String)> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut seen = [false; 4];
    let mut server_bits = None;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim())?)),
            None => (param, None),
        };
        let index = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return None,
        };
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
        match index {
            0 | 1 if value.is_some() => return None,
            2 => server_bits = Some(window_bits(value?)?),
            3 => {
                if let Some(value) = value {
                    window_bits(value)?;
                }
            }
            _ => {}
        }
    }
    let mut answer = format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
    if let Some(bits) = server_bits {
        answer.push_str(&format!("; server_max_window_bits={bits}"));
    }
    let server_window = match server_bits {
        Some(8) => None,
        Some(bits) => Some(bits),
        None => Some(15),
    };
    Some((Agreement { server_window }, answer))
}

/// A parameter value, without the quotes of a quoted string.
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(value),
    }
}

/// A window-bits value: 8 to 15, written without leading zeros (RFC 7692 7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// The most compressed bytes a message of at most `max` bytes may take: deflate's
/// worst case (stored blocks: 5 bytes of framing per block of up to 64 KiB) with room
/// for a sender that flushes more often, and a few bytes of end.
pub fn compressed_bound(max: usize) -> usize {
    max.saturating_add(max / 1024).saturating_add(64)
}

/// The bytes RFC 7692 has senders strip from the end of a message and receivers add.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

thread_local! {
    /// One inflater per thread, reset for each message (clients compress without
    /// context takeover), with the widest window a client may use.
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new_with_window_bits(false, 15));
    /// One deflater per thread and window size, made when first needed.
    static DEFLATERS: RefCell<[Option<Compress>; 7]> = const { RefCell::new([const { None }; 7]) };
    /// Where a message is deflated before its frame is built.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Inflate a compressed message (its frames' payloads, joined) into at most `max`
/// bytes; text must be UTF-8, checked as it inflates.
pub fn inflate(compressed: &[u8], max: usize, text: bool) -> Result<Bytes, DecodeError> {
    INFLATER.with_borrow_mut(|inflater| {
        inflater.reset(false);
        let result = inflate_with(inflater, compressed, max, text);
        inflater.reset(false);
        result
    })
}

fn inflate_with(
    inflater: &mut Decompress,
    compressed: &[u8],
    max: usize,
    text: bool,
) -> Result<Bytes, DecodeError> {
    let corrupt = || DecodeError::Corrupt;
    // A first guess at the size; it grows as needed, to at most one byte past `max`
    // (which is how going past it shows).
    let mut out: Vec<u8> =
        Vec::with_capacity(compressed.len().saturating_mul(4).max(64).min(max.saturating_add(1)));
    let mut valid_up_to = 0;
    'inputs: for input in [compressed, &TAIL[..]] {
        let mut consumed = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() > max {
                    return Err(DecodeError::TooBig(max));
                }
                let more = out.len().max(4096).min(max + 1 - out.len());
                out.reserve_exact(more);
            }
            let (before_in, before_out) = (inflater.total_in(), out.len());
            let status = inflater
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                .map_err(|_| corrupt())?;
            consumed += (inflater.total_in() - before_in) as usize;
            if out.len() > max {
                return Err(DecodeError::TooBig(max));
            }
            if text {
                valid_up_to = check_utf8(&out, valid_up_to)?;
            }
            if status == Status::StreamEnd {
                // A final block: the message ends here (whatever follows is ignored).
                break 'inputs;
            }
            let stuck = consumed == input.len() && out.len() < out.capacity();
            if stuck
                || (inflater.total_in() == before_in && out.len() == before_out && out.len() < out.capacity())
            {
                break;
            }
        }
    }
    if text && valid_up_to != out.len() {
        return Err(DecodeError::InvalidUtf8); // ends inside a character
    }
    Ok(Bytes::from(out))
}

/// How many leading bytes of `out` are valid UTF-8, knowing the first `from` are;
/// an error if what follows cannot begin valid UTF-8.
fn check_utf8(out: &[u8], from: usize) -> Result<usize, DecodeError> {
    match std::str::from_utf8(&out[from..]) {
        Ok(_) => Ok(out.len()),
        Err(e) if e.error_len().is_none() => Ok(from + e.valid_up_to()),
        Err(_) => Err(DecodeError::InvalidUtf8),
    }
}

/// A server frame carrying `payload` deflated with a `window`-bit window (9 to 15),
/// RSV1 set; `None` if deflating does not make it smaller.
pub fn compress_frame(opcode: u8, payload: &[u8], window: u8) -> Option<Bytes> {
    let slot = usize::from(window.clamp(9, 15) - 9);
    SCRATCH.with_borrow_mut(|scratch| {
        DEFLATERS.with_borrow_mut(|deflaters| {
            let deflater = deflaters[slot].get_or_insert_with(|| {
                Compress::new_with_window_bits(Compression::default(), false, slot as u8 + 9)
            });
            scratch.clear();
            let done = deflate(deflater, payload, scratch);
            deflater.reset();
            done
        })?;
        // A sync flush ends with an empty stored block, which RFC 7692 has senders drop.
        let data = scratch.strip_suffix(&TAIL)?;
        if data.len() >= payload.len() {
            return None;
        }
        let mut frame = BytesMut::with_capacity(data.len() + 10);
        super::frame::put_header(&mut frame, 0x80 | 0x40 | opcode, data.len());
        frame.put_slice(data);
        Some(frame.freeze())
    })
}

/// Deflate `payload` with a sync flush into `out`.
fn deflate(deflater: &mut Compress, payload: &[u8], out: &mut Vec<u8>) -> Option<()> {
    out.reserve(payload.len() + 64);
    let mut consumed = 0;
    loop {
        let before = deflater.total_in();
        deflater.compress_vec(&payload[consumed..], out, FlushCompress::Sync).ok()?;
        consumed += (deflater.total_in() - before) as usize;
        // Done when all input is in and the flush had room to finish.
        if consumed == payload.len() && out.len() < out.capacity() {
            return Some(());
        }
        out.reserve(out.capacity().max(1024));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(offers: &[&str]) -> Option<String> {
        negotiate(offers.iter().copied()).map(|(_, answer)| answer)
    }

    const PLAIN: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn offers_are_answered_or_declined() {
        assert_eq!(answer(&["permessage-deflate"]).as_deref(), Some(PLAIN));
        // Chromium's and Firefox's offer.
        assert_eq!(answer(&["permessage-deflate; client_max_window_bits"]).as_deref(), Some(PLAIN));
        assert_eq!(answer(&["PerMessage-Deflate; Client_No_Context_Takeover"]).as_deref(), Some(PLAIN));
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=10; client_max_window_bits=12"]),
            Some(format!("{PLAIN}; server_max_window_bits=10"))
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=\"9\""]),
            Some(format!("{PLAIN}; server_max_window_bits=9"))
        );
        // Several alternatives: the first valid one wins, across header lines too.
        assert_eq!(
            answer(&[
                "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=7",
                "permessage-deflate; server_max_window_bits=11, permessage-deflate"
            ]),
            Some(format!("{PLAIN}; server_max_window_bits=11"))
        );
        for invalid in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; server_max_window_bits=1a",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_max_window_bits=9; server_max_window_bits=10",
            "permessage-deflate; unknown",
            "permessage-deflate; max_window_bits=10",
            "permessage-deflate; server_max_window_bits=\"10",
            "deflate-frame",
            "",
        ] {
            assert_eq!(answer(&[invalid]), None, "{invalid}");
        }
        let (agreement, _) = negotiate(["permessage-deflate; server_max_window_bits=8"]).unwrap();
        assert_eq!(agreement.server_window, None, "a 256-byte window: sent plain");
        let (agreement, _) = negotiate(["permessage-deflate; client_max_window_bits=8"]).unwrap();
        assert_eq!(agreement.server_window, Some(15));
    }

    /// The payload of a frame `compress_frame` made, RSV1 checked.
    fn deflated(frame: &Bytes) -> Vec<u8> {
        assert_eq!(frame[0] & 0x70, 0x40, "RSV1 and only it");
        let (_, payload) = super::super::frame::decode_server_frame(&Bytes::from(
            [&[frame[0] & !0x40][..], &frame[1..]].concat(),
        ))
        .unwrap();
        payload.to_vec()
    }

    #[test]
    fn deflated_frames_inflate_back_at_every_window() {
        let text: String =
            (0..400).map(|n| format!("{{\"user\":\"u{}\",\"text\":\"hello {n}\"}}", n % 7)).collect();
        for window in 9..=15 {
            let frame = compress_frame(0x1, text.as_bytes(), window).expect("JSON compresses");
            assert!(frame.len() < text.len() / 3, "{} of {}", frame.len(), text.len());
            let data = deflated(&frame);
            assert_eq!(inflate(&data, 1 << 20, true).unwrap(), text.as_bytes(), "window {window}");
            // Each message stands alone: the same bytes again give the same frame.
            assert_eq!(compress_frame(0x1, text.as_bytes(), window).unwrap(), frame);
        }
        // Random bytes do not shrink: sent plain.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: Vec<u8> = (0..2000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        assert_eq!(compress_frame(0x2, &noise, 15), None);
    }

    #[test]
    fn inflation_is_bounded_and_checks_utf8() {
        let zeros = vec![b'a'; 10 << 20];
        let frame = compress_frame(0x1, &zeros, 15).unwrap();
        let data = deflated(&frame);
        assert!(data.len() < 20 << 10, "{}", data.len());
        assert_eq!(inflate(&data, 1 << 20, true), Err(DecodeError::TooBig(1 << 20)));
        assert_eq!(inflate(&data, 10 << 20, false).unwrap().len(), 10 << 20);
        // Exactly at the limit is fine.
        let small = deflated(&compress_frame(0x1, &[b'b'; 4096], 15).unwrap());
        assert_eq!(inflate(&small, 4096, true).unwrap().len(), 4096);
        assert_eq!(inflate(&small, 4095, true), Err(DecodeError::TooBig(4095)));

        let mut bad = vec![b'x'; 3000];
        bad[1500] = 0xff;
        let data = deflated(&compress_frame(0x1, &bad, 15).unwrap());
        assert_eq!(inflate(&data, 1 << 20, true), Err(DecodeError::InvalidUtf8));
        assert_eq!(inflate(&data, 1 << 20, false).unwrap(), bad);
        // Ends inside a character.
        let mut cut = "é".repeat(1000).into_bytes();
        cut.pop();
        let data = deflated(&compress_frame(0x1, &cut, 15).unwrap());
        assert_eq!(inflate(&data, 1 << 20, true), Err(DecodeError::InvalidUtf8));

        assert_eq!(inflate(&[0xff, 0xff, 0xff], 1 << 20, false), Err(DecodeError::Corrupt));
        // An empty message, and one that ends with a final block.
        assert_eq!(inflate(&[0x00], 1024, true).unwrap(), b"".as_slice());
        assert_eq!(inflate(&[0x03, 0x00], 1024, true).unwrap(), b"".as_slice());
        assert_eq!(inflate(&[], 1024, true).unwrap(), b"".as_slice());
    }
}
