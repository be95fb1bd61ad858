// What the client's tests share: a real `roomcast serve` process on a free loopback
// port (restartable on the same port), a plugins folder of built example plugins,
// and waits with generous bounds.
//
// ROOMCAST_TEST_OWN_WEBSOCKET=1 uses the tests' own WebSocket (test/websocket.js)
// even where Node has one.
//
// ROOMCAST_BIN: the server executable (default: the workspace's target/debug/roomcast).
// ROOMCAST_PLUGINS: the folder of built example plugins (default: the workspace's
// plugins/target/wasm32-wasip2/release). ROOMCAST_PLUGIN_CACHE: a compiled-plugin
// cache folder for the servers (default: the server's own default).

import { spawn } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import { install } from "./websocket.js";

// Node 22 has a WebSocket (Node 20.10+ with --experimental-websocket); older ones get
// the tests' own.
if (process.env.ROOMCAST_TEST_OWN_WEBSOCKET === "1") delete globalThis.WebSocket;
install();

const workspace = fileURLToPath(new URL("../../../", import.meta.url));
const BIN = process.env.ROOMCAST_BIN ?? join(workspace, "target/debug/roomcast");
const PLUGINS = process.env.ROOMCAST_PLUGINS ?? join(workspace, "plugins/target/wasm32-wasip2/release");

/** How long anything the tests wait for may take (a debug build compiles plugins slowly). */
export const WAIT = 60_000;

/** A `roomcast serve` child process. */
export class Server {
  /**
   * Start a server with these plugins (`[name, manifest?]`: NAME.wasm copied from the
   * built plugins, NAME.toml written when given) on a free port, with `args` added to
   * `roomcast serve` (say `["--history-size", "100"]`).
   */
  static async start(plugins = [], args = []) {
    if (!existsSync(BIN)) throw new Error(`${BIN} is missing: build it (cargo build -p roomcast) or set ROOMCAST_BIN`);
    const dir = mkdtempSync(join(tmpdir(), "roomcast-js-"));
    for (const [name, manifest] of plugins) {
      const built = join(PLUGINS, `${name}.wasm`);
      if (!existsSync(built)) throw new Error(`${built} is missing: build the plugins or set ROOMCAST_PLUGINS`);
      copyFileSync(built, join(dir, `${name}.wasm`));
      if (manifest) writeFileSync(join(dir, `${name}.toml`), manifest);
    }
    const server = new Server(dir, args);
    await server.#spawn("127.0.0.1:0");
    return server;
  }

  #child = null;
  #log = "";

  #args;

  constructor(dir, args = []) {
    this.dir = dir;
    this.#args = args;
    this.addr = null;
  }

  /** `ws://ADDR/ws` plus `query`. */
  url(query = "") {
    return `ws://${this.addr}/ws${query}`;
  }

  /** Everything the server logged. */
  get log() {
    return this.#log;
  }

  async #spawn(listen) {
    const args = ["serve", "--listen", listen, "--plugins", this.dir, ...this.#args];
    if (process.env.ROOMCAST_PLUGIN_CACHE) args.push("--plugin-cache", process.env.ROOMCAST_PLUGIN_CACHE);
    const env = { ...process.env, NO_COLOR: "1", RUST_BACKTRACE: "0" };
    delete env.ROOMCAST_ADMIN_TOKEN;
    const child = spawn(BIN, args, {
      env,
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.#child = child;
    this.addr = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no listening line within ${WAIT} ms:\n${this.#log}`)), WAIT);
      const read = (chunk) => {
        this.#log += chunk;
        const listening = /listening url=http:\/\/([0-9.]+:[0-9]+)/.exec(this.#log);
        if (listening) {
          clearTimeout(timer);
          resolve(listening[1]);
        }
      };
      child.stdout.setEncoding("utf8").on("data", read);
      child.stderr.setEncoding("utf8").on("data", read);
      child.on("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`roomcast exited (${code ?? signal}) before listening:\n${this.#log}`));
      });
    });
  }

  /** End the process with `signal` (SIGKILL: no close frames, like a crash) and wait for it. */
  async stop(signal = "SIGTERM") {
    const child = this.#child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill(signal);
    await exited;
  }

  /** Start again on the same port, with the same plugins and arguments. */
  async restart() {
    await this.#spawn(this.addr);
  }

  /** The value of one series of `/metrics`. */
  async metric(series) {
    const text = await (await fetch(`http://${this.addr}/metrics`)).text();
    const line = text.split("\n").find((l) => l.startsWith(`${series} `));
    if (!line) throw new Error(`no series ${series}`);
    return Number(line.slice(series.length + 1));
  }

  /** Wait until `series` is `value`, polling, within WAIT. */
  async waitMetric(series, value) {
    await until(`${series} = ${value}`, async () => (await this.metric(series)) === value);
  }

  async close() {
    await this.stop("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Resolve with the arguments of the first `event` from `emitter` that `accept`s, within WAIT. */
export function next(emitter, event, accept = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${event} event within ${WAIT} ms`));
    }, WAIT);
    const off = emitter.on(event, (...args) => {
      if (!accept(...args)) return;
      clearTimeout(timer);
      off();
      resolve(args);
    });
  });
}

/** Poll `check` until it holds, within WAIT. */
export async function until(what, check) {
  const deadline = Date.now() + WAIT;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${WAIT} ms`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * A WebSocket whose network the test controls: `drop()` ends the newest connection
 * (the client sees it close, as when a network drops), and while `offline` every new
 * connection fails to connect, as with no network. What it sends is kept in `sent`.
 */
export function unreliableWebSocket() {
  const control = { offline: false, sockets: [], sent: [] };
  class Unreliable extends globalThis.WebSocket {
    constructor(url, protocols) {
      // Nothing listens on port 1: the connection is refused.
      super(control.offline ? "ws://127.0.0.1:1/ws" : url, protocols);
      control.sockets.push(this);
    }

    send(data) {
      control.sent.push(typeof data === "string" ? JSON.parse(data) : data);
      super.send(data);
    }
  }
  control.WebSocket = Unreliable;
  control.drop = () => {
    control.offline = true;
    control.sockets.at(-1).close(4000, "the network went away");
  };
  return control;
}

/** A WebSocket that keeps what it sends in `sent` (every instance's, in order): the real one, observed. */
export function recordingWebSocket() {
  const sent = [];
  class Recording extends globalThis.WebSocket {
    send(data) {
      sent.push(typeof data === "string" ? JSON.parse(data) : data);
      super.send(data);
    }
  }
  return { WebSocket: Recording, sent };
}
