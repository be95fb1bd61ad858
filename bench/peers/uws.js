// uWebSockets.js peer (npm `uwebsockets@3.0.6`): every message to a room goes to every
// OTHER member of the room, like Roomcast without a plugin.
//
// Run with: node bench/peers/uws.js PORT
//
// Rooms are uWS topics; `ws.publish` skips the publishing socket. maxBackpressure is
// raised from its 64 KiB default, which silently skips receivers during bursts.
//
// COMPRESSION=1 turns on permessage-deflate with uWS' shared compressor and shared
// decompressor (no per-socket compression state, no context takeover); every publish
// then asks for compression. uWS has no size threshold: it compresses every non-empty
// message, and it does so for each subscriber's send.
'use strict';
const uWS = require('uwebsockets');

const port = Number(process.argv[2] || 9001);
const heartbeatSecs = Number(process.env.HEARTBEAT_SECS || 10);
const compress = process.env.COMPRESSION === '1';

uWS
  .App()
  .ws('/ws/:room', {
    compression: compress ? uWS.SHARED_COMPRESSOR | uWS.SHARED_DECOMPRESSOR : uWS.DISABLED,
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
      ws.publish(ws.getUserData().room, message, isBinary, compress);
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
