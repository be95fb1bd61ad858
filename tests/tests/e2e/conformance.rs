//! RFC 6455 conformance with raw frames over TCP, one data-driven test per category:
//! fragmentation, control frames inside fragmented messages, reserved bits, unknown
//! opcodes, close codes, and the limits (size, UTF-8, masking, control frame rules).

use roomcast::ws::frame::{OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, encode_client};
use roomcast_tests::*;
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::tungstenite::Message;

const MASK: [u8; 4] = [1, 2, 3, 4];

fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_client(fin, opcode, payload, MASK)
}

fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(reason);
    frame(true, OP_CLOSE, &body)
}

/// What a case must produce.
enum Expect {
    /// The observer receives these messages (then the end marker), and the sender
    /// receives a pong for each ping it sent.
    Delivered { messages: Vec<Message>, pongs: usize },
    /// The server closes the sender's connection with this code.
    Close(u16),
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    expect: Expect,
}

fn case(name: impl Into<String>, frames: &[Vec<u8>], expect: Expect) -> Case {
    Case { name: name.into(), bytes: frames.concat(), expect }
}

async fn run(cases: Vec<Case>) {
    let config = roomcast::config::Config { max_message_bytes: 1000, ..test_config() };
    let server = TestServer::start(config).await;
    for case in cases {
        let room = "conformance";
        let mut observer = server.connect(room).await;
        let mut sender = raw_ws(server.addr, room).await.unwrap();
        server.wait_metric("roomcast_room_members", 2.0, std::time::Duration::from_secs(5)).await;
        sender.write_all(&case.bytes).await.unwrap();
        match case.expect {
            Expect::Delivered { messages, pongs } => {
                sender.write_all(&frame(true, OP_TEXT, b"end")).await.unwrap();
                for message in messages {
                    assert_eq!(recv(&mut observer).await, message, "{}", case.name);
                }
                assert_eq!(recv(&mut observer).await, Message::text("end"), "{}", case.name);
                for _ in 0..pongs {
                    let (opcode, _) = read_frame(&mut sender).await.unwrap();
                    assert_eq!(opcode, OP_PONG, "{}: expected a pong", case.name);
                }
            }
            Expect::Close(code) => {
                assert_eq!(read_close(&mut sender).await, Some(code), "{}", case.name);
            }
        }
        drop(sender);
        drop(observer);
        server.wait_metric("roomcast_room_members", 0.0, std::time::Duration::from_secs(5)).await;
    }
    server.stop().await;
}

fn delivered(messages: Vec<Message>) -> Expect {
    Expect::Delivered { messages, pongs: 0 }
}

#[tokio::test]
async fn fragmentation() {
    run(vec![
        case(
            "text in three fragments",
            &[
                frame(false, OP_TEXT, b"he"),
                frame(false, OP_CONTINUATION, b"ll"),
                frame(true, OP_CONTINUATION, b"o"),
            ],
            delivered(vec![Message::text("hello")]),
        ),
        case(
            "binary in two fragments",
            &[frame(false, OP_BINARY, &[1, 2]), frame(true, OP_CONTINUATION, &[3])],
            delivered(vec![Message::binary(vec![1u8, 2, 3])]),
        ),
        case(
            "empty fragments",
            &[
                frame(false, OP_TEXT, b""),
                frame(false, OP_CONTINUATION, b""),
                frame(true, OP_CONTINUATION, b"x"),
            ],
            delivered(vec![Message::text("x")]),
        ),
        case(
            "utf-8 split across fragments",
            &[
                frame(false, OP_TEXT, &"é".as_bytes()[..1]),
                frame(true, OP_CONTINUATION, &"é".as_bytes()[1..]),
            ],
            delivered(vec![Message::text("é")]),
        ),
        case("continuation without a start", &[frame(true, OP_CONTINUATION, b"x")], Expect::Close(1002)),
        case(
            "new message inside a fragmented one",
            &[frame(false, OP_TEXT, b"a"), frame(true, OP_TEXT, b"b")],
            Expect::Close(1002),
        ),
        case(
            "fragments over the size limit",
            &[frame(false, OP_BINARY, &[0; 600]), frame(true, OP_CONTINUATION, &[0; 600])],
            Expect::Close(1009),
        ),
    ])
    .await;
}

#[tokio::test]
async fn control_frames_inside_fragmented_messages() {
    run(vec![
        case(
            "ping between fragments",
            &[frame(false, OP_TEXT, b"a"), frame(true, OP_PING, b"p"), frame(true, OP_CONTINUATION, b"b")],
            Expect::Delivered { messages: vec![Message::text("ab")], pongs: 1 },
        ),
        case(
            "pong between fragments",
            &[frame(false, OP_TEXT, b"a"), frame(true, OP_PONG, b""), frame(true, OP_CONTINUATION, b"b")],
            delivered(vec![Message::text("ab")]),
        ),
        case(
            "close between fragments",
            &[frame(false, OP_TEXT, b"a"), close_frame(1000, b"")],
            Expect::Close(1000),
        ),
        case("fragmented ping", &[frame(false, OP_PING, b"p")], Expect::Close(1002)),
        case("ping over 125 bytes", &[frame(true, OP_PING, &[0; 126])], Expect::Close(1002)),
    ])
    .await;
}

#[tokio::test]
async fn reserved_bits() {
    let mut cases = Vec::new();
    for bit in [0x40u8, 0x20, 0x10] {
        let mut bytes = frame(true, OP_TEXT, b"x");
        bytes[0] |= bit;
        cases.push(case(format!("rsv bit {bit:#x}"), &[bytes], Expect::Close(1002)));
    }
    let mut ping = frame(true, OP_PING, b"");
    ping[0] |= 0x40;
    cases.push(case("rsv on a ping", &[ping], Expect::Close(1002)));
    run(cases).await;
}

#[tokio::test]
async fn unknown_opcodes() {
    let cases = [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]
        .into_iter()
        .map(|op| case(format!("opcode {op:#x}"), &[frame(true, op, b"")], Expect::Close(1002)))
        .collect();
    run(cases).await;
}

#[tokio::test]
async fn close_codes() {
    let mut cases = Vec::new();
    for code in [1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
        cases.push(case(
            format!("valid code {code} is echoed"),
            &[close_frame(code, b"bye")],
            Expect::Close(code),
        ));
    }
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535] {
        cases.push(case(format!("invalid code {code}"), &[close_frame(code, b"")], Expect::Close(1002)));
    }
    cases.push(case("empty close gets 1000", &[frame(true, OP_CLOSE, b"")], Expect::Close(1000)));
    cases.push(case("one-byte close body", &[frame(true, OP_CLOSE, &[3])], Expect::Close(1002)));
    cases.push(case("invalid utf-8 close reason", &[close_frame(1000, &[0xff, 0xfe])], Expect::Close(1007)));
    run(cases).await;
}

#[tokio::test]
async fn limits_and_encoding() {
    let mut unmasked = frame(true, OP_TEXT, b"x");
    unmasked[1] &= 0x7F;
    unmasked.drain(2..6);
    let mut long_short = vec![0x81, 0x80 | 126, 0, 5];
    long_short.extend_from_slice(&MASK);
    long_short.extend(b"hello".iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
    run(vec![
        case("invalid utf-8 text", &[frame(true, OP_TEXT, &[0xc3, 0x28])], Expect::Close(1007)),
        case("message over the limit", &[frame(true, OP_BINARY, &[0; 1001])], Expect::Close(1009)),
        case(
            "message at the limit",
            &[frame(true, OP_BINARY, &[7; 1000])],
            delivered(vec![Message::binary(vec![7u8; 1000])]),
        ),
        case("unmasked client frame", &[unmasked], Expect::Close(1002)),
        case("length not minimally encoded", &[long_short], Expect::Close(1002)),
        case(
            "ping answered with its payload",
            &[frame(true, OP_PING, b"abc")],
            Expect::Delivered { messages: vec![], pongs: 1 },
        ),
    ])
    .await;
}
