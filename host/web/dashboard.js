// The dashboard's behaviour: listen to /dashboard/events (server-sent events, carried
// by the session cookie) and redraw the page from each `snapshot` event.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [key, value] of Object.entries(attrs ?? {})) node.setAttribute(key, value);
    return node;
  }

  function setLive(state, text) {
    $("live").dataset.state = state;
    $("live").textContent = text;
  }

  function time(rfc3339) {
    return rfc3339 ? new Date(rfc3339).toLocaleTimeString() : "–";
  }

  function render(s) {
    $("connections").textContent = s.connections;
    $("room-count").textContent = s.room_count;
    $("members").textContent = s.members;
    $("rate-in").textContent = s.messages_in_per_s.toFixed(1);
    $("rate-out").textContent = s.messages_out_per_s.toFixed(1);
    $("started").textContent = new Date(s.started_at).toLocaleString();
    $("node").textContent = s.cluster ? `Node ${s.cluster.node}, ${s.cluster.up ? "Redis connected" : "Redis unreachable: this node's rooms only"}.` : "";

    $("rooms").replaceChildren(
      ...(s.rooms.length
        ? s.rooms.map((room) => {
            const row = el("tr", undefined, { "data-room": room.name });
            row.append(el("td", room.name));
            // In cluster mode a room owned by another node runs its plugin there.
            const elsewhere = s.cluster && room.owner && room.owner !== s.cluster.node;
            const plugin = room.plugin ? `${room.plugin} (load ${room.version})` : elsewhere ? `on node ${room.owner}` : "none (relay)";
            row.append(el("td", plugin));
            const names = room.members.map((m) => (m.name ? `${m.name} (#${m.id})` : `#${m.id}`));
            const local = room.local_members ?? room.member_count;
            if (local > room.members.length) names.push(`… ${local - room.members.length} more`);
            if (room.member_count > local) names.push(`${room.member_count - local} on other nodes`);
            row.append(el("td", `${room.member_count}: ${names.join(", ")}`));
            return row;
          })
        : [emptyRow(3, "No rooms: nobody is connected.")]),
    );

    $("plugins").replaceChildren(
      ...(s.plugins.length
        ? s.plugins.map((p) => {
            const row = el("tr", undefined, { "data-plugin": p.name, "data-version": p.version ?? "" });
            const name = el("td");
            name.append(el("strong", p.name));
            if (p.describe) name.append(el("small", p.describe));
            row.append(name);
            row.append(el("td", p.version ? `load ${p.version} of ${p.versions}` : "not loaded", { class: "nowrap" }));
            row.append(el("td", time(p.loaded_at), { class: "nowrap" }));
            row.append(el("td", p.rooms.length ? p.rooms.join(", ") : "–"));
            row.append(el("td", p.last_error ? `${time(p.last_error_at)}: ${p.last_error}` : "–", { class: p.last_error ? "error" : "" }));
            return row;
          })
        : [emptyRow(5, "No plugins: every room relays messages unchanged.")]),
    );

    $("reloads").replaceChildren(
      ...(s.reloads.length
        ? s.reloads.map((e) => {
            const item = el("li", undefined, { "data-plugin": e.plugin, "data-kind": e.kind, "data-version": e.version ?? "", class: e.kind });
            item.append(el("time", time(e.at), { datetime: e.at }), " ");
            const what = e.kind === "loaded" ? `loaded (load ${e.version})` : e.kind === "failed" ? `failed: ${e.error}` : "removed";
            item.append(el("strong", e.plugin), ` ${what}`);
            return item;
          })
        : [el("li", "No reloads yet.", { class: "muted" })]),
    );

    for (const id of ["closed", "rejected"]) {
      const list = $(id);
      list.replaceChildren();
      for (const [reason, count] of Object.entries(s[id])) {
        list.append(el("dt", reason), el("dd", count, { "data-reason": reason, class: count ? "" : "muted" }));
      }
    }
    setLive(s.draining ? "reconnecting" : "connected", s.draining ? "Live: the server is draining" : `Live · ${time(s.at)}`);
  }

  function emptyRow(columns, text) {
    const row = el("tr");
    row.append(el("td", text, { colspan: columns, class: "muted" }));
    return row;
  }

  function listen() {
    const events = new EventSource("/dashboard/events");
    events.addEventListener("snapshot", (event) => render(JSON.parse(event.data)));
    events.onerror = () => {
      if (events.readyState === EventSource.CLOSED) {
        // Refused (the session ended, or the server restarted and forgot it): once the
        // server answers again, reload, which shows the sign-in form if needed.
        setLive("reconnecting", "Disconnected; waiting for the server…");
        waitThenReload(0);
      } else {
        setLive("reconnecting", "Disconnected; reconnecting…");
      }
    };
  }

  function waitThenReload(attempt) {
    const delay = Math.min(10000, 500 * 2 ** attempt) * (0.5 + Math.random() / 2);
    setTimeout(() => {
      fetch("/dashboard", { method: "HEAD", cache: "no-store" }).then(
        () => location.reload(),
        () => waitThenReload(attempt + 1),
      );
    }, delay);
  }

  document.addEventListener("DOMContentLoaded", listen);
})();
