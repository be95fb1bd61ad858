#!/usr/bin/env python3
"""permessage-deflate (RFC 7692) conformance of a Roomcast server.

Modelled on the Autobahn|Testsuite's compression cases. Every case opens a WebSocket
to its own room of the `echo` plugin (which sends each message back to its sender
only, unchanged: text as text, binary as binary) with one or more `permessage-deflate`
offers, and checks:

- the server's `Sec-WebSocket-Extensions` answer, parameter by parameter, against
  what Roomcast negotiates (below), and the extension the client then runs;
- every message it sends comes back byte for byte, with its type;
- each echo's first frame has RSV1 only where the server may compress: on a
  connection that negotiated the extension, a message of at least the threshold's
  size, unless the offer limited the server to a 256-byte window
  (`server_max_window_bits=8`, which zlib cannot deflate with); and it has RSV1 where
  the server must: there, when deflate saves at least a tenth of the message (one
  that does not shrink may go plain, as RFC 7692 allows for any message);
- each compressed echo inflates with the window the server was limited to, and on its
  own (the server never keeps its context from one message to the next), since the
  client's inflater is sized and reset accordingly;
- the connection ends with a clean close (1000).

Cases:

- 12.x: one offer (`permessage-deflate`), messages of 16 B to 4 MiB, of six kinds:
  repetitive text and binary, JSON chat text and its bytes, random bytes, and random
  text of one- to four-byte characters; many messages per case.
- 13.1.x: the client's parameters (client_no_context_takeover, client_max_window_bits)
  in (False, none), (True, none), (False and True, no value), (False and True, 9..15).
- 13.2.x: the server's parameters: server_max_window_bits none and 8..15, each with
  server_no_context_takeover off and on.
- 13.3.x: both sides' parameters together.
- 13.4.x: the client's deflate settings: stored blocks, fixed and Huffman-only codes,
  run-length, levels and memory levels.
- 13.5.x: several alternatives in one header: invalid ones skipped, the first valid
  one taken; none valid leaves the connection uncompressed.
- 14.x: fragmented compressed messages (one deflate stream over all the fragments,
  RSV1 on the first only), fragments splitting multi-byte characters, empty
  fragments and empty messages.

How Roomcast answers: it walks the offers in order and accepts the first valid
`permessage-deflate` one; the answer is always `server_no_context_takeover` and
`client_no_context_takeover`, plus `server_max_window_bits=N` when the offer asked for
it (N echoed), never `client_max_window_bits`. An offer with an unknown parameter, a
duplicate, a value out of 8..15 (a decimal without leading zeros, possibly quoted), a
value on a parameter that takes none, or `server_max_window_bits` without a value is
invalid and skipped.

Usage: permessage_deflate.py --url ws://HOST:PORT [--room-prefix echo:]
       [--threshold 256] [--only ID-PREFIX] [--quick] [--list]
       (or --url wss://HOST:PORT [--cafile CA.pem] over TLS)

Prints one line per case and a summary line; exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import ssl
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import websockets
from websockets.asyncio.client import connect
from websockets.exceptions import NegotiationError
from websockets.extensions.base import ClientExtensionFactory
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory, PerMessageDeflate
from websockets.frames import Opcode
from websockets.headers import parse_extension

PINNED = "17.4"
KIB = 1024
MIB = 1024 * KIB
TIMEOUT = 60.0
NAME = "permessage-deflate"
WINDOW_BITS = [str(bits) for bits in range(8, 16)]


# --- What Roomcast answers -------------------------------------------------------------


def unquote(value: str | None) -> str | None:
    if value is not None and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value


def roomcast_answer(offers: Sequence[tuple[str, Sequence[tuple[str, str | None]]]]):
    """The parameters Roomcast answers for these offers (in order), or None."""
    for name, params in offers:
        if name != NAME:
            continue
        seen: set[str] = set()
        server_bits = None
        valid = True
        for param, value in params:
            value = unquote(value)
            if param in seen:
                valid = False
            elif param in ("server_no_context_takeover", "client_no_context_takeover"):
                valid = value is None
            elif param == "server_max_window_bits":
                valid = value in WINDOW_BITS
                server_bits = value
            elif param == "client_max_window_bits":
                valid = value is None or value in WINDOW_BITS
            else:
                valid = False
            seen.add(param)
            if not valid:
                break
        if valid:
            answer = [("server_no_context_takeover", None), ("client_no_context_takeover", None)]
            if server_bits is not None:
                answer.append(("server_max_window_bits", server_bits))
            return answer
    return None


def show_params(name: str, params: Sequence[tuple[str, str | None]]) -> str:
    return "; ".join([name] + [p if v is None else f"{p}={v}" for p, v in params])


# --- Offers ------------------------------------------------------------------------------


class RawOffer(ClientExtensionFactory):
    """An offer sent exactly as written, that this client never takes up (an answer
    to it fails the handshake, which is what the case wants when the offer is invalid)."""

    def __init__(self, params: Sequence[tuple[str, str | None]], name: str = NAME):
        self.name = name  # type: ignore[assignment]
        self.params = list(params)

    def get_request_params(self):
        return self.params

    def process_response_params(self, params, accepted_extensions):
        raise NegotiationError(f"{show_params(self.name, self.params)} is not an offer this client runs")


class QuotedOffer(ClientPerMessageDeflateFactory):
    """A valid offer whose values are written as quoted strings (RFC 7692 section 7.1)."""

    def get_request_params(self):
        return [(p, v if v is None else f'"{v}"') for p, v in super().get_request_params()]


def deflate(
    server_no_context_takeover: bool = False,
    client_no_context_takeover: bool = False,
    server_max_window_bits: int | None = None,
    client_max_window_bits: int | bool | None = None,
    compress_settings: dict | None = None,
) -> ClientPerMessageDeflateFactory:
    return ClientPerMessageDeflateFactory(
        server_no_context_takeover=server_no_context_takeover,
        client_no_context_takeover=client_no_context_takeover,
        server_max_window_bits=server_max_window_bits,
        client_max_window_bits=client_max_window_bits,
        compress_settings=compress_settings,
    )


# --- Payloads ----------------------------------------------------------------------------

WORDS = (
    "room member message broadcast deflate window lobby match player score presence typing "
    "hello world latency socket frame server client plugin history offset epoch join leave"
).split()
NAMES = ["ada", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
# One-, two-, three- and four-byte UTF-8 characters.
CHARS = "aZ9 ~é߿ࠀ€中文日本語한국어\U00010000\U0001f600\U0010ffff"


def rng_for(*seed) -> random.Random:
    return random.Random(repr(seed))


def repetitive(size: int, seed) -> bytes:
    unit = f"Roomcast rooms broadcast to every member ({seed!r}). ".encode()
    return (unit * (size // len(unit) + 1))[:size]


def chat_json(size: int, seed) -> bytes:
    rng = rng_for("json", seed)
    out = bytearray()
    offset = rng.randrange(1, 10**6)
    while len(out) < size:
        event = {
            "room": f"chat:{rng.choice(['lobby', 'support', 'match-7'])}",
            "offset": offset,
            "text": json.dumps(
                {
                    "type": "say",
                    "name": rng.choice(NAMES),
                    "id": rng.randrange(1, 2**32),
                    "text": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 25))),
                    "at": 1_700_000_000_000 + rng.randrange(10**9),
                }
            ),
        }
        out += json.dumps(event).encode() + b"\n"
        offset += 1
    return bytes(out[:size])


def random_bytes(size: int, seed) -> bytes:
    return rng_for("random", seed).randbytes(size)


def unicode_text(size: int, seed) -> bytes:
    """Random characters of one to four bytes in UTF-8, exactly `size` bytes."""
    rng = rng_for("unicode", seed)
    out = bytearray()
    while True:
        char = rng.choice(CHARS).encode()
        if len(out) + len(char) > size:
            break
        out += char
    return bytes(out + b"x" * (size - len(out)))


SIXTEEN = bytes(b"0123456789abcdef"[byte & 15] for byte in range(256))


def periodic(size: int, seed, period: int) -> bytes:
    """Random blocks of `period` bytes of 16 symbols (which deflate shrinks in any
    window), each repeated: a deflater can refer back `period` bytes, which a window
    smaller than that does not reach."""
    rng = rng_for("periodic", seed, period)
    out = bytearray()
    while len(out) < size:
        block = rng.randbytes(period).translate(SIXTEEN)
        out += block * 3
    return bytes(out[:size])


@dataclass
class Message:
    data: bytes
    text: bool
    # Fragment sizes, for a message sent fragmented (the rest goes in a last fragment).
    fragments: list[int] | None = None

    def describe(self) -> str:
        kind = "text" if self.text else "binary"
        frag = f" in {len(self.fragments) + 1} fragments" if self.fragments is not None else ""
        return f"{kind} {len(self.data)} B{frag}"


@dataclass
class Case:
    id: str
    title: str
    offers: list[ClientExtensionFactory]
    # The messages to send, given the server_max_window_bits the server should answer.
    messages: Callable[[int | None], list[Message]]


def size_name(size: int) -> str:
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    if size >= KIB and size % KIB == 0:
        return f"{size // KIB} KiB"
    return f"{size} B"


# --- The cases ---------------------------------------------------------------------------

KINDS: list[tuple[str, bool, Callable[[int, object], bytes]]] = [
    ("repetitive text", True, repetitive),
    ("repetitive binary", False, repetitive),
    ("JSON text", True, chat_json),
    ("JSON as binary", False, chat_json),
    ("random binary", False, random_bytes),
    ("random one- to four-byte characters", True, unicode_text),
]
SIZES_12 = [16, 64, 256, KIB, 4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, MIB, 4 * MIB]


# Messages per case, by size: many small ones, a few of the largest.
COUNTS_12 = {16: 100, 64: 100, 256: 100, KIB: 100, 4 * KIB: 64, 8 * KIB: 32, 16 * KIB: 16, 32 * KIB: 8,
             64 * KIB: 6, 128 * KIB: 4, MIB: 2, 4 * MIB: 2}


def count_12(size: int, quick: bool) -> int:
    count = COUNTS_12[size]
    return max(1, count // 10) if quick else count


def messages_of(kind: Callable[[int, object], bytes], text: bool, size: int, count: int, seed) -> list[Message]:
    """`count` messages: pairs of the same message (a server that kept its context would
    refer to the first of a pair in the second), each pair another message."""
    out = []
    for n in range(count):
        out.append(Message(kind(size, (seed, n // 2)), text))
    return out


def mixed_workload(quick: bool, seed, server_bits: int | None) -> list[Message]:
    """13.x: JSON text, random characters, and binary repeating just past the window
    the server may use, from 16 B to 128 KiB."""
    window = 1 << (server_bits or 15)
    period = min(window + 300, 40 * KIB)
    out = []
    for size in [16, 256, KIB, 4 * KIB, 16 * KIB, 64 * KIB, 128 * KIB]:
        count = 6 if size <= 4 * KIB else 4 if size <= 16 * KIB else 2
        if quick:
            count = min(count, 2)
        for n in range(count):
            s = (seed, size, n // 2)
            out.append(Message(chat_json(size, s), True))
            out.append(Message(unicode_text(size, s), True))
            out.append(Message(periodic(size, s, period), False))
    return out


def cases(quick: bool) -> list[Case]:
    out: list[Case] = []

    # 12.x: sizes and compressibility under one plain offer.
    for k, (kind_name, text, kind) in enumerate(KINDS, start=1):
        for s, size in enumerate(SIZES_12, start=1):
            count = count_12(size, quick)
            out.append(
                Case(
                    f"12.{k}.{s}",
                    f"{kind_name}, {count} x {size_name(size)}",
                    [deflate()],
                    lambda _, kind=kind, text=text, size=size, count=count, k=k, s=s: messages_of(
                        kind, text, size, count, (12, k, s)
                    ),
                )
            )

    # 13.1.x: the client's parameters.
    n = 0
    for client_bits in [None, True, 9, 10, 11, 12, 13, 14, 15]:
        for client_no_context in [False, True]:
            n += 1
            offer = deflate(client_no_context_takeover=client_no_context, client_max_window_bits=client_bits)
            out.append(
                Case(
                    f"13.1.{n}",
                    "offer " + show_params(NAME, offer.get_request_params()),
                    [offer],
                    lambda bits, n=n: mixed_workload(quick, (13, 1, n), bits),
                )
            )

    # 13.2.x: the server's parameters.
    n = 0
    for server_bits in [None, 8, 9, 10, 11, 12, 13, 14, 15]:
        for server_no_context in [False, True]:
            n += 1
            offer = deflate(server_no_context_takeover=server_no_context, server_max_window_bits=server_bits)
            out.append(
                Case(
                    f"13.2.{n}",
                    "offer " + show_params(NAME, offer.get_request_params()),
                    [offer],
                    lambda bits, n=n: mixed_workload(quick, (13, 2, n), bits),
                )
            )

    # 13.3.x: both sides at once.
    for n, (snct, cnct, sbits, cbits) in enumerate(
        [
            (True, True, 9, 9),
            (False, False, 15, 15),
            (True, False, 10, 12),
            (False, True, 12, True),
            (True, True, 8, 9),
            (False, False, 11, None),
            (True, True, 14, 15),
            (False, True, 13, 10),
        ],
        start=1,
    ):
        offer = deflate(snct, cnct, sbits, cbits)
        out.append(
            Case(
                f"13.3.{n}",
                "offer " + show_params(NAME, offer.get_request_params()),
                [offer],
                lambda bits, n=n: mixed_workload(quick, (13, 3, n), bits),
            )
        )

    # 13.4.x: how the client deflates (the server must inflate every block type).
    for n, (title, settings) in enumerate(
        [
            ("stored blocks (level 0)", {"level": 0}),
            ("fixed Huffman codes", {"strategy": zlib.Z_FIXED}),
            ("Huffman codes only", {"strategy": zlib.Z_HUFFMAN_ONLY}),
            ("run-length matches", {"strategy": zlib.Z_RLE}),
            ("level 1", {"level": 1}),
            ("level 9, memory level 9", {"level": 9, "memLevel": 9}),
            ("memory level 1", {"memLevel": 1}),
        ],
        start=1,
    ):
        out.append(
            Case(
                f"13.4.{n}",
                f"client deflates with {title}",
                [deflate(client_max_window_bits=True, compress_settings=settings)],
                lambda bits, n=n: mixed_workload(quick, (13, 4, n), bits),
            )
        )

    # 13.5.x: several alternatives in one header.
    alternatives: list[tuple[str, list[ClientExtensionFactory]]] = [
        ("an unknown parameter, then a valid offer", [RawOffer([("foo", "1")]), deflate(server_max_window_bits=10)]),
        ("two valid offers: the first is taken", [deflate(server_max_window_bits=10), deflate()]),
        ("a plain offer before one with a window: the plain one is taken", [deflate(), deflate(server_max_window_bits=10)]),
        (
            "Autobahn 13.7: (True, 9), (True, no value), (False, none)",
            [
                deflate(client_no_context_takeover=True, client_max_window_bits=9),
                deflate(client_no_context_takeover=True, client_max_window_bits=True),
                deflate(),
            ],
        ),
        (
            "a duplicate, a window out of range, then a valid offer",
            [
                RawOffer([("client_no_context_takeover", None), ("client_no_context_takeover", None)]),
                RawOffer([("server_max_window_bits", "16")]),
                deflate(client_no_context_takeover=True),
            ],
        ),
        (
            "a value on a parameter that takes none, then a valid offer",
            [RawOffer([("server_no_context_takeover", "1")]), deflate(server_max_window_bits=12)],
        ),
        (
            "server_max_window_bits without a value, then =8 (sent uncompressed)",
            [RawOffer([("server_max_window_bits", None)]), deflate(server_max_window_bits=8)],
        ),
        ("an unknown extension, then a valid offer", [RawOffer([("x", None)], name="x-webkit-deflate-frame"), deflate()]),
        ("a valid offer, then an invalid one", [deflate(server_max_window_bits=11), RawOffer([("bar", None)])]),
        (
            "no valid offer: an uncompressed connection",
            [
                RawOffer([("foo", None)]),
                RawOffer([("server_max_window_bits", "7")]),
                RawOffer([("client_max_window_bits", "16")]),
                RawOffer([("server_max_window_bits", "010")]),
            ],
        ),
        ("a quoted window value (RFC 7692 7.1)", [QuotedOffer(server_max_window_bits=11, client_max_window_bits=10)]),
        ("a window with a leading zero, then a valid offer", [RawOffer([("server_max_window_bits", "09")]), deflate()]),
        ("Chromium's offer", [deflate(client_max_window_bits=True)]),
        (
            "a second duplicate shape (client_max_window_bits twice), then a valid offer",
            [RawOffer([("client_max_window_bits", "10"), ("client_max_window_bits", "11")]), deflate(server_max_window_bits=9)],
        ),
    ]
    for n, (title, offers) in enumerate(alternatives, start=1):
        out.append(
            Case(f"13.5.{n}", title, offers, lambda bits, n=n: mixed_workload(True, (13, 5, n), bits))
        )

    # 14.x: fragmented compressed messages.
    def fragmented(data: bytes, text: bool, every: int) -> Message:
        return Message(data, text, [every] * ((len(data) - 1) // every) if data else [])

    fragment_cases = [
        ("text of 1 KiB in 1-byte fragments", [deflate()], lambda: [fragmented(chat_json(KIB, 1), True, 1)] * 2),
        (
            "JSON text of 64 KiB in 4 KiB fragments",
            [deflate()],
            lambda: [fragmented(chat_json(64 * KIB, (2, n)), True, 4 * KIB) for n in range(4)],
        ),
        (
            "random binary of 128 KiB in 16 KiB fragments",
            [deflate()],
            lambda: [fragmented(random_bytes(128 * KIB, (3, n)), False, 16 * KIB) for n in range(3)],
        ),
        (
            "text of 16 KiB split inside multi-byte characters (every 7 bytes)",
            [deflate(client_max_window_bits=True)],
            lambda: [fragmented(unicode_text(16 * KIB, (4, n)), True, 7) for n in range(3)],
        ),
        (
            "repetitive binary of 1 MiB in 64 KiB fragments",
            [deflate()],
            lambda: [fragmented(repetitive(MIB, 5), False, 64 * KIB)] * 2,
        ),
        (
            "text of 100 B in 10 fragments (its echo under the threshold)",
            [deflate()],
            lambda: [fragmented(chat_json(100, (6, n)), True, 10) for n in range(4)],
        ),
        (
            "an empty first fragment, then 2 KiB of text",
            [deflate()],
            lambda: [Message(chat_json(2 * KIB, (7, n)), True, [0, 1000]) for n in range(4)],
        ),
        (
            "binary of 300 B in two fragments under the threshold (the echo over it)",
            [deflate()],
            lambda: [Message(random_bytes(300, (8, n)), False, [150]) for n in range(4)],
        ),
        (
            "text of 32 KiB in 1000-byte fragments, server_max_window_bits=9 and no context takeover",
            [deflate(True, True, 9, 9)],
            lambda: [fragmented(chat_json(32 * KIB, (9, n)), True, 1000) for n in range(4)],
        ),
        (
            "empty messages, whole and in fragments",
            [deflate()],
            lambda: [Message(b"", True), Message(b"", False), Message(b"", True, [0, 0]), Message(b"", False, [0])],
        ),
    ]
    for n, (title, offers, messages) in enumerate(fragment_cases, start=1):
        out.append(Case(f"14.{n}", title, offers, lambda _, messages=messages: messages()))
    return out


# --- Running a case ----------------------------------------------------------------------


class CaseFailed(Exception):
    pass


def chunks(message: Message):
    data, at = message.data, 0
    for size in message.fragments or []:
        yield data[at : at + size]
        at += size
    yield data[at:]


async def raw_answer(host: str, port: int, path: str, offers: list[ClientExtensionFactory], tls) -> str:
    """The server's Sec-WebSocket-Extensions answer to these offers, read off a plain
    socket (for a failure message when the client could not run what it answered)."""
    header = ", ".join(show_params(o.name, o.get_request_params()) for o in offers)
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Extensions: {header}\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    writer.close()
    lines = head.decode(errors="replace").split("\r\n")
    answers = [line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("sec-websocket-extensions:")]
    return f"{lines[0]}; Sec-WebSocket-Extensions: {', '.join(answers) or '(none)'}"


async def run_case(case: Case, args) -> str:
    """Run one case; returns a summary of what it did, or raises CaseFailed."""
    room = f"{args.room_prefix}{case.id}"
    url = f"{args.url}/ws/{room}"
    host, port = args.url.split("://", 1)[1].rsplit(":", 1)
    offered = [(o.name, list(o.get_request_params())) for o in case.offers]
    expected = roomcast_answer(offered)
    try:
        ws = await connect(
            url,
            extensions=case.offers,
            compression=None,
            proxy=None,
            open_timeout=TIMEOUT,
            ping_interval=None,
            close_timeout=TIMEOUT,
            ssl=args.tls,
            max_size=64 * MIB,
            max_queue=64,
            write_limit=MIB,
        )
    except Exception as error:
        try:
            answer = await raw_answer(host, int(port), f"/ws/{room}", case.offers, args.tls)
        except Exception as probe:  # noqa: BLE001
            answer = f"(could not read the answer again: {probe!r})"
        wanted = show_params(NAME, expected) if expected else "(none)"
        raise CaseFailed(f"handshake failed: {error!r}; expected answer {wanted}; server: {answer}") from None

    try:
        # The answer, parameter by parameter (order aside), and nothing else.
        headers = ws.response.headers.get_all("Sec-WebSocket-Extensions")
        answered = [item for value in headers for item in parse_extension(value)]
        got = [(name, sorted(params, key=str)) for name, params in answered]
        want = [] if expected is None else [(NAME, sorted(expected, key=str))]
        if got != want:
            raise CaseFailed(f"answer {headers or '(none)'}, expected {show_params(NAME, expected) if expected else '(none)'}")
        server_bits = None
        if expected is not None:
            server_bits = dict(expected).get("server_max_window_bits")
            server_bits = int(server_bits) if server_bits is not None else None
        extensions = ws.protocol.extensions
        compressed_flags: deque[bool] = deque()
        if expected is None:
            if extensions:
                raise CaseFailed(f"no extension was answered, but the client runs {extensions}")
        else:
            if len(extensions) != 1 or not isinstance(extensions[0], PerMessageDeflate):
                raise CaseFailed(f"the client runs {extensions}")
            ext = extensions[0]
            if not ext.remote_no_context_takeover or ext.remote_max_window_bits != (server_bits or 15):
                raise CaseFailed(f"the client runs {ext!r}")
            decode = ext.decode

            def recording_decode(frame, *, max_size=None, decode=decode):
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    compressed_flags.append(frame.rsv1)
                return decode(frame, max_size=max_size)

            ext.decode = recording_decode

        messages = case.messages(server_bits)
        total, squeezed = await exchange(ws, messages, expected is not None, server_bits, args.threshold, compressed_flags)
        await ws.close()
        if ws.close_code != 1000:
            raise CaseFailed(f"closed with {ws.close_code} {ws.close_reason!r}, expected 1000")
        answer = ", ".join(headers) or "none"
        return f"{len(messages)} messages ({squeezed} echoes compressed), {total} bytes each way; answer: {answer}"
    finally:
        await ws.close()


def may_compress(data: bytes, threshold: int, server_bits: int | None) -> bool:
    """Whether the server may send this message compressed: at least the threshold,
    and a window zlib can deflate with."""
    return len(data) >= threshold and server_bits != 8


def must_compress(data: bytes, threshold: int, server_bits: int | None) -> bool:
    """Whether it must: it may, and deflate saves at least a tenth of it (a message
    that deflate does not shrink may go plain, as RFC 7692 allows any message to)."""
    if not may_compress(data, threshold, server_bits):
        return False
    deflater = zlib.compressobj(wbits=-(server_bits or 15))
    size = len(deflater.compress(data) + deflater.flush(zlib.Z_SYNC_FLUSH)) - 4
    return size <= len(data) * 0.9


def how_it_closed(closed: websockets.ConnectionClosed) -> str:
    server = f"the server closed with {closed.rcvd.code} {closed.rcvd.reason!r}" if closed.rcvd else "no close from the server"
    client = f"the client closed with {closed.sent.code} {closed.sent.reason!r}" if closed.sent else "no close from the client"
    return f"the connection closed: {server}, {client}"


async def exchange(ws, messages, negotiated, server_bits, threshold, compressed_flags) -> tuple[int, int]:
    """Send the messages, a few ahead of their echoes, and check each echo; the bytes
    sent and how many echoes came compressed."""
    pending: deque[tuple[int, Message]] = deque()
    in_flight = 0
    total = 0
    squeezed = 0

    async def check_next():
        nonlocal in_flight, squeezed
        index, sent = pending.popleft()
        in_flight -= len(sent.data)
        try:
            got = await asyncio.wait_for(ws.recv(), TIMEOUT)
        except TimeoutError:
            raise CaseFailed(f"message {index} ({sent.describe()}): no echo within {TIMEOUT:.0f} s") from None
        except websockets.ConnectionClosed as closed:
            raise CaseFailed(f"message {index} ({sent.describe()}): {how_it_closed(closed)}") from None
        want = sent.data.decode() if sent.text else sent.data
        if type(got) is not type(want):
            raise CaseFailed(f"message {index} ({sent.describe()}): came back as {type(got).__name__}")
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise CaseFailed(
                f"message {index} ({sent.describe()}): echo differs at {at} (length {len(got)}, sent {len(want)})"
            )
        if negotiated:
            compressed = compressed_flags.popleft()
            squeezed += compressed
            if compressed and not may_compress(sent.data, threshold, server_bits):
                raise CaseFailed(
                    f"message {index} ({sent.describe()}): its echo came compressed (RSV1), expected it plain "
                    f"(threshold {threshold}{', server_max_window_bits=8' if server_bits == 8 else ''})"
                )
            if not compressed and must_compress(sent.data, threshold, server_bits):
                raise CaseFailed(f"message {index} ({sent.describe()}): its echo came plain, expected it compressed")

    for index, message in enumerate(messages):
        while pending and (len(pending) >= 16 or in_flight + len(message.data) > 8 * MIB):
            await check_next()
        try:
            if message.fragments is None:
                await ws.send(message.data.decode() if message.text else message.data)
            else:
                await ws.send(chunks(message), text=message.text)
        except websockets.ConnectionClosed as closed:
            raise CaseFailed(f"sending message {index} ({message.describe()}): {how_it_closed(closed)}") from None
        pending.append((index, message))
        in_flight += len(message.data)
        total += len(message.data)
    while pending:
        await check_next()
    return total, squeezed


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="the server, ws://HOST:PORT or wss://HOST:PORT")
    parser.add_argument("--cafile", help="over wss://, trust the server certificate's authority in this PEM file")
    parser.add_argument("--room-prefix", default="echo:", help="rooms of the echo plugin start with this")
    parser.add_argument("--threshold", type=int, default=256, help="the server's compression_threshold")
    parser.add_argument("--only", action="append", default=[], help="run the cases whose id starts with this")
    parser.add_argument("--quick", action="store_true", help="fewer messages per case")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args()
    if websockets.version.version != PINNED:
        print(f"websockets {websockets.version.version} is installed, the suite is pinned to {PINNED}")
        return 2

    selected = [c for c in cases(args.quick) if not args.only or any(c.id.startswith(p) for p in args.only)]
    if args.list:
        for case in selected:
            print(f"{case.id} {case.title}")
        return 0
    if not args.url:
        parser.error("--url is required")
    args.url = args.url.rstrip("/")
    args.tls = None
    if args.url.startswith("wss://"):
        args.tls = ssl.create_default_context(cafile=args.cafile)
    failed = []
    started = time.monotonic()
    for case in selected:
        began = time.monotonic()
        try:
            summary = await run_case(case, args)
            print(f"PASS {case.id} {case.title}: {summary} ({time.monotonic() - began:.2f} s)", flush=True)
        except CaseFailed as failure:
            failed.append(case.id)
            print(f"FAIL {case.id} {case.title}: {failure}", flush=True)
        except Exception as error:  # noqa: BLE001
            failed.append(case.id)
            print(f"FAIL {case.id} {case.title}: {error!r}", flush=True)
    elapsed = time.monotonic() - started
    print(
        f"permessage-deflate conformance: {len(selected) - len(failed)} of {len(selected)} cases passed "
        f"in {elapsed:.1f} s" + (f"; failed: {' '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
