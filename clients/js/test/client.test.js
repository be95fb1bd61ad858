// The client against the real server: rooms on one connection, text and binary,
// refusals, leaving, and a connection that comes back and re-joins its rooms.
// Run with `node --test` (Node 22+) or `node --experimental-websocket --test` (Node 20).

import assert from "node:assert/strict";
import { after, test } from "node:test";

import { Roomcast, RoomcastError } from "../roomcast.js";
import { Server, next, recordingWebSocket, until } from "./support.js";

const clients = [];
const servers = [];

/** A client that the test run closes at the end. */
function client(url, options) {
  const rc = new Roomcast(url, options);
  clients.push(rc);
  return rc;
}

async function server(plugins) {
  const started = await Server.start(plugins);
  servers.push(started);
  return started;
}

after(async () => {
  for (const rc of clients) rc.close();
  for (const s of servers) await s.close();
});

/** Collect what room `name` of `rc` receives. */
function collect(rc, name) {
  const got = [];
  rc.room(name).on("message", (data, envelope) => got.push({ data, envelope }));
  return got;
}

test("one connection is in two rooms, and each room's handler gets that room's messages", async () => {
  const s = await server([]);
  const ada = client(s.url());
  const bob = client(s.url());
  const [inA, inB] = [collect(ada, "a"), collect(ada, "b")];
  const everything = [];
  ada.on("message", (data, envelope) => everything.push(`${envelope.room}:${data}`));

  const replies = await Promise.all([ada.join("a"), ada.join("b"), bob.join("a"), bob.join("b")]);
  assert.deepEqual(replies.map((r) => r.joined), ["a", "b", "a", "b"]);
  assert.deepEqual(ada.rooms.sort(), ["a", "b"]);
  await s.waitMetric("roomcast_connections", 2);
  await s.waitMetric("roomcast_room_members", 4);

  assert.equal(bob.send("a", "to a"), true);
  assert.equal(bob.room("b").send("to b"), true);
  await until("ada hears both rooms", () => everything.length === 2);
  assert.deepEqual(inA.map((m) => m.data), ["to a"]);
  assert.deepEqual(inB.map((m) => m.data), ["to b"]);
  assert.deepEqual(inA[0].envelope, { room: "a", text: "to a" });
  assert.deepEqual(everything.sort(), ["a:to a", "b:to b"]);
});

test("binary messages carry their room both ways", async () => {
  const s = await server([]);
  const ada = client(s.url());
  const bob = client(s.url());
  const inB = collect(ada, "bin:b");
  const inA = collect(ada, "bin:a");
  await Promise.all([ada.join("bin:a"), ada.join("bin:b"), bob.join("bin:a"), bob.join("bin:b")]);

  const bytes = new Uint8Array([0, 1, 2, 127, 128, 255]);
  assert.equal(bob.send("bin:b", bytes), true);
  assert.equal(bob.send("bin:a", bytes.buffer.slice(2)), true);
  await until("both binary messages arrive", () => inB.length === 1 && inA.length === 1);
  assert.ok(inB[0].data instanceof Uint8Array);
  assert.deepEqual([...inB[0].data], [...bytes]);
  assert.deepEqual(inB[0].envelope, { room: "bin:b", binary: true });
  assert.deepEqual([...inA[0].data], [2, 127, 128, 255]);
  // A raw member of the room sees the payload alone, without the prefix.
  const frames = [];
  const raw = new WebSocket(`ws://${s.addr}/ws/bin:b`);
  raw.binaryType = "arraybuffer";
  raw.onmessage = (event) => frames.push(new Uint8Array(event.data));
  await new Promise((resolve) => (raw.onopen = resolve));
  await s.waitMetric("roomcast_room_members", 5);
  bob.send("bin:b", new Uint8Array([9, 8, 7]));
  await until("the raw member gets the payload", () => frames.length === 1);
  assert.deepEqual([...frames[0]], [9, 8, 7]);
  raw.close();
});

test("a refused join rejects with the server's status and reason, and the connection stays", async () => {
  const s = await server([["gate", '[config]\ntoken = "sesame"\n']]);
  const ada = client(s.url());
  const opened = [];
  ada.on("open", () => opened.push(1));

  await assert.rejects(ada.join("not a room name"), (error) => {
    assert.ok(error instanceof RoomcastError);
    assert.equal(error.status, 400);
    assert.equal(error.room, "not a room name");
    return true;
  });
  const refusedEvents = [];
  ada.room("gate").on("error", (error) => refusedEvents.push(error));
  await assert.rejects(ada.join("gate"), { name: "RoomcastError", status: 403, error: "bad token" });
  assert.equal(refusedEvents.length, 1);
  assert.equal(ada.room("gate").wanted, false, "a refused room is not retried");

  await ada.join("open-room");
  assert.deepEqual(ada.rooms, ["open-room"]);
  assert.equal(opened.length, 1, "one connection throughout");
  await s.waitMetric("roomcast_connections", 1);

  // The token in the connection's URL reaches the room's plugin, as for an upgrade.
  const grace = client(s.url("?token=sesame"));
  assert.deepEqual(await grace.join("gate"), { joined: "gate", ref: 1 });
});

test("leave ends the membership; close ends the connection for good", async () => {
  const s = await server([]);
  const ada = client(s.url());
  const left = [];
  ada.room("x").on("left", (info) => left.push(info));
  await ada.join("x");
  await ada.join("y");
  await s.waitMetric("roomcast_room_members", 2);

  const reply = await ada.leave("x");
  assert.equal(reply.left, "x");
  assert.equal(reply.code, 1000);
  assert.deepEqual(ada.rooms, ["y"]);
  assert.equal(ada.send("x", "anyone?"), false, "nothing is sent to a room left");
  assert.equal(left.length, 1);
  assert.equal(left[0].byServer, false);
  await s.waitMetric("roomcast_room_members", 1);
  // Joined again, it is a fresh join, not a re-join.
  const [info] = await Promise.all([next(ada.room("x"), "joined"), ada.join("x")]);
  assert.equal(info[0].rejoined, false);

  const reconnecting = [];
  ada.on("reconnecting", (r) => reconnecting.push(r));
  ada.close();
  assert.equal(ada.state, "closed");
  await s.waitMetric("roomcast_connections", 0);
  await assert.rejects(ada.join("z"), /closed/);
  assert.deepEqual(reconnecting, [], "a closed client does not come back");
});

test("after the server restarts, the client reconnects with backoff and re-joins its rooms with their params, except a room the server ended", async () => {
  const moderation = "[config]\nclose_after = 1\nrate_limit = { messages = 1, per_ms = 3600000 }\n";
  const s = await server([["moderation", moderation]]);
  const { WebSocket, sent } = recordingWebSocket();
  const options = { WebSocket, minDelay: 50, maxDelay: 400 };
  const ada = client(s.url(), options);
  const joined = [];
  ada.on("joined", (info) => joined.push(info));
  const lobby = collect(ada, "lobby");
  await ada.join("lobby", { params: { team: "blue" } });
  await ada.join("moderation:strict");

  // The plugin ends one membership: `left` with its code, the other room stays.
  const [ended] = await Promise.all([
    next(ada.room("moderation:strict"), "left"),
    (async () => {
      ada.send("moderation:strict", "one");
      ada.send("moderation:strict", "two");
    })(),
  ]);
  assert.equal(ended[0].code, 1008);
  assert.equal(ended[0].reason, "rate limit");
  assert.equal(ended[0].byServer, true);
  assert.deepEqual(ada.rooms, ["lobby"]);

  // The server dies without a word; the client retries on its own, each delay within
  // its step, and re-joins once a server listens on the port again.
  const reconnecting = [];
  ada.on("reconnecting", (r) => reconnecting.push(r));
  const closed = next(ada, "close");
  await s.stop("SIGKILL");
  await closed;
  await until("a few retries fail", () => reconnecting.length >= 3);
  const before = sent.length;
  const rejoined = next(ada.room("lobby"), "joined");
  await s.restart();
  const [info] = await rejoined;
  assert.equal(info.rejoined, true);
  assert.equal(info.byServer, false);
  for (const { attempt, delay } of reconnecting) {
    const step = Math.min(400, 50 * 2 ** (attempt - 1));
    assert.ok(delay >= 0 && delay < step, `attempt ${attempt}: ${delay} ms, step ${step}`);
  }
  const joins = sent.slice(before).filter((frame) => frame.join !== undefined);
  assert.deepEqual(
    joins.map(({ join, params }) => ({ join, params })),
    [{ join: "lobby", params: { team: "blue" } }],
    "only the rooms still wanted are re-joined, with their params",
  );
  assert.deepEqual(ada.rooms, ["lobby"]);

  // Messages flow again.
  const bob = client(s.url());
  await bob.join("lobby");
  bob.send("lobby", "welcome back");
  await until("ada hears the lobby again", () => lobby.some((m) => m.data === "welcome back"));
  assert.deepEqual(
    joined.map((j) => [j.room, j.rejoined]),
    [
      ["lobby", false],
      ["moderation:strict", false],
      ["lobby", true],
    ],
  );
});

test("a membership the server starts is tracked and re-joined; a refusal without a ref is an event", async () => {
  // The server's plugins can add a connection to a room: `joined` without a `ref`.
  // Until a plugin on this server does, the frames are put on the real socket here.
  const s = await server([]);
  const sockets = [];
  class Kept extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  }
  const ada = client(s.url(), { WebSocket: Kept, minDelay: 50, maxDelay: 200 });
  await ada.join("home");
  const push = (frame) =>
    sockets.at(-1).dispatchEvent(new MessageEvent("message", { data: JSON.stringify(frame) }));

  const [[seated]] = await Promise.all([next(ada, "joined"), push({ joined: "match:1", extra: "ignored" })]);
  assert.equal(seated.room, "match:1");
  assert.equal(seated.byServer, true);
  assert.deepEqual(ada.rooms.sort(), ["home", "match:1"]);

  const [[refused]] = await Promise.all([
    next(ada, "error"),
    push({ error: "match full", status: 429, room: "match:2" }),
  ]);
  assert.ok(refused instanceof RoomcastError);
  assert.deepEqual([refused.room, refused.status, refused.error], ["match:2", 429, "match full"]);
  assert.deepEqual(ada.rooms.sort(), ["home", "match:1"]);

  // After a reconnect the server is asked for both rooms again, and grants them.
  const both = new Set();
  const rejoined = next(ada, "joined", (info) => both.add(info.room) && both.size === 2);
  await s.stop("SIGTERM");
  await s.restart();
  await rejoined;
  await s.waitMetric("roomcast_room_members", 2);

  // The server ends the match: not re-joined.
  const [[ended]] = await Promise.all([
    next(ada.room("match:1"), "left"),
    push({ left: "match:1", code: 4000, reason: "match over" }),
  ]);
  assert.deepEqual([ended.code, ended.reason, ended.byServer], [4000, "match over", true]);
  assert.equal(ada.room("match:1").wanted, false);
  assert.deepEqual(ada.rooms, ["home"]);
});

test("a join made while the server is down waits for the connection; one left before its answer is not reported joined", async () => {
  const s = await server([]);
  await s.stop("SIGKILL");
  const ada = client(s.url(), { minDelay: 50, maxDelay: 200 });
  await next(ada, "reconnecting");
  const joining = ada.join("later");
  assert.equal(ada.send("later", "too early"), false, "nothing is queued for a room not joined");
  await s.restart();
  assert.equal((await joining).joined, "later");
  assert.deepEqual(ada.rooms, ["later"]);

  const joinedEvents = [];
  ada.room("fleeting").on("joined", (info) => joinedEvents.push(info));
  const join = ada.join("fleeting");
  const leave = ada.leave("fleeting");
  await assert.rejects(join, /left fleeting before the server answered/);
  assert.equal((await leave).code, 1000);
  assert.deepEqual(joinedEvents, []);
  assert.deepEqual(ada.rooms, ["later"]);
  await s.waitMetric("roomcast_room_members", 1);
});
