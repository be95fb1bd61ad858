// The chat demo's behaviour: join a `chat` room over the browser's WebSocket, keep the
// member list, send room-wide and direct messages, and reconnect with jittered
// exponential backoff when the connection drops (a server restart or drain).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  /** Room names are 1 to 128 characters; "chat:" takes five of them. */
  const ROOM = /^[A-Za-z0-9._:-]{1,123}$/;
  /** Reconnect delays: the n-th retry waits between half and all of min(MAX, MIN * 2^n). */
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  /** Messages kept on screen. */
  const LOG_LIMIT = 500;

  let socket = null; // the live WebSocket, or null
  let wanted = null; // {name, room} while the user wants to be in a room
  let attempt = 0; // failed connections since the last welcome
  let retryTimer = 0;
  let welcomeTimer = 0;
  let me = null; // our member id in the room
  let members = new Map(); // id -> name, in join order
  let directTo = null; // member id the next message goes to, or null for the room

  function setStatus(state, text) {
    const status = $("status");
    status.dataset.state = state;
    status.textContent = text;
  }

  function backoff(n) {
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** n);
    return cap / 2 + (Math.random() * cap) / 2;
  }

  function connect() {
    clearTimeout(retryTimer);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/ws/chat:${wanted.room}?name=${encodeURIComponent(wanted.name)}`;
    setStatus("connecting", attempt ? `Reconnecting (attempt ${attempt + 1})…` : "Connecting…");
    const ws = new WebSocket(url);
    socket = ws;
    ws.onopen = () => {
      welcomeTimer = setTimeout(
        () => line("error", "No welcome from the server: is the chat plugin loaded? (scripts/run loads it.)"),
        3000,
      );
    };
    ws.onmessage = (event) => {
      if (ws === socket) receive(event.data);
    };
    ws.onclose = (event) => {
      if (ws === socket) disconnected(event);
    };
  }

  function disconnected(event) {
    socket = null;
    me = null;
    clearTimeout(welcomeTimer);
    setComposer(false);
    if (!wanted) {
      setStatus("idle", "Not connected");
      return;
    }
    const delay = backoff(attempt++);
    const why = event.code && event.code !== 1006 ? ` (${event.code}${event.reason ? ": " + event.reason : ""})` : "";
    setStatus("reconnecting", `Connection lost${why}. Retrying in ${(delay / 1000).toFixed(1)} s…`);
    retryTimer = setTimeout(connect, delay);
  }

  function receive(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      line("error", `Unexpected message: ${String(data).slice(0, 200)}`);
      return;
    }
    switch (msg.type) {
      case "welcome":
        clearTimeout(welcomeTimer);
        attempt = 0;
        me = msg.id;
        members = new Map(msg.members.map((m) => [m.id, m.name]));
        if (directTo !== null && !members.has(directTo)) chooseRecipient(null);
        renderMembers();
        setStatus("connected", `Connected as ${msg.name}`);
        setComposer(true);
        line("system", `You joined chat:${wanted.room} as ${msg.name}.`);
        break;
      case "join":
        members.set(msg.id, msg.name);
        renderMembers();
        line("system", `${msg.name} joined.`);
        break;
      case "leave":
        members.delete(msg.id);
        if (directTo === msg.id) chooseRecipient(null);
        renderMembers();
        line("system", `${msg.name} left.`);
        break;
      case "say":
        if (msg.from_room !== undefined) line("say", msg.text, `from ${msg.from_room}`);
        else line(msg.from === me ? "say mine" : "say", msg.text, msg.name);
        break;
      case "direct": {
        const who = msg.from === me ? `you → ${members.get(msg.to) ?? msg.to}` : `${msg.name} → you`;
        line(msg.from === me ? "direct mine" : "direct", msg.text, who);
        break;
      }
      case "error":
        line("error", msg.error);
        break;
      default:
        line("error", `Unexpected message: ${String(data).slice(0, 200)}`);
    }
  }

  function line(kind, text, who) {
    const log = $("log");
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
    item.append(body, " ", time);
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    log.append(item);
    while (log.children.length > LOG_LIMIT) log.firstElementChild.remove();
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function renderMembers() {
    const list = $("members");
    list.replaceChildren(
      ...[...members].map(([id, name]) => {
        const item = document.createElement("li");
        const button = document.createElement("button");
        button.type = "button";
        button.className = "member";
        button.dataset.id = id;
        button.dataset.name = name;
        button.textContent = id === me ? `${name} (you)` : name;
        button.setAttribute("aria-pressed", String(id === directTo));
        button.addEventListener("click", () => chooseRecipient(id === directTo ? null : id));
        item.append(button);
        return item;
      }),
    );
    $("member-count").textContent = members.size ? `(${members.size})` : "";
  }

  function chooseRecipient(id) {
    directTo = id;
    const to = $("to");
    to.hidden = id === null;
    $("to-label").textContent = id === null ? "" : `Direct message to ${members.get(id) ?? id}`;
    $("message").placeholder = id === null ? "Message the room" : `Message ${members.get(id) ?? id} only`;
    renderMembers();
    $("message").focus();
  }

  function setComposer(enabled) {
    $("message").disabled = !enabled;
    $("send").disabled = !enabled;
    if (enabled) $("message").placeholder = directTo === null ? "Message the room" : $("message").placeholder;
  }

  function join(event) {
    event.preventDefault();
    const name = $("name").value.trim();
    const room = $("room").value.trim();
    if (!name || !ROOM.test(room)) {
      line("error", "Choose a name, and a room of letters, digits and . _ : -");
      return;
    }
    localStorage.setItem("roomcast.name", name);
    localStorage.setItem("roomcast.room", room);
    leave();
    wanted = { name, room };
    attempt = 0;
    members = new Map();
    renderMembers();
    $("room-label").textContent = `chat:${room}`;
    $("leave").hidden = false;
    connect();
  }

  function leave() {
    wanted = null;
    clearTimeout(retryTimer);
    if (socket) {
      const ws = socket;
      socket = null;
      ws.close(1000);
      disconnected({ code: 1000 });
    }
    members = new Map();
    renderMembers();
    $("leave").hidden = true;
    setStatus("idle", "Not connected");
  }

  function send(event) {
    event.preventDefault();
    const input = $("message");
    const text = input.value.trim();
    if (!text || !socket || socket.readyState !== WebSocket.OPEN) return;
    socket.send(JSON.stringify(directTo === null ? { say: text } : { to: directTo, say: text }));
    input.value = "";
  }

  document.addEventListener("DOMContentLoaded", () => {
    const params = new URLSearchParams(location.search);
    $("name").value = params.get("name") ?? localStorage.getItem("roomcast.name") ?? "";
    $("room").value = params.get("room") ?? localStorage.getItem("roomcast.room") ?? "lobby";
    $("join-form").addEventListener("submit", join);
    $("leave").addEventListener("click", () => {
      leave();
      line("system", "You left the room.");
    });
    $("send-form").addEventListener("submit", send);
    $("to-clear").addEventListener("click", () => chooseRecipient(null));
    renderMembers();
  });
})();
