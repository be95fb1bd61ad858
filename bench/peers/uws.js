// uWebSockets.js peer (npm `uwebsockets@3.0.6`): every message to a room goes to every
// OTHER member of the room, like Roomcast without a plugin.
//
// Run with: node bench/peers/uws.js PORT
//
// Rooms are uWS topics; `ws.publish` skips the publishing socket. maxBackpressure is
// raised from its 64 KiB default, which silently skips receivers during bursts.
'use strict';
const uWS = require('uwebsockets');

const port = Number(process.argv[2] || 9001);
const heartbeatSecs = Number(process.env.HEARTBEAT_SECS || 10);

uWS
  .App()
  .ws('/ws/:room', {
    compression: uWS.DISABLED,
    maxPayloadLength: 64 * 1024,
    maxBackpressure: 64 * 1024 * 1024,
    closeOnBackpressureLimit: true,
    // uWS pings a socket that has been idle for a while before idleTimeout closes it.
    idleTimeout: heartbeatSecs * 2,
    sendPingsAutomatically: true,
    upgrade: (res, req, context) => {
      res.upgrade(
        { room: req.getParameter(0) },
        req.getHeader('sec-websocket-key'),
        req.getHeader('sec-websocket-protocol'),
        req.getHeader('sec-websocket-extensions'),
        context,
      );
    },
    open: (ws) => {
      ws.subscribe(ws.getUserData().room);
    },
    message: (ws, message, isBinary) => {
      ws.publish(ws.getUserData().room, message, isBinary);
    },
  })
  .get('/healthz', (res) => res.end('ok'))
  .listen('127.0.0.1', port, (token) => {
    if (!token) {
      console.error(`uws peer: cannot listen on 127.0.0.1:${port}`);
      process.exit(1);
    }
    console.log(`uws peer listening on 127.0.0.1:${port}`);
  });
