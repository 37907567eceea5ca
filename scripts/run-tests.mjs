#!/usr/bin/env node
// Runs the compiled node:test suites (dist/test). `node scripts/run-tests.mjs [unit|interop|fuzz ...]`
// picks folders; default is all. Concurrency 2 matches the CI machine (2 cores).
import { spawnSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';

const root = 'dist/test';

// The interop suites drive real NBD programs. On a fresh Debian machine (as root) install them
// first; elsewhere say loudly what is missing (tests then skip loudly, and fail under CI).
const tools = ['nbdkit', 'nbdinfo', 'nbdsh', 'nbdcopy', 'qemu-io', 'qemu-img', 'qemu-nbd', 'fio', 'tmux'];
const env = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH ?? ''}` };
const missing = tools.filter((tool) => spawnSync('sh', ['-c', `command -v ${tool}`], { env }).status !== 0);
if (missing.length > 0) {
  const canInstall = process.getuid?.() === 0 && spawnSync('sh', ['-c', 'command -v apt-get']).status === 0;
  if (canInstall && process.env.ENBD_NO_INSTALL !== '1') {
    console.error(`run-tests: installing missing NBD tools (${missing.join(', ')}) with apt-get`);
    const installed = spawnSync('bash', ['scripts/install-tools.sh'], { stdio: 'inherit' });
    if (installed.status !== 0) process.exit(installed.status ?? 1);
  } else {
    console.error(`run-tests: WARNING missing NBD tools: ${missing.join(', ')}; run scripts/install-tools.sh as root`);
  }
}
const folders = process.argv.slice(2);
const wanted = folders.length > 0 ? folders : ['unit', 'fuzz', 'interop'];
const files = [];
function walk(dir) {
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) walk(path);
    else if (name.endsWith('.test.js')) files.push(path);
  }
}
for (const folder of wanted) {
  try { walk(join(root, folder)); } catch { console.error(`no compiled tests in ${join(root, folder)}`); process.exit(1); }
}
if (files.length === 0) { console.error('no test files found'); process.exit(1); }
const args = ['--test', '--test-concurrency=2', '--test-timeout=300000', ...files];
const result = spawnSync(process.execPath, args, { stdio: 'inherit' });
process.exit(result.status ?? 1);
