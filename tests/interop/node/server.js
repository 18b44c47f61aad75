#!/usr/bin/env node
// An independent Forward server (@fluent-org/logger FluentServer) for pyforward's interop tests.
//
//   node server.js [--port 0] [--host 127.0.0.1] [--cert F --key F [--ca F]]
//                  [--shared-key K [--server-hostname H] [--user NAME:PASSWORD ...]]
//
// Prints "fluent-server: listening on HOST:PORT (plain|tls|mtls)" on stderr once listening, then one JSON line
// per received entry on stdout: {"tag": T, "time": [seconds, nanoseconds] | seconds, "record": {...}}.
// It acks every request that carries a chunk id (FluentServer does). Stops on SIGTERM/SIGINT.
"use strict";

const fs = require("fs");
const { FluentServer, EventTime } = require("@fluent-org/logger");

function parseArgs(argv) {
  const args = { host: "127.0.0.1", port: 0, user: [] };
  for (let i = 0; i < argv.length; i++) {
    if (!argv[i].startsWith("--") || i + 1 >= argv.length) throw new Error(`bad argument ${argv[i]}`);
    const name = argv[i].slice(2).replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    const value = argv[++i];
    if (name === "user") args.user.push(value); else args[name] = value;
  }
  args.port = Number(args.port);
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const options = { listenOptions: { host: args.host, port: args.port } };
  let mode = "plain";
  if (args.cert) {
    options.tlsOptions = { cert: fs.readFileSync(args.cert), key: fs.readFileSync(args.key) };
    mode = "tls";
    if (args.ca) {
      Object.assign(options.tlsOptions, { ca: fs.readFileSync(args.ca), requestCert: true, rejectUnauthorized: true });
      mode = "mtls";
    }
  }
  if (args.sharedKey !== undefined) {
    const userDict = {};
    for (const u of args.user) {
      const at = u.indexOf(":");
      userDict[u.slice(0, at)] = u.slice(at + 1);
    }
    options.security = {
      serverHostname: args.serverHostname || "node-interop-server",
      sharedKey: args.sharedKey,
      authorize: args.user.length > 0,
      userDict,
    };
  }
  const server = new FluentServer(options);
  server.on("entry", (tag, time, record) => {
    const t = time instanceof EventTime ? [time.epoch, time.nano] : time;
    process.stdout.write(JSON.stringify({ tag, time: t, record }) + "\n");
  });
  await server.listen();
  process.stderr.write(`fluent-server: listening on ${args.host}:${server.port} (${mode})\n`);
  const stop = () => { server.close().then(() => process.exit(0)); setTimeout(() => process.exit(0), 1000).unref(); };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch(err => {
  process.stderr.write(`fluent-server: ${err && err.stack || err}\n`);
  process.exit(1);
});
