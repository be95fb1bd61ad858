// Node `ws` 8 peer: every message to a room goes to every OTHER member of the room,
// like Roomcast without a plugin.
//
// Run with: node bench/peers/ws.js PORT
//
// The usual ws heartbeat: ping every client each interval, terminate those that did
// not answer the previous ping.
//
// COMPRESSION=1 turns on permessage-deflate: messages of COMPRESSION_THRESHOLD bytes
// (default 256) and more are compressed, with no context takeover either way and
// zlib's default level; `send` compresses for each recipient.
'use strict';
const http = require('http');
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2] || 9002);
const heartbeatSecs = Number(process.env.HEARTBEAT_SECS || 10);
const perMessageDeflate =
  process.env.COMPRESSION === '1'
    ? {
        threshold: Number(process.env.COMPRESSION_THRESHOLD || 256),
        serverNoContextTakeover: true,
        clientNoContextTakeover: true,
      }
    : false;

/** room name -> Set of sockets */
const rooms = new Map();

const server = http.createServer((req, res) => {
  res.writeHead(req.url === '/healthz' ? 200 : 404);
  res.end();
});
const wss = new WebSocketServer({
  noServer: true,
  maxPayload: 64 * 1024,
  clientTracking: false,
  perMessageDeflate,
});

server.on('upgrade', (req, socket, head) => {
  const match = /^\/ws\/([A-Za-z0-9._:-]{1,128})$/.exec(req.url);
  if (!match) {
    socket.end('HTTP/1.1 400 Bad Request\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => join(ws, match[1]));
});

function join(ws, name) {
  let room = rooms.get(name);
  if (!room) {
    room = new Set();
    rooms.set(name, room);
  }
  room.add(ws);
  ws.isAlive = true;
  ws.on('pong', () => {
    ws.isAlive = true;
  });
  ws.on('message', (data, isBinary) => {
    for (const other of room) {
      if (other !== ws && other.readyState === WebSocket.OPEN) {
        other.send(data, { binary: isBinary });
      }
    }
  });
  ws.on('close', () => {
    room.delete(ws);
    if (room.size === 0 && rooms.get(name) === room) rooms.delete(name);
  });
  ws.on('error', () => {});
}

setInterval(() => {
  for (const room of rooms.values()) {
    for (const ws of room) {
      if (!ws.isAlive) {
        ws.terminate();
        continue;
      }
      ws.isAlive = false;
      ws.ping();
    }
  }
}, heartbeatSecs * 1000).unref();

server.listen({ host: '127.0.0.1', port, backlog: 4096 }, () => {
  console.log(`ws peer listening on 127.0.0.1:${port}`);
});
