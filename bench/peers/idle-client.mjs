// A second, independent measurement of idle memory, with Node's `ws` as the client
// rather than the project's own load generator: open N idle connections (answering
// pings, as `ws` does by itself), then print the server's RSS per connection two
// seconds after the last one opened and every 10 s after that.
//
//   (cd bench/peers && npm ci)
//   node bench/peers/idle-client.mjs ws://127.0.0.1:PORT/ws/idle SERVER_PID 10000 40 [deflate]
import fs from "node:fs";
import WebSocket from "ws";

const [url, pid, n, seconds, mode] = process.argv.slice(2);
const count = Number(n);
const rss = () => Number(fs.readFileSync(`/proc/${pid}/status`, "utf8").match(/VmRSS:\s+(\d+)/)[1]);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const perMessageDeflate = mode === "deflate" ? { threshold: 0 } : false;

const before = rss();
const sockets = [];
let closed = 0;
for (let i = 0; i < count; i += 250) {
  const batch = [];
  for (let j = i; j < Math.min(count, i + 250); j++) {
    batch.push(
      new Promise((resolve, reject) => {
        const ws = new WebSocket(url, { perMessageDeflate });
        ws.on("open", resolve);
        ws.on("error", reject);
        ws.on("close", () => closed++);
        sockets.push(ws);
      }),
    );
  }
  await Promise.all(batch);
}
const report = (label) => {
  const now = rss();
  console.log(`${label}: rss ${now} KiB, ${((now - before) / count).toFixed(2)} KiB per connection, ${count - closed} open`);
};
await sleep(2000);
report(`${count} connections, 2 s after the last opened`);
for (let t = 10; t <= Number(seconds); t += 10) {
  await sleep(10000);
  report(`t=${t} s`);
}
process.exit(0);
