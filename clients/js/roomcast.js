// Roomcast's browser client: one WebSocket speaking the room protocol (roomcast.v1),
// any number of rooms on it, handlers per room, and a connection that comes back by
// itself (jittered exponential backoff) and re-joins every room it was in, asking each
// room that keeps history for what it missed meanwhile.
// No dependencies and no build step: an ES module for browsers (and Node 22+, or
// Node 20.10+ with --experimental-websocket). See README.md beside it.

/** The subprotocol this client speaks. */
export const PROTOCOL = "roomcast.v1";

/**
 * The delay before reconnect attempt `attempt` (0 for the first retry), in ms: "full
 * jitter", uniformly between 0 and min(maxDelay, minDelay * 2^attempt), so clients
 * cut off together do not come back together.
 */
export function backoffDelay(attempt, { minDelay = 500, maxDelay = 15000 } = {}, random = Math.random) {
  const cap = Math.min(maxDelay, minDelay * 2 ** Math.min(attempt, 52));
  return Math.floor(random() * cap);
}

/** A refused join (or leave): the server's `error` reason and HTTP-like `status`. */
export class RoomcastError extends Error {
  constructor(reply) {
    super(`${reply.error} (${reply.status})`);
    this.name = "RoomcastError";
    this.error = reply.error;
    this.status = reply.status;
    this.room = reply.room;
  }
}

/** A tiny event emitter: `on` returns a function that removes the handler. */
class Events {
  #handlers = new Map();

  on(event, handler) {
    if (!this.#handlers.has(event)) this.#handlers.set(event, new Set());
    this.#handlers.get(event).add(handler);
    return () => this.off(event, handler);
  }

  off(event, handler) {
    this.#handlers.get(event)?.delete(handler);
  }

  /** Call every handler; one that throws is reported without stopping the others. */
  emit(event, ...args) {
    for (const handler of [...(this.#handlers.get(event) ?? [])]) {
      try {
        handler(...args);
      } catch (error) {
        setTimeout(() => {
          throw error;
        });
      }
    }
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Each room handle's membership state, which only the client changes. */
const memberships = new WeakMap();

/**
 * One room as this client sees it. Get it with `client.room(name)` (the same object
 * each time). Events: `message` (data, envelope), `joined` (info), `left` (info),
 * `error` (RoomcastError).
 */
export class Room extends Events {
  #client;

  constructor(client, name) {
    super();
    this.#client = client;
    /** The room's name. */
    this.name = name;
    memberships.set(this, {
      room: this,
      name,
      // In the room now: the server said `joined` on this connection.
      joined: false,
      // Meant to be in it: (re-)joined on every connect.
      wanted: false,
      // The join's `params`, sent again with every re-join.
      params: undefined,
      // The `ref` of the join in flight on this connection, or null.
      joinRef: null,
      // The promises waiting for the join: [{resolve, reject}].
      waiters: [],
      // Joined before on an earlier connection: the next join is a re-join.
      everJoined: false,
      // The room's history position, when it keeps history: its `epoch` and the offset
      // of the last message this client has (from `joined`, then each text delivery).
      // Sent as `since` with the next join, so the room replays what came after.
      epoch: undefined,
      offset: 0,
      // After a join that recovered: the room's offset when it answered. Text
      // deliveries up to it are replays of what was missed.
      replayUntil: 0,
    });
  }

  /** Whether this connection is in the room now. */
  get joined() {
    return memberships.get(this).joined;
  }

  /** Whether the client means to be in the room (and joins it again after a reconnect). */
  get wanted() {
    return memberships.get(this).wanted;
  }

  /**
   * Where this client is in the room's history: `{epoch, offset}` (the offset of the
   * last message it has), or null when the room keeps no history (or was not joined
   * yet). Keep it (say in sessionStorage) and pass it as `join(room, {since})` to get
   * what was missed across a page load.
   */
  get position() {
    const { epoch, offset } = memberships.get(this);
    return epoch === undefined ? null : { epoch, offset };
  }

  join(options) {
    return this.#client.join(this.name, options);
  }

  leave() {
    return this.#client.leave(this.name);
  }

  send(data) {
    return this.#client.send(this.name, data);
  }
}

/**
 * A connection to a Roomcast server in room-protocol mode.
 *
 * new Roomcast(url?, {minDelay, maxDelay, connectTimeout, WebSocket})
 *   url: `ws://host/ws` (default: `/ws` on the page's own host); http(s) URLs are
 *   turned into ws(s). Its query string reaches every room's plugin.
 *
 * Events: `open`, `close` ({code, reason}), `reconnecting` ({attempt, delay}),
 * `joined` / `left` (info, for every room), `message` (data, envelope), `error`.
 */
export class Roomcast extends Events {
  #url;
  #options;
  #WebSocket;
  #socket = null;
  /** Membership state by room name (see `memberships`). */
  #rooms = new Map();
  /** ref -> {op: "join" | "leave", room (its state), resolve?} */
  #pending = new Map();
  #nextRef = 1;
  #attempt = 0;
  #timer = null;
  #closed = false;
  #state = "connecting";

  constructor(url, options = {}) {
    super();
    this.#url = resolveUrl(url);
    this.#options = { minDelay: 500, maxDelay: 15000, connectTimeout: 10000, ...options };
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== "function") {
      throw new Error("no WebSocket here: pass {WebSocket} (Node 22+ has one; Node 20 needs --experimental-websocket)");
    }
    this.#connect();
  }

  /** `connecting`, `open`, `reconnecting` or `closed`. */
  get state() {
    return this.#state;
  }

  /** The URL this client connects to. */
  get url() {
    return this.#url;
  }

  /** The names of the rooms this connection is in now. */
  get rooms() {
    return [...this.#rooms.values()].filter((room) => room.joined).map((room) => room.name);
  }

  /** The handle of room `name` (created on first use; joining is separate). */
  room(name) {
    return this.#entry(name).room;
  }

  /** Room `name`'s membership state, created with its handle on first use. */
  #entry(name) {
    let entry = this.#rooms.get(name);
    if (!entry) {
      entry = memberships.get(new Room(this, name));
      this.#rooms.set(name, entry);
    }
    return entry;
  }

  /**
   * Join `room` (with `params` for its plugin). Resolves with the server's `joined`
   * reply; rejects with a RoomcastError if the server refuses. While disconnected, the
   * join waits for the connection. Joining a room already joined or being joined
   * answers as that join does.
   *
   * `since` ({epoch, offset}, a `position` kept from before) asks the room for every
   * message after that offset: the reply says `recovered: true` and they arrive, in
   * order, before live ones; or `recovered: false` (another epoch, too old) and only
   * live ones. Without it the client asks with the position it remembers, if any.
   */
  join(name, { params, since } = {}) {
    if (since && (typeof since.epoch !== "string" || !Number.isSafeInteger(since.offset) || since.offset < 0)) {
      return Promise.reject(new TypeError("since is {epoch, offset}, as a room's `position` gives it"));
    }
    const room = this.#entry(name);
    if (this.#closed) return Promise.reject(new Error("this Roomcast client is closed"));
    const promise = new Promise((resolve, reject) => {
      if (room.wanted && room.joined) resolve({ joined: name });
      else room.waiters.push({ resolve, reject });
    });
    if (!room.wanted) {
      room.wanted = true;
      room.params = params;
      if (since) {
        room.epoch = since.epoch;
        room.offset = since.offset;
      }
      if (this.#state === "open") this.#sendJoin(room);
    }
    return promise;
  }

  /**
   * Leave `room`: it is not re-joined any more. Resolves with the server's `left`
   * reply once the room handled everything sent to it before (at once while
   * disconnected, or if the room was not joined).
   */
  leave(name) {
    const room = this.#rooms.get(name);
    if (!room || !room.wanted) return Promise.resolve({ left: name, code: 1000, reason: "" });
    room.wanted = false;
    forget(room);
    const aborted = new Error(`left ${name} before the server answered the join`);
    for (const waiter of room.waiters.splice(0)) waiter.reject(aborted);
    const member = room.joined || room.joinRef !== null;
    // From now on nothing is sent to the room, and the answer of a join in flight
    // (which comes before the leave's) is not news.
    room.joined = false;
    room.joinRef = null;
    if (this.#state !== "open" || !member) return Promise.resolve({ left: name, code: 1000, reason: "" });
    return new Promise((resolve) => {
      const ref = this.#ref();
      this.#pending.set(ref, { op: "leave", room, resolve });
      this.#write(JSON.stringify({ leave: name, ref }));
    });
  }

  /**
   * Send to `room`: a string as a text message, bytes (Uint8Array, ArrayBuffer or
   * another view) as a binary one. Returns false, sending nothing, when the room is
   * not joined on an open connection (nothing is queued across a reconnect).
   */
  send(name, data) {
    const room = this.#rooms.get(name);
    if (this.#state !== "open" || !room?.joined) return false;
    if (typeof data === "string") {
      this.#write(JSON.stringify({ send: name, text: data }));
      return true;
    }
    const bytes = toBytes(data);
    const prefix = encoder.encode(name);
    if (prefix.length > 255) throw new RangeError("room name longer than 255 bytes");
    const frame = new Uint8Array(1 + prefix.length + bytes.length);
    frame[0] = prefix.length;
    frame.set(prefix, 1);
    frame.set(bytes, 1 + prefix.length);
    this.#write(frame);
    return true;
  }

  /** Close for good: no reconnect; joins still waiting are rejected. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#timer);
    const error = new Error("this Roomcast client is closed");
    for (const room of this.#rooms.values()) {
      for (const waiter of room.waiters.splice(0)) waiter.reject(error);
      room.joined = false;
      room.joinRef = null;
    }
    this.#settleLeaves();
    const socket = this.#socket;
    this.#socket = null;
    this.#state = "closed";
    if (socket) {
      socket.close(1000);
      this.emit("close", { code: 1000, reason: "", wasClean: true });
    }
  }

  #connect() {
    this.#state = this.#attempt ? "reconnecting" : "connecting";
    let socket;
    try {
      socket = new this.#WebSocket(this.#url, PROTOCOL);
    } catch (error) {
      this.emit("error", error);
      this.#retry();
      return;
    }
    socket.binaryType = "arraybuffer";
    this.#socket = socket;
    // A socket that never opens is given up on: a connection refused (some WebSocket
    // implementations report only an `error` then), or one that hangs.
    let opened = false;
    const failed = () => {
      if (socket !== this.#socket || opened) return;
      clearTimeout(this.#timer);
      this.#socket = null;
      try {
        socket.close();
      } catch {
        // Not open yet: nothing to close politely.
      }
      this.#disconnected({ code: 1006, reason: "", wasClean: false });
    };
    socket.onerror = failed;
    this.#timer = setTimeout(failed, this.#options.connectTimeout);
    socket.onopen = () => {
      if (socket !== this.#socket) return;
      opened = true;
      clearTimeout(this.#timer);
      this.#attempt = 0;
      this.#state = "open";
      this.emit("open");
      for (const room of this.#rooms.values()) if (room.wanted) this.#sendJoin(room);
    };
    socket.onmessage = (event) => {
      if (socket === this.#socket) this.#receive(event.data);
    };
    socket.onclose = (event) => {
      if (socket !== this.#socket) return;
      clearTimeout(this.#timer);
      this.#socket = null;
      this.#disconnected(event);
    };
  }

  #disconnected(event) {
    for (const room of this.#rooms.values()) {
      room.joined = false;
      room.joinRef = null;
    }
    this.#settleLeaves();
    this.emit("close", { code: event.code, reason: event.reason, wasClean: event.wasClean });
    this.#retry();
  }

  /** A leave in flight when the connection ended is done: the server dropped every room. */
  #settleLeaves() {
    for (const [ref, pending] of this.#pending) {
      if (pending.op === "leave") pending.resolve({ left: pending.room.name, code: 1006, reason: "" });
      this.#pending.delete(ref);
    }
  }

  #retry() {
    if (this.#closed) return;
    const delay = backoffDelay(this.#attempt, this.#options);
    this.#attempt += 1;
    this.#state = "reconnecting";
    this.emit("reconnecting", { attempt: this.#attempt, delay });
    this.#timer = setTimeout(() => this.#connect(), delay);
  }

  #ref() {
    return this.#nextRef++;
  }

  #sendJoin(room) {
    const ref = this.#ref();
    room.joinRef = ref;
    this.#pending.set(ref, { op: "join", room });
    const join = { join: room.name, ref };
    if (room.params !== undefined) join.params = room.params;
    if (room.epoch !== undefined) join.since = { epoch: room.epoch, offset: room.offset };
    this.#write(JSON.stringify(join));
  }

  #write(data) {
    this.#socket.send(data);
  }

  #receive(data) {
    if (typeof data !== "string") {
      this.#receiveBinary(new Uint8Array(data));
      return;
    }
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (message === null || typeof message !== "object") return;
    if (typeof message.room === "string" && "text" in message) {
      this.#deliver(message.room, message.text, message);
    } else if (typeof message.joined === "string") {
      this.#joined(message);
    } else if (typeof message.left === "string") {
      this.#left(message);
    } else if ("error" in message) {
      this.#refused(message);
    }
    // Anything else is from a later version of the protocol: ignored.
  }

  #receiveBinary(frame) {
    const length = frame[0];
    if (frame.length < 1 + length) return;
    const name = decoder.decode(frame.subarray(1, 1 + length));
    this.#deliver(name, frame.subarray(1 + length), { room: name, binary: true });
  }

  #deliver(name, data, envelope) {
    const room = this.#rooms.get(name);
    const offset = envelope.offset;
    if (room && room.epoch !== undefined && Number.isSafeInteger(offset)) {
      // Already had (a replay overlapping what arrived): not news.
      if (offset <= room.offset) return;
      room.offset = offset;
      if (offset <= room.replayUntil) envelope = { ...envelope, replayed: true };
    }
    room?.room.emit("message", data, envelope);
    this.emit("message", data, envelope);
  }

  #joined(message) {
    const pending = this.#pending.get(message.ref);
    if (pending) this.#pending.delete(message.ref);
    const room = this.#entry(message.joined);
    if (pending?.op === "join" && room.joinRef !== message.ref) return; // superseded
    const byServer = !pending;
    if (byServer) room.wanted = true; // a plugin put us here: keep it across reconnects
    room.joinRef = null;
    room.joined = true;
    if (typeof message.epoch === "string" && Number.isSafeInteger(message.offset)) {
      // Recovered: the replay that follows moves the position on. Otherwise the room
      // starts afresh for this client at its current offset.
      if (message.recovered === true && message.epoch === room.epoch) {
        room.replayUntil = message.offset;
      } else {
        room.epoch = message.epoch;
        room.offset = message.offset;
        room.replayUntil = 0;
      }
    } else {
      forget(room);
    }
    const info = { ...message, room: room.name, rejoined: room.everJoined, byServer };
    room.everJoined = true;
    for (const waiter of room.waiters.splice(0)) waiter.resolve(message);
    room.room.emit("joined", info);
    this.emit("joined", info);
  }

  #left(message) {
    const pending = this.#pending.get(message.ref);
    if (pending) this.#pending.delete(message.ref);
    const room = this.#entry(message.left);
    room.joined = false;
    if (!pending && room.joinRef === null) {
      // The server ended the membership (a plugin closed it, or the room failed):
      // not re-joined.
      room.wanted = false;
      room.everJoined = false;
      forget(room);
    }
    if (pending) room.everJoined = false;
    pending?.resolve?.(message);
    const info = { ...message, room: room.name, byServer: !pending };
    room.room.emit("left", info);
    this.emit("left", info);
  }

  #refused(message) {
    const pending = this.#pending.get(message.ref);
    if (pending) this.#pending.delete(message.ref);
    const name = pending?.room.name ?? (typeof message.room === "string" ? message.room : undefined);
    const error = new RoomcastError({ ...message, room: name });
    if (pending?.op === "join") {
      const room = pending.room;
      if (room.joinRef === message.ref) {
        room.joinRef = null;
        room.wanted = false;
        for (const waiter of room.waiters.splice(0)) waiter.reject(error);
      }
      room.room.emit("error", error);
    } else if (pending?.op === "leave") {
      // Not a member (the server ended it meanwhile): left all the same.
      pending.resolve({ left: name, code: 1000, reason: "" });
      return;
    } else if (name !== undefined) {
      this.#rooms.get(name)?.room.emit("error", error);
    }
    this.emit("error", error);
  }
}

/** The room's history position is gone: its next join starts afresh. */
function forget(room) {
  room.epoch = undefined;
  room.offset = 0;
  room.replayUntil = 0;
}

function resolveUrl(url) {
  if (url === undefined) {
    if (typeof location === "undefined") throw new Error("a URL is needed outside a browser page");
    url = "/ws";
  }
  const base = typeof location === "undefined" ? undefined : location.href;
  const resolved = new URL(url, base);
  if (resolved.protocol === "http:") resolved.protocol = "ws:";
  if (resolved.protocol === "https:") resolved.protocol = "wss:";
  return resolved.href;
}

function toBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("send takes a string or bytes (Uint8Array, ArrayBuffer)");
}
