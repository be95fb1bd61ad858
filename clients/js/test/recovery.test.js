// The client recovers what it missed: it remembers each room's history position and
// re-joins with `since` after a dropped connection, against a real server whose rooms
// keep history (`--history-size`). Run with `node --test`.

import assert from "node:assert/strict";
import { after, test } from "node:test";

import { Roomcast } from "../roomcast.js";
import { Server, next, unreliableWebSocket, until } from "./support.js";

const clients = [];
const servers = [];
const HISTORY = ["--history-size", "100"];

function client(url, options) {
  const rc = new Roomcast(url, options);
  clients.push(rc);
  return rc;
}

async function server(plugins = [], args = HISTORY) {
  const started = await Server.start(plugins, args);
  servers.push(started);
  return started;
}

after(async () => {
  for (const rc of clients) rc.close();
  for (const s of servers) await s.close();
});

/** What room `name` of `rc` receives: text, offset and whether it was a replay. */
function collect(rc, name) {
  const got = [];
  rc.room(name).on("message", (data, envelope) =>
    got.push({ text: data, offset: envelope.offset, replayed: envelope.replayed === true }),
  );
  return got;
}

test("after a dropped connection the client re-joins with since and gets exactly what it missed, in order, then live messages", async () => {
  const s = await server();
  const net = unreliableWebSocket();
  const ada = client(s.url(), { WebSocket: net.WebSocket, minDelay: 50, maxDelay: 200 });
  const bob = client(s.url());
  const news = collect(ada, "news");
  const first = await ada.join("news");
  assert.equal(typeof first.epoch, "string", "a room with history gives its epoch");
  assert.equal(first.offset, 0);
  assert.equal(first.recovered, undefined, "a first join asks for nothing");
  assert.deepEqual(ada.room("news").position, { epoch: first.epoch, offset: 0 });
  await bob.join("news");
  bob.send("news", "first");
  await until("ada gets the first message", () => news.length === 1);
  assert.deepEqual(ada.room("news").position, { epoch: first.epoch, offset: 1 });

  // The network goes; the room goes on without ada.
  const closed = next(ada, "close");
  net.drop();
  await closed;
  await s.waitMetric("roomcast_room_members", 1);
  for (let n = 0; n < 10; n++) bob.send("news", `missed ${n}`);
  await s.waitMetric("roomcast_history_messages", 11);
  assert.deepEqual(ada.room("news").position, { epoch: first.epoch, offset: 1 }, "kept while away");

  // The network comes back: the client re-joins on its own, from where it was.
  const joined = next(ada.room("news"), "joined");
  net.offline = false;
  const [info] = await joined;
  assert.equal(info.rejoined, true);
  assert.equal(info.recovered, true);
  assert.equal(info.epoch, first.epoch);
  assert.equal(info.offset, 11, "the room's offset when it answered");
  const rejoin = net.sent.filter((frame) => frame.join === "news").at(-1);
  assert.deepEqual(rejoin.since, { epoch: first.epoch, offset: 1 });
  bob.send("news", "live");
  await until("ada gets the missed messages and the live one", () => news.length === 12);
  assert.deepEqual(news, [
    { text: "first", offset: 1, replayed: false },
    ...Array.from({ length: 10 }, (_, n) => ({ text: `missed ${n}`, offset: n + 2, replayed: true })),
    { text: "live", offset: 12, replayed: false },
  ]);
  assert.deepEqual(ada.room("news").position, { epoch: first.epoch, offset: 12 });
});

test("a restarted server cannot recover: the re-join says recovered false, and the position starts afresh in the new epoch", async () => {
  const s = await server();
  const ada = client(s.url(), { minDelay: 50, maxDelay: 200 });
  const bob = client(s.url(), { minDelay: 50, maxDelay: 200 });
  const news = collect(ada, "news");
  const first = await ada.join("news");
  await bob.join("news");
  bob.send("news", "before");
  await until("ada gets it", () => news.length === 1);

  await s.stop("SIGKILL");
  const rejoined = next(ada.room("news"), "joined");
  const bobBack = next(bob.room("news"), "joined");
  await s.restart();
  const [[info]] = await Promise.all([rejoined, bobBack]);
  assert.equal(info.rejoined, true);
  assert.equal(info.recovered, false, "history went with the process");
  assert.notEqual(info.epoch, first.epoch);
  assert.deepEqual(ada.room("news").position, { epoch: info.epoch, offset: info.offset });
  const start = info.offset;

  bob.send("news", "after");
  await until("ada hears the room again", () => news.length === 2);
  assert.deepEqual(news[1], { text: "after", offset: start + 1, replayed: false });
  assert.deepEqual(ada.room("news").position, { epoch: info.epoch, offset: start + 1 });
});

test("a position kept across page loads is passed as since; a room without history re-joins without it", async () => {
  // `relay` serves `relay` and `relay:*` without history; rooms without a plugin keep it.
  const s = await server([["relay"]]);
  const bob = client(s.url());
  await bob.join("news");

  // The first page: reads a message, keeps its position, goes.
  const page = client(s.url());
  await page.join("news");
  bob.send("news", "seen");
  await next(page.room("news"), "message");
  const kept = JSON.parse(JSON.stringify(page.room("news").position));
  assert.equal(kept.offset, 1);
  page.close();
  await s.waitMetric("roomcast_room_members", 1);
  bob.send("news", "while reloading 1");
  bob.send("news", "while reloading 2");
  await s.waitMetric("roomcast_history_messages", 3);

  // The next page starts from it.
  const net = unreliableWebSocket();
  const again = client(s.url(), { WebSocket: net.WebSocket, minDelay: 50, maxDelay: 200 });
  const news = collect(again, "news");
  const reply = await again.join("news", { since: kept });
  assert.equal(reply.recovered, true);
  await until("the page gets what it missed", () => news.length === 2);
  assert.deepEqual(news.map((m) => [m.text, m.offset, m.replayed]), [
    ["while reloading 1", 2, true],
    ["while reloading 2", 3, true],
  ]);
  await assert.rejects(again.join("other", { since: { epoch: 7 } }), TypeError);

  // A room without history: no position, and no since on the re-join.
  const relayed = await again.join("relay:plain");
  assert.equal(relayed.epoch, undefined);
  assert.equal(again.room("relay:plain").position, null);
  const both = new Set();
  const rejoined = next(again, "joined", (info) => both.add(info.room) && both.size === 2);
  net.drop();
  net.offline = false;
  await rejoined;
  const rejoins = net.sent.slice(-2).filter((frame) => frame.join !== undefined);
  assert.deepEqual(
    rejoins.map(({ join, since }) => [join, since]).sort(),
    [
      ["news", { epoch: kept.epoch, offset: 3 }],
      ["relay:plain", undefined],
    ],
  );

  // Left, the room's position is forgotten: a later join starts afresh.
  await again.leave("news");
  assert.equal(again.room("news").position, null);
});
