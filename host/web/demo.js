// The chat demo's behaviour: several `chat` rooms open at once on one connection
// through the browser client (/roomcast.js). A sidebar lists the rooms; the one chosen
// shows its messages and members; room-wide and direct messages; the client reconnects
// by itself (jittered exponential backoff) and re-joins every room, and the messages
// missed meanwhile appear in their rooms (or the room says they could not be).

import { Roomcast } from "/roomcast.js";

const $ = (id) => document.getElementById(id);
/** Room names are 1 to 128 characters; "chat:" takes five of them. */
const ROOM = /^[A-Za-z0-9._:-]{1,123}$/;
/** Messages kept on screen per room. */
const LOG_LIMIT = 500;

/** The connection, while the user is in at least one room; its name is fixed for its life. */
let client = null;
let myName = "";
/** The rooms on screen, by full room name ("chat:lobby"), in the order joined. */
const rooms = new Map();
/** The room shown, or null. */
let active = null;

/**
 * What the page keeps per room: its lines (kept while another room is shown), its
 * members, our id there, and whom the next message goes to.
 */
function roomState(name) {
  let room = rooms.get(name);
  if (!room) {
    room = {
      name,
      lines: [],
      members: new Map(),
      me: null,
      // Our ids on earlier connections: their leaving, replayed, is not news.
      formerMe: new Set(),
      directTo: null,
      unread: 0,
      state: "joining",
      welcomeTimer: 0,
    };
    rooms.set(name, room);
    room.off = client.room(name).on("message", (data, envelope) => receive(room, data, envelope.replayed === true));
  }
  return room;
}

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

/** The status line from the connection's state and the rooms' states. */
function updateStatus() {
  if (!client) return setStatus("idle", "Not connected");
  if (client.state !== "open") return;
  const waiting = [...rooms.values()].some((room) => room.state === "joining");
  if (waiting) setStatus("connecting", "Joining rooms…");
  else setStatus("connected", `Connected as ${myName} · ${client.rooms.length} room${client.rooms.length === 1 ? "" : "s"} on one connection`);
}

function connect(name) {
  myName = name;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const rc = new Roomcast(`${scheme}//${location.host}/ws?name=${encodeURIComponent(name)}`);
  client = rc;
  $("name").disabled = true;
  setStatus("connecting", "Connecting…");
  rc.on("open", updateStatus);
  rc.on("close", (event) => {
    for (const room of rooms.values()) {
      if (room.state === "joined") room.state = "joining";
      if (room.me !== null) room.formerMe.add(room.me);
      room.me = null;
      clearTimeout(room.welcomeTimer);
    }
    renderRooms();
    setComposer();
    const why = event.code && event.code !== 1006 ? ` (${event.code}${event.reason ? ": " + event.reason : ""})` : "";
    if (client === rc) setStatus("reconnecting", `Connection lost${why}.`);
  });
  rc.on("reconnecting", ({ attempt, delay }) => {
    if (client === rc) setStatus("reconnecting", `Connection lost. Retrying in ${(delay / 1000).toFixed(1)} s (attempt ${attempt})…`);
  });
  rc.on("joined", (info) => {
    // A join answered after the user left the room again: its `left` follows.
    if (!rooms.has(info.room) && !info.byServer) return;
    const room = roomState(info.room);
    room.state = "joined";
    if (info.byServer) line(room, "system", `The server added you to ${room.name}.`);
    // Back after a reconnect: what was missed follows (marked), or could not be had.
    if (info.recovered === false) {
      line(room, "system notice", "Messages sent while you were away could not be recovered.");
    }
    room.welcomeTimer = setTimeout(
      () => line(room, "error", "No welcome from the server: is the chat plugin loaded? (scripts/run loads it.)"),
      3000,
    );
    if (active === null) show(room.name);
    renderRooms();
    setComposer();
    updateStatus();
  });
  rc.on("left", (info) => {
    const room = rooms.get(info.room);
    if (!room || !info.byServer) return;
    room.state = "ended";
    room.members = new Map();
    line(room, "error", `The server ended your membership of ${room.name} (${info.code}${info.reason ? ": " + info.reason : ""}).`);
    renderRooms();
    renderMembers();
    setComposer();
  });
  rc.on("error", (error) => {
    const room = error.room === undefined ? null : rooms.get(error.room);
    if (room) {
      room.state = "refused";
      line(room, "error", `Could not join ${room.name}: ${error.error} (${error.status}).`);
      renderRooms();
      setComposer();
      updateStatus();
    }
  });
}

/** A message of the room; `replayed` when it was sent while this page was away. */
function receive(room, data, replayed) {
  const missed = replayed ? " recovered" : "";
  let msg;
  try {
    msg = typeof data === "string" ? JSON.parse(data) : null;
  } catch {
    msg = null;
  }
  if (!msg) {
    line(room, "error", `Unexpected message: ${String(data).slice(0, 200)}`);
    return;
  }
  switch (msg.type) {
    case "welcome":
      clearTimeout(room.welcomeTimer);
      room.me = msg.id;
      room.members = new Map(msg.members.map((m) => [m.id, m.name]));
      if (room.directTo !== null && !room.members.has(room.directTo)) room.directTo = null;
      line(room, "system", `You joined ${room.name} as ${msg.name}.`);
      if (room.name === active) {
        renderMembers();
        chooseRecipient(room.directTo, false);
      }
      break;
    case "join":
      // Our own join, replayed: the welcome said it.
      if (replayed && msg.id === room.me) break;
      room.members.set(msg.id, msg.name);
      if (room.name === active) renderMembers();
      line(room, "system" + missed, `${msg.name} joined.`);
      break;
    case "leave":
      // Our own connection that dropped, replayed.
      if (replayed && room.formerMe.has(msg.id)) break;
      room.members.delete(msg.id);
      if (room.directTo === msg.id) room.directTo = null;
      if (room.name === active) {
        renderMembers();
        chooseRecipient(room.directTo, false);
      }
      line(room, "system" + missed, `${msg.name} left.`);
      break;
    case "say":
      if (msg.from_room !== undefined) line(room, "say" + missed, msg.text, `from ${msg.from_room}`);
      else {
        const mine = msg.from === room.me || (replayed && room.formerMe.has(msg.from));
        line(room, (mine ? "say mine" : "say") + missed, msg.text, msg.name);
      }
      break;
    case "direct": {
      const mine = msg.from === room.me;
      const who = mine ? `you → ${room.members.get(msg.to) ?? msg.to}` : `${msg.name} → you`;
      line(room, mine ? "direct mine" : "direct", msg.text, who);
      break;
    }
    case "error":
      line(room, "error", msg.error);
      break;
    default:
      line(room, "error", `Unexpected message: ${String(data).slice(0, 200)}`);
  }
}

/** Add a line to `room`'s log (on screen if it is the room shown, else kept and counted). */
function line(room, kind, text, who) {
  const item = document.createElement("li");
  item.className = kind;
  if (who !== undefined) {
    const author = document.createElement("span");
    author.className = "who";
    author.textContent = who;
    item.append(author, " ");
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  const time = document.createElement("time");
  const now = new Date();
  time.dateTime = now.toISOString();
  time.textContent = now.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (item.classList.contains("recovered")) {
    // Sent while the page was away; it arrived when the page came back.
    time.textContent = "while you were away";
    item.title = "Sent while you were away, recovered when the connection came back";
  }
  item.append(body, " ", time);
  room.lines.push(item);
  if (room.lines.length > LOG_LIMIT) room.lines.shift().remove();
  if (room.name === active) {
    const log = $("log");
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    log.append(item);
    if (atBottom) log.scrollTop = log.scrollHeight;
  } else if (!kind.startsWith("system")) {
    room.unread += 1;
    renderRooms();
  }
}

/** Show room `name`: its log, its members, its composer. */
function show(name) {
  active = name;
  const room = name === null ? null : rooms.get(name);
  if (room) room.unread = 0;
  $("room-label").textContent = name ?? "none yet";
  $("leave").hidden = room === null;
  const log = $("log");
  log.replaceChildren(...(room ? room.lines : []));
  log.scrollTop = log.scrollHeight;
  renderRooms();
  renderMembers();
  chooseRecipient(room ? room.directTo : null, false);
  setComposer();
}

function renderRooms() {
  $("rooms").replaceChildren(
    ...[...rooms.values()].map((room) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "room";
      button.dataset.room = room.name;
      button.dataset.state = room.state;
      button.setAttribute("aria-current", String(room.name === active));
      button.textContent = room.name;
      if (room.unread) {
        const badge = document.createElement("span");
        badge.className = "unread";
        badge.textContent = String(room.unread);
        badge.setAttribute("aria-label", `${room.unread} unread`);
        button.append(" ", badge);
      }
      button.addEventListener("click", () => show(room.name));
      item.append(button);
      return item;
    }),
  );
  $("room-count").textContent = rooms.size ? `(${rooms.size})` : "";
}

function renderMembers() {
  const room = active === null ? null : rooms.get(active);
  const members = room ? room.members : new Map();
  $("members").replaceChildren(
    ...[...members].map(([id, name]) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "member";
      button.dataset.id = id;
      button.dataset.name = name;
      button.textContent = id === room.me ? `${name} (you)` : name;
      button.setAttribute("aria-pressed", String(id === room.directTo));
      button.addEventListener("click", () => chooseRecipient(id === room.directTo ? null : id, true));
      item.append(button);
      return item;
    }),
  );
  $("member-count").textContent = members.size ? `(${members.size})` : "";
}

/** Send the next message to member `id` of the room shown, or to the whole room (null). */
function chooseRecipient(id, focus) {
  const room = active === null ? null : rooms.get(active);
  if (room) room.directTo = id;
  const members = room ? room.members : new Map();
  $("to").hidden = id === null;
  $("to-label").textContent = id === null ? "" : `Direct message to ${members.get(id) ?? id}`;
  $("message").placeholder = id === null ? "Message the room" : `Message ${members.get(id) ?? id} only`;
  for (const button of document.querySelectorAll("#members .member")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.id) === id));
  }
  if (focus) $("message").focus();
}

function setComposer() {
  const room = active === null ? null : rooms.get(active);
  const enabled = room !== null && room.state === "joined" && client?.state === "open";
  $("message").disabled = !enabled;
  $("send").disabled = !enabled;
  if (!enabled && room === null) $("message").placeholder = "Join a room to chat";
}

function join(event) {
  event.preventDefault();
  const name = client ? myName : $("name").value.trim();
  const room = $("room").value.trim();
  if (!name || !ROOM.test(room)) {
    setStatus(client ? $("status").dataset.state : "idle", "Choose a name, and a room of letters, digits and . _ : -");
    return;
  }
  localStorage.setItem("roomcast.name", name);
  localStorage.setItem("roomcast.room", room);
  if (!client) connect(name);
  const full = `chat:${room}`;
  const existing = rooms.get(full);
  if (existing && existing.state !== "ended" && existing.state !== "refused") {
    show(full);
    return;
  }
  const state = roomState(full);
  state.state = "joining";
  show(full);
  updateStatus();
  client.join(full).catch(() => {
    // Shown by the client's `error` event.
  });
}

function leave() {
  if (active === null) return;
  const room = rooms.get(active);
  clearTimeout(room.welcomeTimer);
  room.off();
  rooms.delete(active);
  client.leave(room.name);
  const next = rooms.keys().next();
  show(next.done ? null : next.value);
  if (rooms.size === 0) {
    // The last room: the connection goes too, and the name may change again.
    const rc = client;
    client = null;
    rc.close();
    $("name").disabled = false;
  }
  updateStatus();
}

function send(event) {
  event.preventDefault();
  const input = $("message");
  const text = input.value.trim();
  const room = active === null ? null : rooms.get(active);
  if (!text || !room) return;
  const message = room.directTo === null ? { say: text } : { to: room.directTo, say: text };
  if (client.send(room.name, JSON.stringify(message))) input.value = "";
}

const params = new URLSearchParams(location.search);
$("name").value = params.get("name") ?? localStorage.getItem("roomcast.name") ?? "";
$("room").value = params.get("room") ?? localStorage.getItem("roomcast.room") ?? "lobby";
$("join-form").addEventListener("submit", join);
$("leave").addEventListener("click", leave);
$("send-form").addEventListener("submit", send);
$("to-clear").addEventListener("click", () => chooseRecipient(null, true));
renderRooms();
renderMembers();
