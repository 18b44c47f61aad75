#!/usr/bin/env node
// An independent Forward client (@fluent-org/logger) for pyforward's interop tests.
//
//   node client.js --port P [--host H] [--mode Message|Forward|PackedForward|CompressedPackedForward]
//                  [--input FILE.jsonl] [--count N] [--ack] [--ack-timeout MS] [--tag T]
//                  [--ca F] [--cert F --key F] [--servername N]
//                  [--shared-key K] [--client-hostname H] [--username U --password P] [--timeout MS]
//
// --input: one JSON object per line, {"time": [seconds, nanoseconds], "record": {...}}; each is emitted with
// that EventTime. Without it, --count N generated records {"seq": i, "message": "..."} are sent.
// Exit 0 when every emit resolved (with --ack: every record acked), 1 on an error, 3 on --timeout.
// Prints one JSON summary line on stdout.
"use strict";

const fs = require("fs");
const { FluentClient, EventTime } = require("@fluent-org/logger");

function parseArgs(argv) {
  const args = { host: "127.0.0.1", mode: "PackedForward", count: 10, ack: false, ackTimeout: 10000,
    tag: "interop", timeout: 20000 };
  const flags = new Set(["ack"]);
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i].replace(/^--/, "").replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!argv[i].startsWith("--")) throw new Error(`unexpected argument ${argv[i]}`);
    if (flags.has(name)) { args[name] = true; continue; }
    if (i + 1 >= argv.length) throw new Error(`${argv[i]} needs a value`);
    args[name] = argv[++i];
  }
  for (const k of ["port", "count", "ackTimeout", "timeout"]) args[k] = Number(args[k]);
  if (!args.port) throw new Error("--port is required");
  return args;
}

function loadEvents(args) {
  if (!args.input) {
    const events = [];
    for (let i = 0; i < args.count; i++) {
      events.push({ time: null, record: { seq: i, message: `interop record ${i}` } });
    }
    return events;
  }
  return fs.readFileSync(args.input, "utf8").split("\n").filter(l => l.trim()).map(l => JSON.parse(l));
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const events = loadEvents(args);
  const socket = { host: args.host, port: args.port, timeout: -1, disableReconnect: true };
  if (args.ca || args.cert) {
    socket.tls = {
      ca: args.ca ? fs.readFileSync(args.ca) : undefined,
      cert: args.cert ? fs.readFileSync(args.cert) : undefined,
      key: args.key ? fs.readFileSync(args.key) : undefined,
      servername: args.servername || "localhost",
    };
  }
  const options = { eventMode: args.mode, socket, milliseconds: true };
  if (args.ack) options.ack = { ackTimeout: args.ackTimeout };
  if (args.sharedKey !== undefined) {
    options.security = { clientHostname: args.clientHostname || "node-interop-client", sharedKey: args.sharedKey };
    if (args.username !== undefined) {
      options.security.username = args.username;
      options.security.password = args.password || "";
    }
  }
  const client = new FluentClient(null, options);
  let socketError = null;
  const failed = new Promise((_, reject) => {
    client.socketOn("error", err => { socketError = err; reject(err); });
    // With reconnects disabled, a connection the server drops (e.g. a refused TLS client certificate, seen
    // only after the handshake with TLS 1.3) would leave the emits pending forever.
    client.socketOn("close", () => reject(new Error("connection closed by the server before everything was sent")));
  });
  const timer = new Promise((_, reject) => {
    setTimeout(() => reject(Object.assign(new Error(`timeout after ${args.timeout} ms`), { code: 3 })), args.timeout)
      .unref();
  });

  const work = (async () => {
    await client.connect();
    // Emitting in one tick lets Forward/PackedForward batch records into multi-entry requests.
    const pending = events.map(ev => {
      const time = ev.time ? new EventTime(ev.time[0], ev.time[1]) : EventTime.now();
      return client.emit(args.tag, ev.record, time);
    });
    await Promise.all(pending);
  })();

  let code = 0;
  let error = null;
  try {
    await Promise.race([work, failed, timer]);
  } catch (err) {
    error = err;
    code = err && err.code === 3 ? 3 : 1;
  }
  process.stdout.write(JSON.stringify({ sent: events.length, ok: code === 0, error: error ? String(error.message || error) : null,
    socketError: socketError ? String(socketError.message || socketError) : null }) + "\n");
  if (code !== 0) process.stderr.write(`node client: ${error && (error.message || error)}\n`);
  // shutdown() rejects what is still pending; we exit either way (exitCode also covers an emptied event loop).
  process.exitCode = code;
  await Promise.race([client.shutdown().catch(() => {}), new Promise(r => setTimeout(r, 500).unref())]);
  process.exit(code);
}

main().catch(err => {
  process.stderr.write(`node client: ${err && err.stack || err}\n`);
  process.exit(1);
});
