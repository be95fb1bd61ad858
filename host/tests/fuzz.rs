//! Property-based fuzzing of the parsers that face the network: the RFC 6455 frame
//! decoder (`roomcast::ws::frame`, with compressed messages: `roomcast::ws::deflate`,
//! against flate2's own encoder), the upgrade-request checks
//! (`roomcast::ws::handshake`) and the room protocol's codec (`roomcast::protocol`).
//!
//! It runs on stable with `proptest`. Every property is checked against an independent
//! reading of the RFC written here (a reference frame decoder, a percent decoder, the
//! `Sec-WebSocket-Accept` computation, an origin model), never against the code under
//! test. Properties that admit more than one correct answer (which of two violations in
//! one frame is reported, whether a frame that has not fully arrived is already refused)
//! accept every correct answer, so a stricter or earlier-failing decoder still passes.
//!
//! The environment sets how much runs; unset, the run is the short, deterministic one CI
//! does (a fixed seed, `DEFAULT_CASES` cases per property):
//! - `ROOMCAST_FUZZ_CASES`: cases per batch (default 1024);
//! - `ROOMCAST_FUZZ_SECONDS`: run batches of that many cases until this many seconds
//!   have passed, per property (default 0: one batch);
//! - `ROOMCAST_FUZZ_SEED`: the first batch's seed, a `u64` or `random` (each further
//!   batch adds to it); a failure names the seed and case count that reproduce it.
//!
//! Each property prints `fuzz: NAME: N cases ...` (seen with `-- --nocapture`);
//! `scripts/fuzz` runs them all for minutes in release. A failing case is shrunk, and
//! its seed is saved in `host/tests/fuzz.proptest-regressions`, which every later run
//! replays first: commit that file with the fix.

use std::fmt::Debug;
use std::hash::{BuildHasher, RandomState};
use std::time::Instant;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed, TestCaseResult, TestRunner};
use roomcast::config::OriginPolicy;
use roomcast::ws::frame::{self, DecodeError, Decoder, Event};
use roomcast::ws::handshake::{self, Rejection, Valid};
use sha1::{Digest, Sha1};

// ---------------------------------------------------------------------------------
// The runner: case count, seed and time budget from the environment.
// ---------------------------------------------------------------------------------

/// Cases per property in the default (CI) run: a few seconds for all of them in debug.
const DEFAULT_CASES: u32 = 1024;
/// The seed of the default run ("Roomcast" in ASCII).
const DEFAULT_SEED: u64 = 0x526f_6f6d_6361_7374;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| panic!("{name}={text:?} is not valid")),
        Err(_) => default,
    }
}

/// Check `test` on values drawn from `strategy`, in batches, as the environment says.
fn fuzz<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> TestCaseResult)
where
    S: Strategy,
    S::Value: Debug,
{
    let cases: u32 = env_or("ROOMCAST_FUZZ_CASES", DEFAULT_CASES);
    let seconds: f64 = env_or("ROOMCAST_FUZZ_SECONDS", 0.0);
    let seed = match std::env::var("ROOMCAST_FUZZ_SEED").as_deref() {
        Ok("random") => RandomState::new().hash_one(name),
        _ => env_or("ROOMCAST_FUZZ_SEED", DEFAULT_SEED),
    };
    let start = Instant::now();
    let mut batches: u64 = 0;
    loop {
        let batch_seed = seed.wrapping_add(batches);
        let config = Config {
            cases,
            rng_seed: RngSeed::Fixed(batch_seed),
            failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
            source_file: Some(file!()),
            max_shrink_time: 120_000,
            ..Config::default()
        };
        if let Err(error) = TestRunner::new(config).run(&strategy, &test) {
            panic!(
                "fuzz: {name} failed; reproduce with ROOMCAST_FUZZ_SEED={batch_seed} \
                 ROOMCAST_FUZZ_CASES={cases} cargo test -p roomcast --test fuzz {name}\n{error}"
            );
        }
        batches += 1;
        if start.elapsed().as_secs_f64() >= seconds {
            break;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let total = batches * u64::from(cases);
    eprintln!(
        "fuzz: {name}: {total} cases in {elapsed:.1} s ({:.0} cases/s), seed {seed}",
        total as f64 / elapsed.max(1e-9)
    );
}

// ---------------------------------------------------------------------------------
// Frames: encoding client frames and a reference decoder.
// ---------------------------------------------------------------------------------

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

const PROTOCOL_ERROR: u16 = 1002;
const INVALID_DATA: u16 = 1007;
const TOO_BIG: u16 = 1009;

/// Close codes a peer may send: RFC 6455 section 7.4.1 and the IANA registry, less the
/// ones reserved for local use (1004 to 1006, 1015).
fn peer_may_send(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Whether `bytes` can begin a valid UTF-8 text (it may end inside a character).
fn utf8_prefix(bytes: &[u8]) -> bool {
    match std::str::from_utf8(bytes) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none(),
    }
}

fn utf8(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok()
}

fn masked(payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect()
}

/// A client frame as RFC 6455 section 5.2 draws it, with a minimal length.
fn client_frame(fin: bool, opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len < 1 << 16 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    out.extend(masked(payload, key));
    out
}

/// What a correct strict decoder must do with a byte stream.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// No error: every complete frame decodes, a trailing partial frame waits.
    Clean,
    /// The stream fails with one of these close codes (several when one frame breaks
    /// several rules).
    Fails(Vec<u16>),
    /// The trailing partial frame already shows an error with one of these codes; a
    /// decoder may fail now or wait for the rest of the frame.
    MayFail(Vec<u16>),
    /// A close frame arrived; what follows it is not checked.
    Closed,
}

/// The events a correct strict decoder delivers, then its verdict.
#[derive(Debug)]
struct Expected {
    events: Vec<Event>,
    verdict: Verdict,
}

/// A reference decoder for client frames, written from RFC 6455 sections 5 and 8 and
/// independent of `roomcast::ws::frame`: strict (reserved bits, opcodes, masking, minimal
/// lengths, control frame rules, close codes), messages over `max` bytes are refused
/// from the header that makes them too big, and a text message fails at the first
/// fragment after which it can no longer be valid UTF-8 (section 8.1, "fail fast").
fn reference(input: &[u8], max: usize) -> Expected {
    let mut events = Vec::new();
    let mut partial: Option<(bool, Vec<u8>)> = None;
    let mut at = 0;
    loop {
        let frame = &input[at..];
        let mut codes = Vec::new();
        let waiting = |codes: Vec<u16>, events: Vec<Event>| Expected {
            events,
            verdict: if codes.is_empty() { Verdict::Clean } else { Verdict::MayFail(codes) },
        };
        let Some(&b0) = frame.first() else {
            return waiting(codes, events);
        };
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        let control = opcode >= 0x8;
        if b0 & 0x70 != 0 {
            codes.push(PROTOCOL_ERROR); // reserved bits, no extension negotiated
        }
        match opcode {
            CONTINUATION if partial.is_none() => codes.push(PROTOCOL_ERROR),
            TEXT | BINARY if partial.is_some() => codes.push(PROTOCOL_ERROR),
            CLOSE | PING | PONG if !fin => codes.push(PROTOCOL_ERROR),
            CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG => {}
            _ => codes.push(PROTOCOL_ERROR),
        }
        let Some(&b1) = frame.get(1) else {
            return waiting(codes, events);
        };
        let is_masked = b1 & 0x80 != 0;
        if !is_masked {
            codes.push(PROTOCOL_ERROR); // client frames are masked (section 5.1)
        }
        if control && b1 & 0x7F > 125 {
            codes.push(PROTOCOL_ERROR);
        }
        let (len, mut header) = match b1 & 0x7F {
            126 => {
                let Some(ext) = frame.get(2..4) else {
                    return waiting(codes, events);
                };
                let len = u64::from(u16::from_be_bytes([ext[0], ext[1]]));
                if len < 126 {
                    codes.push(PROTOCOL_ERROR); // not minimal
                }
                (len, 4)
            }
            127 => {
                let Some(ext) = frame.get(2..10) else {
                    return waiting(codes, events);
                };
                let len = u64::from_be_bytes(ext.try_into().unwrap());
                if len >> 63 != 0 || len < 1 << 16 {
                    codes.push(PROTOCOL_ERROR); // top bit set, or not minimal
                }
                (len, 10)
            }
            n => (u64::from(n), 2),
        };
        let so_far = partial.as_ref().map_or(0, |(_, p)| p.len());
        if !control && so_far as u64 + len > max as u64 {
            codes.push(TOO_BIG);
        }
        let mut key = [0; 4];
        if is_masked {
            let Some(bytes) = frame.get(header..header + 4) else {
                return waiting(codes, events);
            };
            key.copy_from_slice(bytes);
            header += 4;
        }
        if !codes.is_empty() {
            // Definite once the whole frame is in; before that a decoder may wait (the
            // size limit is checked at the header by `oversized_headers_fail_at_once`).
            let whole = (frame.len() - header) as u64 >= len;
            let verdict = if whole { Verdict::Fails(codes) } else { Verdict::MayFail(codes) };
            return Expected { events, verdict };
        }
        let len = len as usize; // at most `max`, or 125 for a control frame
        if frame.len() < header + len {
            // A streaming decoder may already see invalid text or a bad close frame.
            let got = masked(&frame[header..], key);
            let mut early = Vec::new();
            match (opcode, &partial) {
                (TEXT, _) if !utf8_prefix(&got) => early.push(INVALID_DATA),
                (CONTINUATION, Some((true, so_far))) if !utf8_prefix(&[so_far.as_slice(), &got].concat()) => {
                    early.push(INVALID_DATA)
                }
                (CLOSE, _) => {
                    if len == 1 || (got.len() >= 2 && !peer_may_send(u16::from_be_bytes([got[0], got[1]]))) {
                        early.push(PROTOCOL_ERROR);
                    }
                    if got.len() > 2 && !utf8_prefix(&got[2..]) {
                        early.push(INVALID_DATA);
                    }
                }
                _ => {}
            }
            return waiting(early, events);
        }
        let payload = masked(&frame[header..header + len], key);
        at += header + len;
        match opcode {
            TEXT | BINARY | CONTINUATION => {
                let (text, mut message) = match partial.take() {
                    Some(started) => started,
                    None => (opcode == TEXT, Vec::new()),
                };
                message.extend_from_slice(&payload);
                let valid = if fin { utf8(&message) } else { utf8_prefix(&message) };
                if text && !valid {
                    return Expected { events, verdict: Verdict::Fails(vec![INVALID_DATA]) };
                }
                if fin {
                    events.push(Event::Message { text, payload: Bytes::from(message) });
                } else {
                    partial = Some((text, message));
                }
            }
            PING => events.push(Event::Ping(Bytes::from(payload))),
            PONG => events.push(Event::Pong(Bytes::from(payload))),
            _ => {
                let close = match payload.len() {
                    0 => Event::Close { code: None, reason: Bytes::new() },
                    1 => return Expected { events, verdict: Verdict::Fails(vec![PROTOCOL_ERROR]) },
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        let mut codes = Vec::new();
                        if !peer_may_send(code) {
                            codes.push(PROTOCOL_ERROR);
                        }
                        if !utf8(&payload[2..]) {
                            codes.push(INVALID_DATA);
                        }
                        if !codes.is_empty() {
                            return Expected { events, verdict: Verdict::Fails(codes) };
                        }
                        Event::Close { code: Some(code), reason: Bytes::copy_from_slice(&payload[2..]) }
                    }
                };
                events.push(close);
                return Expected { events, verdict: Verdict::Closed };
            }
        }
    }
}

/// What the decoder under test did with a stream.
#[derive(Debug, PartialEq)]
struct Outcome {
    events: Vec<Event>,
    error: Option<DecodeError>,
    /// Bytes left in the buffer at the end.
    left: usize,
}

/// Whether an event could come from a correct decoder limited to `max`-byte messages.
fn check_event(event: &Event, max: usize) -> TestCaseResult {
    match event {
        Event::Message { text, payload } => {
            prop_assert!(payload.len() <= max, "a {}-byte message with a {max}-byte limit", payload.len());
            prop_assert!(!text || utf8(payload), "a text message that is not UTF-8: {payload:?}");
        }
        Event::Ping(payload) | Event::Pong(payload) => {
            prop_assert!(payload.len() <= 125, "a {}-byte control frame", payload.len());
        }
        Event::Close { code: None, reason } => prop_assert!(reason.is_empty(), "a reason without a code"),
        Event::Close { code: Some(code), reason } => {
            prop_assert!(peer_may_send(*code), "close code {code} delivered");
            prop_assert!(reason.len() <= 123, "a {}-byte close reason", reason.len());
            prop_assert!(utf8(reason), "a close reason that is not UTF-8: {reason:?}");
        }
    }
    Ok(())
}

/// Feed `input` to a fresh decoder in pieces cut at `cuts` (sorted offsets), decoding
/// after each piece until it wants more or fails, and check what every call may do:
/// consume a prefix of what it was given and never grow the buffer, keep saying it
/// needs more until it gets more, deliver events a correct decoder could, and fail
/// only with a close code the server sends for a client's fault.
fn feed(input: &[u8], cuts: &[usize], max: usize) -> Result<Outcome, TestCaseError> {
    let mut decoder = Decoder::new(max);
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut events = Vec::new();
    for end in cuts.iter().copied().chain([input.len()]) {
        buf.extend_from_slice(&input[fed..end]);
        fed = end;
        loop {
            let before = buf.len();
            let result = decoder.decode(&mut buf);
            let left = buf.len();
            prop_assert!(left <= before, "decode grew the buffer from {before} to {left} bytes");
            prop_assert_eq!(&buf[..], &input[fed - left..fed], "decode must consume a prefix");
            match result {
                Ok(Some(event)) => {
                    check_event(&event, max)?;
                    events.push(event);
                    prop_assert!(events.len() <= fed / 2, "more events than frames");
                }
                Ok(None) => {
                    prop_assert_eq!(decoder.decode(&mut buf), Ok(None), "asked again with no new bytes");
                    prop_assert_eq!(buf.len(), left, "consumed bytes when asked again");
                    break;
                }
                Err(error) => {
                    let code = error.close_code();
                    prop_assert!(
                        [PROTOCOL_ERROR, INVALID_DATA, TOO_BIG].contains(&code),
                        "{error} closes with {code}"
                    );
                    return Ok(Outcome { events, error: Some(error), left });
                }
            }
        }
    }
    let left = buf.len();
    Ok(Outcome { events, error: None, left })
}

/// Offsets into a `len`-byte stream, sorted.
fn offsets(cuts: &[Index], len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
    cuts.sort_unstable();
    cuts
}

/// The decoder agrees with the reference on `input`, whole and cut at `cuts`, and the
/// two feeds end the same way.
fn agrees(input: &[u8], cuts: &[Index], max: usize) -> TestCaseResult {
    let whole = feed(input, &[], max)?;
    let pieces = feed(input, &offsets(cuts, input.len()), max)?;
    // Fed in pieces, a decoder that fails stops before it has been given everything, so
    // what is left in its buffer may differ then.
    prop_assert_eq!(
        (&pieces.events, &pieces.error),
        (&whole.events, &whole.error),
        "fed in pieces and whole"
    );
    if whole.error.is_none() {
        prop_assert_eq!(pieces.left, whole.left);
    }
    let expected = reference(input, max);
    let code = whole.error.as_ref().map(DecodeError::close_code);
    match &expected.verdict {
        Verdict::Clean => {
            prop_assert_eq!(&whole.events, &expected.events);
            prop_assert_eq!(&whole.error, &None);
        }
        Verdict::Fails(codes) => {
            prop_assert_eq!(&whole.events, &expected.events);
            prop_assert!(
                code.is_some_and(|c| codes.contains(&c)),
                "got {:?}, wanted one of {codes:?}",
                whole.error
            );
        }
        Verdict::MayFail(codes) => {
            prop_assert_eq!(&whole.events, &expected.events);
            prop_assert!(
                code.is_none_or(|c| codes.contains(&c)),
                "got {:?}, wanted one of {codes:?}",
                whole.error
            );
        }
        Verdict::Closed => {
            let n = expected.events.len();
            prop_assert!(whole.events.len() >= n, "failed before the close: {:?}", whole.error);
            prop_assert_eq!(&whole.events[..n], &expected.events[..]);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Frame strategies.
// ---------------------------------------------------------------------------------

/// A frame as it might come off the wire: any header bits, any length encoding, a
/// declared length that may not match the payload.
#[derive(Debug, Clone)]
struct RawFrame {
    b0: u8,
    is_masked: bool,
    /// 0: minimal length, 1: 16-bit, 2: 64-bit (when the length fits).
    form: u8,
    declared: Option<u64>,
    key: [u8; 4],
    payload: Vec<u8>,
}

impl RawFrame {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.b0);
        let mask_bit = if self.is_masked { 0x80 } else { 0 };
        let len = self.declared.unwrap_or(self.payload.len() as u64);
        if self.form == 0 && len < 126 {
            out.push(mask_bit | len as u8);
        } else if self.form <= 1 && len < 1 << 16 {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
        if self.is_masked {
            out.extend_from_slice(&self.key);
            out.extend(masked(&self.payload, self.key));
        } else {
            out.extend_from_slice(&self.payload);
        }
    }
}

/// Characters that stress UTF-8 handling: every encoded length and its boundaries.
fn any_char() -> impl Strategy<Value = char> {
    prop_oneof![
        2 => any::<char>(),
        1 => select(vec![
            'a', '\0', '\u{7F}', '\u{80}', 'é', '\u{7FF}', '\u{800}', '€', '\u{FFFD}', '\u{FFFF}',
            '\u{10000}', '😀', '\u{10FFFF}',
        ]),
    ]
}

fn any_text(max_chars: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any_char(), 0..=max_chars).prop_map(String::from_iter)
}

/// Byte sequences that are never valid UTF-8 anywhere in a text.
fn invalid_utf8() -> impl Strategy<Value = Vec<u8>> {
    select(vec![
        vec![0x80], // a lone continuation byte
        vec![0xBF],
        vec![0xC0, 0x80],       // overlong NUL
        vec![0xC1, 0xBF],       // overlong
        vec![0xE0, 0x80, 0x80], // overlong
        vec![0xED, 0xA0, 0x80], // a surrogate
        vec![0xED, 0xBF, 0xBF],
        vec![0xF0, 0x80, 0x80, 0x80], // overlong
        vec![0xF4, 0x90, 0x80, 0x80], // above U+10FFFF
        vec![0xF5],
        vec![0xFF],
        vec![0xFE],
        vec![0xC3, 0x28], // a lead byte without its continuation
        vec![0xE2, 0x82, 0x28],
    ])
}

/// Close codes a peer may send.
fn valid_close_code() -> impl Strategy<Value = u16> {
    prop_oneof![
        select(vec![1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]),
        3000u16..5000,
    ]
}

fn raw_payload() -> impl Strategy<Value = Vec<u8>> {
    let close_code = prop_oneof![
        valid_close_code(),
        select(vec![0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX]),
        any::<u16>(),
    ];
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..32),
        3 => any_text(40).prop_map(String::into_bytes),
        2 => (close_code, any_text(30))
            .prop_map(|(code, reason)| [&code.to_be_bytes()[..], reason.as_bytes()].concat()),
        1 => (any_text(20), invalid_utf8(), any::<Index>()).prop_map(|(text, bad, at)| {
            let mut bytes = text.into_bytes();
            bytes.splice(at.index(bytes.len() + 1)..at.index(bytes.len() + 1), bad);
            bytes
        }),
        1 => proptest::collection::vec(any::<u8>(), 100..300),
    ]
}

fn raw_frame() -> impl Strategy<Value = RawFrame> {
    let fin = proptest::bool::weighted(0.8);
    let rsv = prop_oneof![20 => Just(0u8), 1 => 1u8..8];
    let opcode = prop_oneof![
        8 => select(vec![CONTINUATION, TEXT, BINARY]),
        4 => select(vec![CLOSE, PING, PONG]),
        1 => 0u8..16,
    ];
    let form = prop_oneof![20 => Just(0u8), 1 => 1u8..3];
    let declared = prop_oneof![
        20 => Just(None),
        1 => select(vec![0, 1, 125, 126, 127, 200, 65535, 65536, 1 << 32, (1 << 63) - 1, 1 << 63, u64::MAX])
            .prop_map(Some),
        1 => any::<u64>().prop_map(Some),
    ];
    (fin, rsv, opcode, proptest::bool::weighted(0.95), form, declared, any::<[u8; 4]>(), raw_payload())
        .prop_map(|(fin, rsv, opcode, is_masked, form, declared, key, payload)| RawFrame {
            b0: (u8::from(fin) << 7) | (rsv << 4) | opcode,
            is_masked,
            form,
            declared,
            key,
            payload,
        })
}

/// Message size limits: at least 125 so that every control frame fits.
fn max_message() -> impl Strategy<Value = usize> {
    prop_oneof![select(vec![125usize, 126, 200, 256, 1024]), 125usize..2048]
}

/// Edits to a byte stream: (where, value, kind).
type Edit = (Index, u8, u8);

fn edits(max: usize) -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec((any::<Index>(), any::<u8>(), 0u8..5), 0..=max)
}

/// Apply edits: flip a bit, set a byte, insert a byte, remove a byte, or cut the end.
fn edit(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for (at, value, kind) in edits {
        let i = at.index(bytes.len() + 1);
        match kind {
            0 if i < bytes.len() => bytes[i] ^= 1 << (value % 8),
            1 if i < bytes.len() => bytes[i] = *value,
            2 => bytes.insert(i, *value),
            3 if i < bytes.len() => {
                bytes.remove(i);
            }
            4 => bytes.truncate(i),
            _ => {}
        }
    }
}

/// A message a client sends and how: fragments cut at `cuts`, control frames sent
/// after the fragment their index picks.
#[derive(Debug, Clone)]
struct Message {
    text: bool,
    payload: Vec<u8>,
    cuts: Vec<Index>,
    controls: Vec<(Index, u8, Vec<u8>)>,
}

fn message_with(payload: impl Strategy<Value = (bool, Vec<u8>)>) -> impl Strategy<Value = Message> {
    let control = (any::<Index>(), select(vec![PING, PONG]), proptest::collection::vec(any::<u8>(), 0..=125));
    (payload, proptest::collection::vec(any::<Index>(), 0..5), proptest::collection::vec(control, 0..3))
        .prop_map(|((text, payload), cuts, controls)| Message { text, payload, cuts, controls })
}

fn message() -> impl Strategy<Value = Message> {
    message_with(prop_oneof![
        4 => any_text(80).prop_map(|t| (true, t.into_bytes())),
        3 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| (false, b)),
        1 => any_text(200).prop_map(|t| (true, t.into_bytes())),
        1 => (65530usize..66000, any::<u8>()).prop_map(|(len, b)| (false, vec![b; len])),
    ])
}

/// A client's session: messages, then maybe a close frame (code and reason, or empty).
#[derive(Debug, Clone)]
struct Session {
    messages: Vec<Message>,
    close: Option<Option<(u16, String)>>,
    keys: Vec<[u8; 4]>,
}

fn close_frame() -> impl Strategy<Value = Option<Option<(u16, String)>>> {
    let reason = any_text(60).prop_map(|r| {
        let mut end = r.len().min(123);
        while !r.is_char_boundary(end) {
            end -= 1;
        }
        r[..end].to_owned()
    });
    proptest::option::of(proptest::option::of((valid_close_code(), reason)))
}

fn session() -> impl Strategy<Value = Session> {
    (
        proptest::collection::vec(message(), 0..5),
        close_frame(),
        proptest::collection::vec(any::<[u8; 4]>(), 1..8),
    )
        .prop_map(|(messages, close, keys)| Session { messages, close, keys })
}

impl Session {
    /// The wire bytes and the events they stand for.
    fn encode(&self) -> (Vec<u8>, Vec<Event>) {
        let mut keys = self.keys.iter().copied().cycle();
        let mut frame = |fin: bool, opcode: u8, payload: &[u8]| {
            let key = keys.next().unwrap();
            let bytes = client_frame(fin, opcode, payload, key);
            assert_eq!(frame::encode_client(fin, opcode, payload, key), bytes, "encode_client");
            bytes
        };
        let mut wire = Vec::new();
        let mut events = Vec::new();
        for m in &self.messages {
            let cuts = offsets(&m.cuts, m.payload.len());
            let bounds: Vec<usize> = [0].into_iter().chain(cuts).chain([m.payload.len()]).collect();
            let fragments: Vec<&[u8]> = bounds.windows(2).map(|w| &m.payload[w[0]..w[1]]).collect();
            let mut controls: Vec<(usize, u8, &[u8])> =
                m.controls.iter().map(|(i, op, p)| (i.index(fragments.len()), *op, p.as_slice())).collect();
            controls.sort_by_key(|c| c.0);
            let mut controls = controls.into_iter().peekable();
            for (i, fragment) in fragments.iter().enumerate() {
                let last = i + 1 == fragments.len();
                let opcode = match (i, m.text) {
                    (0, true) => TEXT,
                    (0, false) => BINARY,
                    _ => CONTINUATION,
                };
                wire.extend(frame(last, opcode, fragment));
                if last {
                    events.push(Event::Message { text: m.text, payload: Bytes::from(m.payload.clone()) });
                }
                while let Some((_, op, payload)) = controls.next_if(|c| c.0 == i) {
                    wire.extend(frame(true, op, payload));
                    events.push(if op == PING {
                        Event::Ping(Bytes::copy_from_slice(payload))
                    } else {
                        Event::Pong(Bytes::copy_from_slice(payload))
                    });
                }
            }
        }
        match &self.close {
            None => {}
            Some(None) => {
                wire.extend(frame(true, CLOSE, &[]));
                events.push(Event::Close { code: None, reason: Bytes::new() });
            }
            Some(Some((code, reason))) => {
                wire.extend(frame(true, CLOSE, &[&code.to_be_bytes()[..], reason.as_bytes()].concat()));
                events.push(Event::Close { code: Some(*code), reason: Bytes::from(reason.clone()) });
            }
        }
        (wire, events)
    }

    fn largest(&self) -> usize {
        self.messages.iter().map(|m| m.payload.len()).max().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------
// Frame properties.
// ---------------------------------------------------------------------------------

/// Arbitrary bytes: no panic, and the invariants `feed` checks on every call.
#[test]
fn decoder_survives_arbitrary_bytes() {
    let bytes = proptest::collection::vec(any::<u8>(), 0..512);
    fuzz("decoder_survives_arbitrary_bytes", (bytes, max_message()), |(bytes, max)| {
        feed(&bytes, &[], max).map(drop)
    });
}

/// Streams of plausible but often broken frames, then edited, agree with the reference
/// decoder, fed whole and in arbitrary pieces.
#[test]
fn decoder_agrees_with_the_reference_on_hostile_frames() {
    let stream = (proptest::collection::vec(raw_frame(), 0..8), edits(2));
    let cuts = proptest::collection::vec(any::<Index>(), 0..8);
    fuzz(
        "decoder_agrees_with_the_reference_on_hostile_frames",
        (stream, cuts, max_message()),
        |((frames, edits), cuts, max)| {
            let mut bytes = Vec::new();
            for f in &frames {
                f.encode(&mut bytes);
            }
            edit(&mut bytes, &edits);
            agrees(&bytes, &cuts, max)
        },
    );
}

/// Valid sessions (masked, randomly fragmented, text cut anywhere including inside a
/// character, control frames between fragments) decode to exactly what was sent, fed in
/// arbitrary pieces, with a limit of exactly the largest message or more.
#[test]
fn decoder_round_trips_valid_sessions() {
    let cuts = proptest::collection::vec(any::<Index>(), 0..16);
    fuzz(
        "decoder_round_trips_valid_sessions",
        (session(), cuts, prop_oneof![Just(0usize), 0usize..100]),
        |(session, cuts, slack)| {
            let (wire, events) = session.encode();
            let max = session.largest().max(125) + slack;
            let got = feed(&wire, &offsets(&cuts, wire.len()), max)?;
            prop_assert_eq!(got, Outcome { events, error: None, left: 0 });
            Ok(())
        },
    );
}

/// Valid sessions with a few bytes edited, and limits that may be one byte short,
/// agree with the reference decoder.
#[test]
fn decoder_agrees_with_the_reference_on_edited_sessions() {
    let cuts = proptest::collection::vec(any::<Index>(), 0..8);
    fuzz(
        "decoder_agrees_with_the_reference_on_edited_sessions",
        (session(), edits(3), cuts, 0u8..3),
        |(session, edits, cuts, limit)| {
            let (mut wire, _) = session.encode();
            edit(&mut wire, &edits);
            let max = match limit {
                0 => session.largest(),
                1 => session.largest().saturating_sub(1),
                _ => 0,
            }
            .max(125);
            agrees(&wire, &cuts, max)
        },
    );
}

/// A text message with invalid UTF-8 anywhere in it, or a close reason with it, fails
/// the connection with 1007, whatever the fragmentation.
#[test]
fn invalid_utf8_is_1007() {
    let broken_text = (any_text(60), invalid_utf8(), any::<Index>()).prop_map(|(text, bad, at)| {
        let mut bytes = text.into_bytes();
        let at = at.index(bytes.len() + 1);
        bytes.splice(at..at, bad);
        (true, bytes)
    });
    let cuts = proptest::collection::vec(any::<Index>(), 0..8);
    let in_reason = (valid_close_code(), any_text(20), invalid_utf8());
    fuzz(
        "invalid_utf8_is_1007",
        (session(), message_with(broken_text), proptest::option::of(in_reason), cuts, any::<[u8; 4]>()),
        |(mut session, broken, in_reason, cuts, key)| {
            session.close = None;
            let max = session.largest().max(broken.payload.len()).max(125);
            let (wire, sent) = match in_reason {
                None => {
                    session.messages.push(broken);
                    session.encode()
                }
                Some((code, reason, bad)) => {
                    let (mut wire, sent) = session.encode();
                    let body = [&code.to_be_bytes()[..], reason.as_bytes(), &bad].concat();
                    wire.extend(client_frame(true, CLOSE, &body, key));
                    (wire, sent)
                }
            };
            let got = feed(&wire, &offsets(&cuts, wire.len()), max)?;
            prop_assert_eq!(got.error.as_ref().map(DecodeError::close_code), Some(INVALID_DATA));
            // Only what was sent before the broken text or close frame is delivered (and
            // `feed` checks that every text delivered is UTF-8).
            prop_assert!(got.events.len() <= sent.len() && got.events.iter().zip(&sent).all(|(a, b)| a == b));
            agrees(&wire, &cuts, max)
        },
    );
}

/// Close frames with any body of up to 125 bytes (any code, a reason valid or not, or
/// random bytes), after a valid session, agree with the reference decoder: codes a peer
/// may not send are 1002, a one-byte body 1002, a reason that is not UTF-8 1007.
#[test]
fn close_frames_agree_with_the_reference() {
    let code = prop_oneof![
        select(vec![0u16, 999, 1000, 1003, 1004, 1005, 1006, 1007, 1014, 1015, 1016, 2999, 3000, 4999, 5000]),
        any::<u16>(),
    ];
    let reason = prop_oneof![
        3 => any_text(30).prop_map(String::into_bytes),
        1 => (any_text(20), invalid_utf8()).prop_map(|(text, bad)| [text.as_bytes(), &bad].concat()),
    ];
    let body = prop_oneof![
        4 => (code, reason).prop_map(|(code, reason)| [&code.to_be_bytes()[..], &reason].concat()),
        1 => proptest::collection::vec(any::<u8>(), 0..=125),
    ]
    .prop_map(|mut body| {
        body.truncate(125);
        body
    });
    let cuts = proptest::collection::vec(any::<Index>(), 0..4);
    fuzz(
        "close_frames_agree_with_the_reference",
        (session(), body, any::<[u8; 4]>(), cuts),
        |(mut session, body, key, cuts)| {
            session.close = None;
            let (mut wire, _) = session.encode();
            wire.extend(client_frame(true, CLOSE, &body, key));
            agrees(&wire, &cuts, session.largest().max(125))
        },
    );
}

/// A header announcing a message over the limit fails with 1009 as soon as the header
/// is in, however large the announced length, without waiting for the payload.
#[test]
fn oversized_headers_fail_at_once() {
    // Raised to one past the limit when below it.
    let len = prop_oneof![
        Just(0u64),
        select(vec![126u64, 65535, 65536, 1 << 32, (1 << 63) - 1]),
        126u64..(1 << 63),
    ];
    fuzz(
        "oversized_headers_fail_at_once",
        (max_message(), len, select(vec![TEXT, BINARY]), any::<[u8; 4]>()),
        |(max, len, opcode, key)| {
            let len = len.max(max as u64 + 1);
            let mut header = vec![0x80 | opcode];
            if len < 1 << 16 {
                header.push(0x80 | 126);
                header.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                header.push(0x80 | 127);
                header.extend_from_slice(&len.to_be_bytes());
            }
            header.extend_from_slice(&key);
            let got = feed(&header, &[], max)?;
            prop_assert_eq!(got.error.map(|e| e.close_code()), Some(TOO_BIG));
            Ok(())
        },
    );
}

/// `frame::encode` makes one final, unmasked frame with a minimal length, and
/// `encode_close` a close frame whose reason is the longest whole-character prefix that
/// fits in 125 bytes; a client frame with the same body decodes to the same close.
#[test]
fn server_frames_are_well_formed() {
    let payload = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => (65530usize..66000, any::<u8>()).prop_map(|(len, b)| vec![b; len]),
    ];
    let opcode = select(vec![TEXT, BINARY, CLOSE, PING, PONG]);
    fuzz(
        "server_frames_are_well_formed",
        (opcode, payload, any::<u16>(), any_text(150), any::<[u8; 4]>()),
        |(opcode, payload, code, reason, key)| {
            let frame = frame::encode(opcode, &payload);
            prop_assert_eq!(frame[0], 0x80 | opcode);
            prop_assert_eq!(frame[1] & 0x80, 0, "server frames are not masked");
            let len = payload.len();
            let header = match frame[1] {
                n if n < 126 => {
                    prop_assert_eq!(usize::from(n), len);
                    2
                }
                126 => {
                    prop_assert_eq!(usize::from(u16::from_be_bytes([frame[2], frame[3]])), len);
                    prop_assert!(len >= 126, "not minimal");
                    4
                }
                _ => {
                    prop_assert_eq!(u64::from_be_bytes(frame[2..10].try_into().unwrap()), len as u64);
                    prop_assert!(len >= 1 << 16, "not minimal");
                    10
                }
            };
            prop_assert_eq!(&frame[header..], &payload[..]);

            let close = frame::encode_close(code, &reason);
            let mut fit = 0;
            for c in reason.chars() {
                if fit + c.len_utf8() > 123 {
                    break;
                }
                fit += c.len_utf8();
            }
            prop_assert_eq!(&close[..2], &[0x88, 2 + fit as u8][..]);
            prop_assert_eq!(&close[2..4], &code.to_be_bytes()[..]);
            prop_assert_eq!(&close[4..], &reason.as_bytes()[..fit]);
            if peer_may_send(code) {
                let wire = client_frame(true, CLOSE, &close[2..], key);
                let got = feed(&wire, &[], 125)?;
                let sent = Event::Close {
                    code: Some(code),
                    reason: Bytes::copy_from_slice(&reason.as_bytes()[..fit]),
                };
                prop_assert_eq!(got, Outcome { events: vec![sent], error: None, left: 0 });
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------
// Upgrade requests.
// ---------------------------------------------------------------------------------

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` as RFC 6455 section 4.2.2 computes it.
fn rfc_accept(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

/// Base64 that also takes a missing padding or non-zero trailing bits (RFC 4648 lets a
/// decoder refuse them, and need not).
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

const ROOM_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-";

fn room_name_ok(name: &str) -> bool {
    (1..=128).contains(&name.len()) && name.bytes().all(|b| ROOM_CHARS.contains(&b))
}

/// Strict percent-decoding (RFC 3986 section 2.1): `%` then exactly two hex digits.
fn percent_decoded(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether a comma-separated header value lists `token` (any case).
fn lists(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// An upgrade request as `validate` sees it.
#[derive(Debug, Clone)]
struct Request {
    method: Method,
    path: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    policy: OriginPolicy,
}

impl Request {
    fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            map.append(name.clone(), value.clone());
        }
        map
    }

    fn validate(&self) -> Result<Valid, Rejection> {
        handshake::validate(
            &self.method,
            axum::http::Version::HTTP_11,
            &self.path,
            &self.header_map(),
            &self.policy,
        )
    }

    fn without(&mut self, name: &HeaderName) {
        self.headers.retain(|(n, _)| n != name);
    }

    fn set(&mut self, name: HeaderName, value: &str) {
        self.without(&name);
        self.headers.push((name, HeaderValue::from_str(value).unwrap()));
    }
}

/// What every answer of `validate` must satisfy, whatever the request.
fn check_answer(request: &Request, answer: &Result<Valid, Rejection>) -> TestCaseResult {
    let headers = request.header_map();
    match answer {
        Ok(valid) => {
            prop_assert_eq!(&request.method, &Method::GET);
            match request.path.strip_prefix("/ws/") {
                Some(raw) => {
                    let decoded = percent_decoded(raw);
                    let room = valid.room.as_deref().unwrap_or_default();
                    prop_assert_eq!(decoded.as_deref(), Some(room));
                    prop_assert!(room_name_ok(room), "accepted room {:?}", valid.room);
                    prop_assert!(roomcast::types::valid_room_name(room));
                }
                // `GET /ws` joins no room: only for a client offering the room protocol.
                None => {
                    prop_assert_eq!(request.path.as_str(), "/ws");
                    prop_assert!(valid.room.is_none());
                    prop_assert!(valid.protocols.iter().any(|p| p == "roomcast.v1"), "{:?}", valid.protocols);
                }
            }
            prop_assert!(headers.get_all(header::UPGRADE).iter().any(|v| lists(v, "websocket")));
            prop_assert!(headers.get_all(header::CONNECTION).iter().any(|v| lists(v, "upgrade")));
            prop_assert_eq!(
                headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes),
                Some(&b"13"[..])
            );
            let key = headers.get(header::SEC_WEBSOCKET_KEY).map(HeaderValue::as_bytes).unwrap_or_default();
            let decoded = LENIENT_BASE64.decode(key).unwrap_or_default();
            prop_assert_eq!(decoded.len(), 16, "accepted key {:?}", key);
            prop_assert_eq!(&valid.accept, &rfc_accept(key));
            for protocol in &valid.protocols {
                prop_assert!(!protocol.is_empty() && protocol.trim() == protocol && !protocol.contains(','));
            }
            if let (Some(origin), false) = (headers.get(header::ORIGIN), request.policy == OriginPolicy::Any)
            {
                prop_assert!(origin.to_str().is_ok_and(|o| o.contains("://")), "accepted origin {origin:?}");
            }
        }
        Err(rejection) => {
            let status = rejection.status.as_u16();
            prop_assert!([400, 403, 404, 405, 426].contains(&status), "status {status}");
            prop_assert_eq!(status == 405, request.method != Method::GET);
            if status == 405 {
                prop_assert_eq!(rejection.header.clone(), Some((header::ALLOW, "GET")));
            }
            if status == 426 {
                let named = rejection.header.as_ref().map(|(n, v)| (n.as_str(), *v));
                prop_assert!(
                    matches!(named, Some(("upgrade", "websocket")) | Some(("sec-websocket-version", "13"))),
                    "426 with {named:?}"
                );
            }
            prop_assert!(!rejection.message.is_empty() && !rejection.message.contains(['\n', '\r']));
            let response = axum::response::IntoResponse::into_response(rejection.clone());
            prop_assert_eq!(response.status(), rejection.status);
        }
    }
    Ok(())
}

/// Upper-case the letters of `text` whose bit in `mask` is set.
fn recase(text: &str, mask: u64) -> String {
    text.chars()
        .enumerate()
        .map(|(i, c)| if mask >> (i % 64) & 1 == 1 { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
        .collect()
}

/// A room name and a path that spells it with some bytes percent-encoded.
fn room_path() -> impl Strategy<Value = (String, String)> {
    let name = proptest::collection::vec(select(ROOM_CHARS.to_vec()), 1..=128)
        .prop_map(|b| String::from_utf8(b).unwrap());
    (name, proptest::collection::vec((proptest::bool::weighted(0.2), any::<bool>()), 128)).prop_map(
        |(name, how)| {
            let mut path = String::from("/ws/");
            for (b, (escape, upper)) in name.bytes().zip(how) {
                match (escape, upper) {
                    (false, _) => path.push(b as char),
                    (true, true) => path.push_str(&format!("%{b:02X}")),
                    (true, false) => path.push_str(&format!("%{b:02x}")),
                }
            }
            (name, path)
        },
    )
}

/// A host, with an optional port.
fn host() -> impl Strategy<Value = (String, Option<u16>)> {
    let name = select(vec![
        "example.com",
        "localhost",
        "example.org",
        "app.example.org",
        "a.b.example.org",
        "evilexample.org",
        "127.0.0.1",
    ]);
    let port = prop_oneof![Just(None), select(vec![80u16, 443, 8080, 8443]).prop_map(Some)];
    (name.prop_map(str::to_owned), port)
}

fn authority((name, port): &(String, Option<u16>)) -> String {
    match port {
        Some(port) => format!("{name}:{port}"),
        None => name.clone(),
    }
}

fn default_port(scheme: &str) -> u16 {
    if matches!(scheme, "https" | "wss") { 443 } else { 80 }
}

/// Origins a browser could send: `scheme://host[:port]`.
fn browser_origin() -> impl Strategy<Value = (String, (String, Option<u16>))> {
    (select(vec!["http", "https"]).prop_map(str::to_owned), host())
}

/// Entries of an allow-list: exact origins and subdomain wildcards.
fn list_entry() -> impl Strategy<Value = (String, bool, (String, Option<u16>))> {
    let wildcard = select(vec!["example.org", "example.com", "b.example.org"]).prop_map(str::to_owned);
    let port = prop_oneof![Just(None), select(vec![443u16, 8443]).prop_map(Some)];
    prop_oneof![
        browser_origin().prop_map(|(s, h)| (s, false, h)),
        (select(vec!["http", "https"]).prop_map(str::to_owned), wildcard, port).prop_map(|(s, w, p)| (
            s,
            true,
            (w, p)
        )),
    ]
}

fn entry_text((scheme, wildcard, host): &(String, bool, (String, Option<u16>))) -> String {
    format!("{scheme}://{}{}", if *wildcard { "*." } else { "" }, authority(host))
}

/// The origin model: may a browser page at `origin` open a socket to `host`?
fn origin_allows(
    policy: &Policy,
    origin: &(String, (String, Option<u16>)),
    host: &(String, Option<u16>),
) -> bool {
    let (scheme, (name, port)) = origin;
    let port = port.unwrap_or(default_port(scheme));
    match policy {
        Policy::Any => true,
        Policy::SameHost => *name == host.0 && port == host.1.unwrap_or(default_port(scheme)),
        Policy::List(entries) => entries.iter().any(|(e_scheme, wildcard, (e_name, e_port))| {
            let name_ok = if *wildcard {
                name.strip_suffix(e_name.as_str()).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
            } else {
                name == e_name
            };
            e_scheme == scheme && port == e_port.unwrap_or(default_port(e_scheme)) && name_ok
        }),
    }
}

#[derive(Debug, Clone)]
enum Policy {
    Any,
    SameHost,
    List(Vec<(String, bool, (String, Option<u16>))>),
}

impl Policy {
    fn origin_policy(&self) -> OriginPolicy {
        match self {
            Policy::Any => OriginPolicy::Any,
            Policy::SameHost => OriginPolicy::SameHost,
            Policy::List(entries) => {
                OriginPolicy::parse(&entries.iter().map(entry_text).collect::<Vec<_>>().join(", ")).unwrap()
            }
        }
    }
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::Any),
        Just(Policy::SameHost),
        proptest::collection::vec(list_entry(), 1..4).prop_map(Policy::List),
    ]
}

/// A valid upgrade request, in the many ways a client may spell one, with what
/// `validate` must answer: the room, the key, the subprotocols.
#[derive(Debug, Clone)]
struct Upgrade {
    request: Request,
    room: String,
    key: String,
    protocols: Vec<String>,
}

fn upgrade() -> impl Strategy<Value = Upgrade> {
    let upgrade = (any::<u64>(), select(vec!["", "h2c, ", "foo/1.0 , "]))
        .prop_map(|(case, before)| format!("{before}{}", recase("websocket", case)));
    let connection = (any::<u64>(), select(vec![0u8, 1, 2, 3])).prop_map(|(case, how)| {
        let token = recase("upgrade", case);
        match how {
            0 => vec![token],
            1 => vec![format!("keep-alive, {token}")],
            2 => vec![format!("{token},HTTP2-Settings")],
            _ => vec!["keep-alive".to_owned(), token],
        }
    });
    let token = proptest::collection::vec(select(b"abcdefghijklmnopqrstuvwxyz0123456789.-".to_vec()), 1..12)
        .prop_map(|b| String::from_utf8(b).unwrap());
    let protocols = (proptest::collection::vec(token, 0..4), any::<bool>());
    let extra = proptest::collection::vec(
        (
            select(vec!["user-agent", "accept", "x-forwarded-for", "sec-websocket-extensions", "cookie"]),
            any_text(20),
        ),
        0..3,
    );
    (
        room_path(),
        upgrade,
        connection,
        any::<[u8; 16]>(),
        (policy(), host(), proptest::option::of(browser_origin()), any::<u64>()),
        protocols,
        extra,
    )
        .prop_map(
            |(
                (room, path),
                upgrade,
                connection,
                key,
                (policy, host, origin, case),
                (protocols, split),
                extra,
            )| {
                let key = BASE64.encode(key);
                let mut headers = vec![(header::UPGRADE, upgrade)];
                headers.extend(connection.into_iter().map(|c| (header::CONNECTION, c)));
                headers.push((header::SEC_WEBSOCKET_VERSION, "13".to_owned()));
                headers.push((header::SEC_WEBSOCKET_KEY, key.clone()));
                headers.push((header::HOST, recase(&authority(&host), case)));
                // An origin the policy allows: any, the host itself, or one on the list.
                let origin = match (&policy, origin) {
                    (Policy::Any, origin) => origin,
                    (Policy::SameHost, Some((scheme, _))) => Some((scheme, host.clone())),
                    (Policy::List(entries), Some(_)) => {
                        let (scheme, wildcard, (name, port)) = entries[case as usize % entries.len()].clone();
                        let name = if wildcard { format!("x{}.{name}", case % 3) } else { name };
                        Some((scheme, (name, port)))
                    }
                    (_, None) => None,
                };
                if let Some((scheme, h)) = &origin {
                    // Spell the default port or leave it out.
                    let h = match h.1 {
                        None if case & 1 << 60 != 0 => (h.0.clone(), Some(default_port(scheme))),
                        Some(p) if p == default_port(scheme) && case & 1 << 61 != 0 => (h.0.clone(), None),
                        _ => h.clone(),
                    };
                    headers
                        .push((header::ORIGIN, recase(&format!("{scheme}://{}", authority(&h)), case >> 7)));
                }
                if split {
                    headers.extend(protocols.iter().map(|p| (header::SEC_WEBSOCKET_PROTOCOL, p.clone())));
                } else if !protocols.is_empty() {
                    headers.push((header::SEC_WEBSOCKET_PROTOCOL, protocols.join(" , ")));
                }
                let mut headers: Vec<(HeaderName, HeaderValue)> =
                    headers.into_iter().map(|(n, v)| (n, HeaderValue::from_str(&v).unwrap())).collect();
                for (name, value) in extra {
                    if let Ok(value) = HeaderValue::from_str(&value) {
                        headers.push((HeaderName::from_static(name), value));
                    }
                }
                Upgrade {
                    request: Request { method: Method::GET, path, headers, policy: policy.origin_policy() },
                    room,
                    key,
                    protocols,
                }
            },
        )
}

/// Every valid request is accepted, with the room it names, the RFC's accept value and
/// the subprotocols it lists.
#[test]
fn valid_upgrades_are_accepted() {
    fuzz("valid_upgrades_are_accepted", upgrade(), |u| {
        let answer = u.request.validate();
        check_answer(&u.request, &answer)?;
        let valid = answer.map_err(|r| TestCaseError::fail(format!("rejected: {r}")))?;
        prop_assert_eq!(valid.room.as_deref(), Some(u.room.as_str()));
        prop_assert_eq!(&valid.accept, &rfc_accept(u.key.as_bytes()));
        prop_assert_eq!(&valid.protocols, &u.protocols);
        Ok(())
    });
}

/// One thing wrong with a valid request.
#[derive(Debug, Clone)]
enum Defect {
    Method(Method),
    Prefix(&'static str),
    Room(String),
    NoUpgrade,
    Upgrade(&'static str),
    Connection(Option<&'static str>),
    Version(Option<&'static str>),
    Key(Option<String>),
    Origin(&'static str),
}

fn defect() -> impl Strategy<Value = Defect> {
    let method = prop_oneof![
        select(vec![Method::POST, Method::HEAD, Method::PUT, Method::OPTIONS, Method::CONNECT]),
        Just(Method::from_bytes(b"get").unwrap()),
    ];
    let bad_room = prop_oneof![
        Just(String::new()),
        Just("a".repeat(129)),
        // Inside the name: characters it may not hold (raw or escaped) and escapes that
        // stay malformed whatever follows them.
        (
            room_path(),
            select(vec![
                "/", " ", "%20", "%2F", "%2f", "%00", "~", "+", "!", "%C3%A9", "é", "?", "#", "%_", "%4_",
                "%zz", "%G0", "%+1", "%-1", "%FF", "%C3"
            ]),
            any::<Index>()
        )
            .prop_map(|((name, _), bad, at)| {
                let at = at.index(name.len() + 1);
                format!("{}{bad}{}", &name[..at], &name[at..])
            }),
        // At its end: escapes cut short.
        (room_path(), select(vec!["%", "%4", "%e"])).prop_map(|((name, _), bad)| format!("{name}{bad}")),
    ];
    let bad_key = prop_oneof![
        Just(None),
        any::<[u8; 15]>().prop_map(|k| Some(BASE64.encode(k))),
        any::<[u8; 17]>().prop_map(|k| Some(BASE64.encode(k))),
        select(vec!["", "not base64!", "dGhlIHNhbXBsZSBub25jZQ===", "dGhlIHNhbXBsZSBub25jZQ=A"])
            .prop_map(|k| Some(k.to_owned())),
    ];
    prop_oneof![
        method.prop_map(Defect::Method),
        select(vec!["/", "/ws", "/WS/", "/wss/", "//ws/", "/api/ws/", "ws/", ""]).prop_map(Defect::Prefix),
        bad_room.prop_map(Defect::Room),
        Just(Defect::NoUpgrade),
        select(vec!["h2c", "websocket2", "web socket", "", "websocket;", "websockets, h2c"])
            .prop_map(Defect::Upgrade),
        select(vec![None, Some("keep-alive"), Some("close"), Some("upgrade2"), Some("")])
            .prop_map(Defect::Connection),
        select(vec![None, Some("8"), Some("12"), Some("14"), Some("13, 8"), Some(""), Some("130")])
            .prop_map(Defect::Version),
        bad_key.prop_map(Defect::Key),
        select(vec![
            "null",
            "http://evil.example",
            "https://evil.example:443",
            "file://",
            "https://example.com.evil.example"
        ])
        .prop_map(Defect::Origin),
    ]
}

/// A valid request with one defect is refused with the status the module documents for
/// it: 405 method, 404 path, 400 room name, 426 no `Upgrade`, 400 wrong `Upgrade` or
/// `Connection`, 426 version, 400 key, 403 origin.
#[test]
fn one_defect_gets_its_status() {
    fuzz("one_defect_gets_its_status", (upgrade(), defect()), |(u, defect)| {
        let mut r = u.request.clone();
        let status = match &defect {
            Defect::Method(m) => {
                r.method = m.clone();
                405
            }
            Defect::Prefix(p) => {
                r.path = format!("{p}{}", &r.path[4..]);
                404
            }
            Defect::Room(room) => {
                r.path = format!("/ws/{room}");
                400
            }
            Defect::NoUpgrade => {
                r.without(&header::UPGRADE);
                426
            }
            Defect::Upgrade(v) => {
                r.set(header::UPGRADE, v);
                400
            }
            Defect::Connection(v) => {
                r.without(&header::CONNECTION);
                if let Some(v) = v {
                    r.set(header::CONNECTION, v);
                }
                400
            }
            Defect::Version(v) => {
                r.without(&header::SEC_WEBSOCKET_VERSION);
                if let Some(v) = v {
                    r.set(header::SEC_WEBSOCKET_VERSION, v);
                }
                426
            }
            Defect::Key(k) => {
                r.without(&header::SEC_WEBSOCKET_KEY);
                if let Some(k) = k {
                    r.set(header::SEC_WEBSOCKET_KEY, k);
                }
                400
            }
            Defect::Origin(origin) => {
                // Same-host requests from a page elsewhere; `Any` allows every origin.
                if r.policy == OriginPolicy::Any {
                    r.policy = OriginPolicy::SameHost;
                }
                r.set(header::ORIGIN, origin);
                403
            }
        };
        let answer = r.validate();
        check_answer(&r, &answer)?;
        match answer {
            Ok(_) => prop_assert!(false, "accepted with {defect:?}"),
            Err(rejection) => {
                prop_assert_eq!(rejection.status, StatusCode::from_u16(status).unwrap(), "{:?}", defect)
            }
        }
        Ok(())
    });
}

/// With everything else valid, a browser origin is allowed exactly when the policy
/// model allows it: same host and port (default ports implied), or on the list
/// (`*.` matching one or more subdomain labels).
#[test]
fn origins_follow_the_policy() {
    fuzz(
        "origins_follow_the_policy",
        (upgrade(), policy(), proptest::option::of(browser_origin()), host(), any::<u64>()),
        |(u, policy, origin, host, case)| {
            let mut r = u.request.clone();
            r.policy = policy.origin_policy();
            r.set(header::HOST, &recase(&authority(&host), case));
            r.without(&header::ORIGIN);
            if let Some((scheme, h)) = &origin {
                r.set(header::ORIGIN, &recase(&format!("{scheme}://{}", authority(h)), case >> 7));
            }
            let answer = r.validate();
            check_answer(&r, &answer)?;
            let allowed = origin.as_ref().is_none_or(|o| origin_allows(&policy, o, &host));
            match answer {
                Ok(_) => prop_assert!(allowed, "origin {origin:?} allowed under {policy:?} for {host:?}"),
                Err(rejection) => {
                    prop_assert!(
                        !allowed,
                        "origin {origin:?} refused under {policy:?} for {host:?}: {rejection}"
                    );
                    prop_assert_eq!(rejection.status, StatusCode::FORBIDDEN);
                }
            }
            Ok(())
        },
    );
}

/// A change to a valid request.
#[derive(Debug, Clone)]
enum Change {
    Method(Method),
    Path(String),
    /// Insert a character into the path.
    Insert(Index, char),
    Add(HeaderName, HeaderValue),
    Remove(HeaderName),
    Replace(HeaderName, HeaderValue),
}

/// Arbitrary requests: valid ones with a few arbitrary changes, and ones made from
/// scratch. Methods, paths and header values are mostly near misses (a different
/// case, a list, a bad escape, a key one byte short), some are junk; header names are
/// mostly those an upgrade uses, and may repeat.
fn arbitrary_request() -> impl Strategy<Value = Request> {
    let method = prop_oneof![
        6 => Just(Method::GET),
        1 => select(vec![Method::POST, Method::HEAD, Method::PUT]),
        1 => proptest::collection::vec(select(b"GETPOSgetpos!#$%&'*+-.^_`|~09".to_vec()), 1..8)
            .prop_map(|b| Method::from_bytes(&b).unwrap()),
    ];
    let path_char = prop_oneof![
        6 => select(ROOM_CHARS.to_vec()).prop_map(char::from),
        3 => select(vec!['%', '%', '/', '2', 'F', 'f', 'A', '0', 'e', 'E', '+', '-', '?', '#', ' ', '~']),
        1 => any_char(),
    ];
    let tail = || proptest::collection::vec(path_char.clone(), 0..140).prop_map(String::from_iter);
    let path = prop_oneof![
        8 => tail().prop_map(|t| format!("/ws/{t}")),
        1 => tail(),
    ];
    let name = prop_oneof![
        8 => select(vec![
            header::UPGRADE,
            header::CONNECTION,
            header::SEC_WEBSOCKET_VERSION,
            header::SEC_WEBSOCKET_KEY,
            header::SEC_WEBSOCKET_PROTOCOL,
            header::ORIGIN,
            header::HOST,
        ]),
        1 => proptest::collection::vec(select(b"abcdefghijklmnopqrstuvwxyz0123456789-_".to_vec()), 1..12)
            .prop_map(|b| HeaderName::from_bytes(&b).unwrap()),
    ];
    let value = prop_oneof![
        4 => select(vec![
            "websocket", "WebSocket", "websocket, h2c", "Upgrade", "keep-alive, upgrade", "13", "8", " 13",
            "dGhlIHNhbXBsZSBub25jZQ==", "AAAAAAAAAAAAAAAAAAAAAA==", "AAAAAAAAAAAAAAAAAAAAAB==",
            "AAAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAA", "http://localhost:8080", "localhost:8080",
            "https://example.com", "example.com", "https://x.localhost:8080", "null", "chat, superchat", "",
            ",", " , ",
        ])
        .prop_map(|v| v.as_bytes().to_vec()),
        2 => any_text(30).prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
    ]
    .prop_map(|mut bytes| {
        // Bytes a header value cannot hold (hyper refuses them) become `?`.
        for b in &mut bytes {
            if (*b < 0x20 && *b != b'\t') || *b == 0x7F {
                *b = b'?';
            }
        }
        HeaderValue::from_bytes(&bytes).unwrap()
    });
    let policy = prop_oneof![
        Just(OriginPolicy::Any),
        Just(OriginPolicy::SameHost),
        Just(OriginPolicy::parse("https://example.com, http://*.localhost:8080").unwrap()),
    ];
    let change = prop_oneof![
        1 => method.clone().prop_map(Change::Method),
        1 => path.clone().prop_map(Change::Path),
        2 => (any::<Index>(), path_char.clone()).prop_map(|(i, c)| Change::Insert(i, c)),
        3 => (name.clone(), value.clone()).prop_map(|(n, v)| Change::Add(n, v)),
        2 => name.clone().prop_map(Change::Remove),
        3 => (name.clone(), value.clone()).prop_map(|(n, v)| Change::Replace(n, v)),
    ];
    let changed = (upgrade(), proptest::collection::vec(change, 0..4)).prop_map(|(u, changes)| {
        let mut r = u.request;
        for change in changes {
            match change {
                Change::Method(m) => r.method = m,
                Change::Path(p) => r.path = p,
                Change::Insert(at, c) => {
                    let mut at = at.index(r.path.len() + 1);
                    while !r.path.is_char_boundary(at) {
                        at -= 1;
                    }
                    r.path.insert(at, c);
                }
                Change::Add(n, v) => r.headers.push((n, v)),
                Change::Remove(n) => r.without(&n),
                Change::Replace(n, v) => {
                    r.without(&n);
                    r.headers.push((n, v));
                }
            }
        }
        r
    });
    let scratch = (method, path, proptest::collection::vec((name, value), 0..12), policy)
        .prop_map(|(method, path, headers, policy)| Request { method, path, headers, policy });
    prop_oneof![3 => changed, 1 => scratch]
}

/// Arbitrary requests: no panic, and every answer obeys `check_answer`.
#[test]
fn arbitrary_requests_get_sound_answers() {
    fuzz("arbitrary_requests_get_sound_answers", arbitrary_request(), |request| {
        check_answer(&request, &request.validate())
    });
}

/// RFC 6455 section 11.3.1 and 11.3.5: `Sec-WebSocket-Key` and `Sec-WebSocket-Version`
/// must not appear more than once in a request, so a request with two is refused.
#[test]
fn repeated_key_or_version_is_refused() {
    fuzz(
        "repeated_key_or_version_is_refused",
        (upgrade(), any::<[u8; 16]>(), select(vec!["13", "8"]), any::<bool>()),
        |(u, second_key, second_version, repeat_key)| {
            let mut r = u.request.clone();
            if repeat_key {
                r.headers.push((
                    header::SEC_WEBSOCKET_KEY,
                    HeaderValue::from_str(&BASE64.encode(second_key)).unwrap(),
                ));
            } else {
                r.headers.push((header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static(second_version)));
            }
            let answer = r.validate();
            check_answer(&r, &answer)?;
            let repeated = if repeat_key { "Sec-WebSocket-Key" } else { "Sec-WebSocket-Version" };
            match answer {
                Ok(_) => prop_assert!(false, "accepted a request with {repeated} twice"),
                Err(rejection) => {
                    prop_assert!([400, 426].contains(&rejection.status.as_u16()), "{rejection}")
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------
// The room protocol's codec (`roomcast::protocol`).
// ---------------------------------------------------------------------------------

/// A room name as `roomcast::types::valid_room_name` reads the rule (1 to 128 of
/// `A-Z a-z 0-9 . _ : -`), drawn independently of it.
fn room_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,128}"
}

/// Any text, JSON's awkward characters included (quotes, backslashes, controls,
/// surrogate-pair code points).
fn json_awkward_text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[\"\\\\\\x00-\\x1f a-z\u{e9}\u{1F600}]{0,40}"]
}

/// Whatever a client sends, parsing decides (an operation, a refusal, or a 1002) and
/// never panics; what it accepts is within the rules.
#[test]
fn protocol_parse_survives_any_text() {
    let text = prop_oneof![
        any::<String>(),
        // Objects that name an operation, with fields of any shape.
        (
            select(vec!["join", "leave", "send"]),
            json_awkward_text(),
            json_awkward_text(),
            any::<Option<u64>>()
        )
            .prop_map(|(op, room, text, reference)| {
                serde_json::json!({ op: room, "text": text, "ref": reference }).to_string()
            }),
    ];
    fuzz("protocol_parse_survives_any_text", text, |text| {
        if let Ok(Ok(request)) = roomcast::protocol::parse(&text) {
            let room = match &request {
                roomcast::protocol::Request::Join { room, .. }
                | roomcast::protocol::Request::Leave { room, .. }
                | roomcast::protocol::Request::Send { room, .. } => room,
            };
            prop_assert!(roomcast::types::valid_room_name(room), "accepted room {room:?}");
        }
        Ok(())
    });
}

/// A send the codec parses gives back exactly the room, text and ref a client
/// encoded with any JSON encoder (here serde_json's).
#[test]
fn protocol_send_round_trips() {
    fuzz(
        "protocol_send_round_trips",
        (room_name(), json_awkward_text(), any::<Option<u64>>()),
        |(room, text, reference)| {
            let frame = serde_json::json!({ "send": room, "text": text, "ref": reference }).to_string();
            match roomcast::protocol::parse(&frame) {
                Ok(Ok(roomcast::protocol::Request::Send { room: r, text: t, reference: n })) => {
                    prop_assert_eq!((r.as_ref(), t.as_ref(), n), (room.as_str(), text.as_str(), reference));
                }
                other => prop_assert!(false, "{frame} parsed as {other:?}"),
            }
            Ok(())
        },
    );
}

/// A delivery the server encodes decodes, with any JSON decoder, to the room and text
/// it was given; a binary delivery splits back into its room and payload.
#[test]
fn protocol_deliveries_round_trip() {
    let payload = proptest::collection::vec(any::<u8>(), 0..300);
    fuzz(
        "protocol_deliveries_round_trip",
        (room_name(), json_awkward_text(), any::<Option<u64>>(), payload),
        |(room, text, offset, payload)| {
            let frame = roomcast::protocol::text_delivery(&room, &text, offset);
            let Some(body) = reference_server_payload(&frame) else {
                return Err(TestCaseError::fail("not one unmasked text frame"));
            };
            let json: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(json["room"].as_str(), Some(room.as_str()));
            prop_assert_eq!(json["text"].as_str(), Some(text.as_str()));
            prop_assert_eq!(json["offset"].as_u64(), offset);
            let frame =
                roomcast::protocol::binary_delivery(&room, &payload).expect("a room name fits the prefix");
            let body = reference_server_payload(&frame).expect("one unmasked binary frame");
            prop_assert_eq!(
                roomcast::protocol::parse_binary(&body),
                Ok(Ok((room.as_str(), payload.as_slice())))
            );
            Ok(())
        },
    );
}

/// The payload of one whole unmasked server frame, read by RFC 6455 section 5.2.
fn reference_server_payload(frame: &[u8]) -> Option<Vec<u8>> {
    let (&first, rest) = frame.split_first()?;
    if first & 0x80 == 0 || first & 0x70 != 0 {
        return None;
    }
    let (&second, rest) = rest.split_first()?;
    if second & 0x80 != 0 {
        return None;
    }
    let (len, rest) = match second & 0x7f {
        126 => (usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)), &rest[2..]),
        127 => (usize::try_from(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?)).ok()?, &rest[8..]),
        len => (usize::from(len), rest),
    };
    (rest.len() == len).then(|| rest.to_vec())
}

// ---------------------------------------------------------------------------------
// permessage-deflate: compressed client messages, and the server's deflated frames.
// ---------------------------------------------------------------------------------

/// `data` deflated as a client does (RFC 7692 7.2.1): a raw deflate stream with a sync
/// flush, its `00 00 ff ff` tail removed. flate2's streaming encoder, not the host's.
fn client_deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.flush().unwrap();
    let mut out = encoder.get_ref().clone();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Payloads that compress a lot or not at all, text or not.
fn deflatable() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (proptest::collection::vec(any::<u8>(), 1..8), 0usize..20_000).prop_map(|(unit, n)| unit
            .iter()
            .copied()
            .cycle()
            .take(n)
            .collect()),
        any_text(2000).prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..3000),
    ]
}

#[test]
fn compressed_messages_inflate_exactly_or_fail_as_the_rfcs_say() {
    fuzz(
        "compressed_messages_inflate_exactly_or_fail_as_the_rfcs_say",
        (deflatable(), any::<bool>(), 1usize..30_000, proptest::collection::vec(any::<Index>(), 0..4)),
        |(payload, text, max, cuts)| {
            let compressed = client_deflate(&payload);
            // The compressed bytes in fragments; RSV1 on the first frame only.
            let mut bounds: Vec<usize> = offsets(&cuts, compressed.len())
                .into_iter()
                .filter(|&p| p > 0 && p < compressed.len())
                .collect();
            bounds.sort_unstable();
            bounds.dedup();
            bounds.push(compressed.len());
            let mut bytes = Vec::new();
            let mut start = 0;
            for (i, &end) in bounds.iter().enumerate() {
                let opcode = match (i, text) {
                    (0, true) => TEXT,
                    (0, false) => BINARY,
                    _ => CONTINUATION,
                };
                let mut frame =
                    client_frame(i + 1 == bounds.len(), opcode, &compressed[start..end], [9, 8, 7, 6]);
                if i == 0 {
                    frame[0] |= 0x40;
                }
                bytes.extend(frame);
                start = end;
            }
            let mut decoder = Decoder::with_inflate(max);
            let mut buf = BytesMut::from(&bytes[..]);
            let result = decoder.decode(&mut buf);
            let too_big =
                compressed.len() > roomcast::ws::deflate::compressed_bound(max) || payload.len() > max;
            let bad_text = text && !utf8(&payload);
            match result {
                Ok(Some(Event::Message { text: got_text, payload: got })) => {
                    prop_assert!(!too_big && !bad_text, "accepted a message it should refuse");
                    prop_assert_eq!(got_text, text);
                    prop_assert_eq!(&got[..], &payload[..]);
                }
                Err(DecodeError::TooBig(_)) => prop_assert!(too_big, "refused as too big: {}", payload.len()),
                Err(DecodeError::InvalidUtf8) => prop_assert!(bad_text, "refused valid UTF-8"),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
            Ok(())
        },
    );
}

#[test]
fn arbitrary_compressed_bytes_never_inflate_past_the_limit() {
    fuzz(
        "arbitrary_compressed_bytes_never_inflate_past_the_limit",
        (proptest::collection::vec(any::<u8>(), 0..600), any::<bool>(), 1usize..5000),
        |(data, text, max)| {
            let mut frame = client_frame(true, if text { TEXT } else { BINARY }, &data, [1, 2, 3, 4]);
            frame[0] |= 0x40;
            let mut buf = BytesMut::from(&frame[..]);
            match Decoder::with_inflate(max).decode(&mut buf) {
                Ok(Some(Event::Message { payload, .. })) => {
                    prop_assert!(payload.len() <= max);
                    prop_assert!(!text || utf8(&payload));
                }
                Ok(other) => prop_assert!(false, "a whole frame gave {:?}", other),
                Err(error) => prop_assert!(matches!(error.close_code(), INVALID_DATA | TOO_BIG)),
            }
            Ok(())
        },
    );
}
