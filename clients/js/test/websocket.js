// A WebSocket for Node versions without one (Debian 12's Node 18): the browser's
// interface, as much of it as the client uses, over a plain TCP socket (RFC 6455
// client side: masked frames out, fragmented messages in, pings answered). The tests
// install it only where `globalThis.WebSocket` is missing; Node 22 (and Node 20.10+
// with --experimental-websocket) bring their own.

import { randomBytes, createHash } from "node:crypto";
import { connect } from "node:net";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

export class NodeWebSocket extends EventTarget {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;

  readyState = 0;
  protocol = "";
  binaryType = "blob";
  #handlers = {};
  #socket;
  #buffer = Buffer.alloc(0);
  #upgraded = false;
  #fragments = null;
  #closeSent = false;
  #closed = false;

  constructor(url, protocols = []) {
    super();
    this.url = url;
    const target = new URL(url);
    const offered = typeof protocols === "string" ? [protocols] : protocols;
    const key = randomBytes(16).toString("base64");
    this.#socket = connect({ host: target.hostname, port: Number(target.port || 80) });
    this.#socket.setNoDelay(true);
    this.#socket.on("connect", () => {
      const lines = [
        `GET ${target.pathname}${target.search} HTTP/1.1`,
        `Host: ${target.host}`,
        "Upgrade: websocket",
        "Connection: Upgrade",
        `Sec-WebSocket-Key: ${key}`,
        "Sec-WebSocket-Version: 13",
      ];
      if (offered.length) lines.push(`Sec-WebSocket-Protocol: ${offered.join(", ")}`);
      this.#socket.write(`${lines.join("\r\n")}\r\n\r\n`);
    });
    this.#socket.on("data", (chunk) => {
      this.#buffer = Buffer.concat([this.#buffer, chunk]);
      if (!this.#upgraded && !this.#readHead(key)) return;
      this.#readFrames();
    });
    // A failure shows as the close that follows it (with an `error` first if it never opened).
    this.#socket.on("error", () => {});
    this.#socket.on("close", () => this.#finish(1006, ""));
  }

  get onopen() {
    return this.#handlers.open ?? null;
  }
  set onopen(handler) {
    this.#handle("open", handler);
  }
  get onmessage() {
    return this.#handlers.message ?? null;
  }
  set onmessage(handler) {
    this.#handle("message", handler);
  }
  get onclose() {
    return this.#handlers.close ?? null;
  }
  set onclose(handler) {
    this.#handle("close", handler);
  }
  get onerror() {
    return this.#handlers.error ?? null;
  }
  set onerror(handler) {
    this.#handle("error", handler);
  }

  /** An `onX` attribute: one listener, as in browsers, that events dispatched from outside reach too. */
  #handle(type, handler) {
    if (!(type in this.#handlers)) {
      this.addEventListener(type, (event) => this.#handlers[type]?.call(this, event));
    }
    this.#handlers[type] = typeof handler === "function" ? handler : null;
  }

  send(data) {
    if (this.readyState !== 1) throw new Error("WebSocket is not open");
    if (typeof data === "string") this.#write(0x1, Buffer.from(data, "utf8"));
    else if (data instanceof ArrayBuffer) this.#write(0x2, Buffer.from(data));
    else this.#write(0x2, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  }

  close(code = 1000, reason = "") {
    if (this.readyState >= 2) return;
    if (this.readyState === 0) {
      this.#socket.destroy();
      return;
    }
    this.readyState = 2;
    this.#sendClose(code, reason);
  }

  #fire(type, event) {
    this.dispatchEvent(event);
  }

  /** The 101 response; false until it is all here. */
  #readHead(key) {
    const end = this.#buffer.indexOf("\r\n\r\n");
    if (end < 0) return false;
    const head = this.#buffer.subarray(0, end).toString("latin1").split("\r\n");
    this.#buffer = this.#buffer.subarray(end + 4);
    const headers = new Map(
      head.slice(1).map((line) => {
        const colon = line.indexOf(":");
        return [line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim()];
      }),
    );
    const accept = createHash("sha1").update(key + GUID).digest("base64");
    if (!/^HTTP\/1\.1 101 /.test(head[0]) || headers.get("sec-websocket-accept") !== accept) {
      this.#socket.destroy();
      return false;
    }
    this.#upgraded = true;
    this.protocol = headers.get("sec-websocket-protocol") ?? "";
    this.readyState = 1;
    this.#fire("open", new Event("open"));
    return true;
  }

  #readFrames() {
    for (;;) {
      const b = this.#buffer;
      if (b.length < 2) return;
      let length = b[1] & 0x7f;
      let offset = 2;
      if (length === 126) {
        if (b.length < 4) return;
        length = b.readUInt16BE(2);
        offset = 4;
      } else if (length === 127) {
        if (b.length < 10) return;
        length = Number(b.readBigUInt64BE(2));
        offset = 10;
      }
      if (b.length < offset + length) return;
      const fin = (b[0] & 0x80) !== 0;
      const opcode = b[0] & 0x0f;
      const payload = b.subarray(offset, offset + length);
      this.#buffer = b.subarray(offset + length);
      this.#frame(fin, opcode, Buffer.from(payload));
    }
  }

  #frame(fin, opcode, payload) {
    if (opcode === 0x9) return this.#write(0xa, payload);
    if (opcode === 0xa) return;
    if (opcode === 0x8) {
      const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      const reason = payload.subarray(2).toString("utf8");
      if (!this.#closeSent) this.#sendClose(code === 1005 ? 1000 : code, "");
      this.#socket.end();
      this.#finish(code, reason);
      return;
    }
    if (opcode !== 0) this.#fragments = { opcode, parts: [] };
    if (!this.#fragments) return;
    this.#fragments.parts.push(payload);
    if (!fin) return;
    const { opcode: kind, parts } = this.#fragments;
    this.#fragments = null;
    const whole = Buffer.concat(parts);
    const data =
      kind === 0x1 ? whole.toString("utf8") : whole.buffer.slice(whole.byteOffset, whole.byteOffset + whole.length);
    if (this.readyState === 1) this.#fire("message", new MessageEventOrOwn("message", { data }));
  }

  #sendClose(code, reason) {
    this.#closeSent = true;
    const payload = Buffer.alloc(2 + Buffer.byteLength(reason));
    payload.writeUInt16BE(code, 0);
    payload.write(reason, 2);
    this.#write(0x8, payload);
  }

  #write(opcode, payload) {
    const mask = randomBytes(4);
    const length = payload.length;
    const head = length < 126 ? Buffer.alloc(2) : length < 65536 ? Buffer.alloc(4) : Buffer.alloc(10);
    head[0] = 0x80 | opcode;
    if (length < 126) head[1] = 0x80 | length;
    else if (length < 65536) {
      head[1] = 0x80 | 126;
      head.writeUInt16BE(length, 2);
    } else {
      head[1] = 0x80 | 127;
      head.writeBigUInt64BE(BigInt(length), 2);
    }
    const masked = Buffer.alloc(length);
    for (let i = 0; i < length; i++) masked[i] = payload[i] ^ mask[i % 4];
    this.#socket.write(Buffer.concat([head, mask, masked]));
  }

  #finish(code, reason) {
    if (this.#closed) return;
    this.#closed = true;
    const wasOpen = this.#upgraded;
    this.readyState = 3;
    if (!wasOpen) this.#fire("error", new Event("error"));
    const event = new Event("close");
    Object.assign(event, { code, reason, wasClean: code !== 1006 });
    this.#fire("close", event);
  }
}

/** `MessageEvent` where Node has it, else the little of it the client reads. */
const MessageEventOrOwn =
  globalThis.MessageEvent ??
  class MessageEvent extends Event {
    constructor(type, init = {}) {
      super(type);
      this.data = init.data;
    }
  };

/** Give this Node a `WebSocket` (and `MessageEvent`) if it has none. */
export function install() {
  globalThis.WebSocket ??= NodeWebSocket;
  globalThis.MessageEvent ??= MessageEventOrOwn;
}
