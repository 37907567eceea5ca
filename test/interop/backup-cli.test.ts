/**
 * `enbd backup` through the lean command tree (src/cli/backup-command.ts, main.ts):
 * - usage errors are the full tree's: `enbd: error: ...`, the help hint, exit 2; `enbd backup
 *   --help` prints what `enbd help backup` (the full tree) prints;
 * - the modules loaded (a `load` hook given with --import logs every URL): the lean tree loads
 *   none of the engine, the metadata code, the NBD server or pino, and a client command of the
 *   full tree (`enbd status`) loads no engine or pino either (serve/mirror are imported when run);
 * - against a running mirror: FILE.json lists exactly the 64 KiB chunks changed since the
 *   checkpoint (WRITE, WRITE_ZEROES, TRIM, an unaligned write across two chunks), FILE holds
 *   the device's bytes there and zeros (holes) elsewhere, `--timings` reports one read per
 *   extent and the changed bytes, the frozen checkpoint is gone and the new one listed; a full
 *   backup without --new-checkpoint, and one with an unknown --since, are refused (exit 1)
 *   before anything changes (an earlier FILE of the same name stays as it was).
 * Threads: test process main thread; the daemon and the CLI are child processes.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { scratch, enbdMain, run, sparseFile } from '../helpers/tools.js';
import { readNbd, startMirror, stopAllMirrors, assertSameBytes } from '../helpers/mirror.js';
import { enbd, enbdOk } from '../helpers/meta-legs.js';
import { NbdClient } from '../../src/nbd/client/client.js';

const kMiB = 1024 * 1024;
const kChunk = 64 * 1024;
const dir = scratch('enbd-backup-cli-');

after(async () => {
  await stopAllMirrors();
  dir.cleanup();
});

function fileLeg(name: string, sizeBytes: number): string {
  return `file://${sparseFile(dir.path(`${name}.img`), sizeBytes)}`;
}

test('the lean backup tree prints the full tree\'s usage errors (exit 2) and help', async () => {
  const missing = await enbd('backup');
  assert.equal(missing.status, 2, missing.stderr);
  assert.equal(missing.stderr, 'enbd: error: required option \'--to <file>\' not specified\n(run with --help for usage)\n');
  const unknown = await enbd('backup', '--to', dir.path('x.img'), '--frobnicate');
  assert.equal(unknown.status, 2, unknown.stderr);
  assert.match(unknown.stderr, /^enbd: error: unknown option '--frobnicate'\n\(run with --help for usage\)\n$/);
  const apply = await enbd('backup-apply', dir.path('only-one.img'));
  assert.equal(apply.status, 2, apply.stderr);
  assert.match(apply.stderr, /^enbd: error: missing required argument 'image'/);
  const lean = await enbd('backup', '--help');
  const full = await enbd('help', 'backup');
  assert.equal(lean.status, 0);
  assert.equal(full.status, 0);
  assert.match(lean.stdout, /^Usage: enbd backup \[options\]/);
  assert.equal(lean.stdout, full.stdout, 'enbd backup --help (lean tree) = enbd help backup (full tree)');
  const leanApply = await enbd('backup-apply', '--help');
  const fullApply = await enbd('help', 'backup-apply');
  assert.equal(leanApply.stdout, fullApply.stdout);
  const unreachable = await enbd('backup', '--since', 'b1', '--to', dir.path('y.img'), '--control', dir.path('nothing.ctl'));
  assert.equal(unreachable.status, 1, 'a runtime error exits 1');
  assert.match(unreachable.stderr, /^enbd: error: .*nothing\.ctl/);
});

/** The URLs of the modules `enbd ARGS` loads (a `load` hook registered with --import). */
async function loadedModules(name: string, args: string[]): Promise<string[]> {
  const log = dir.path(`${name}.modules`);
  writeFileSync(log, '');
  const hooks = dir.path(`${name}-hooks.mjs`);
  writeFileSync(hooks, `import { appendFileSync } from 'node:fs';\nexport async function load(url, context, next) {\n  appendFileSync(${JSON.stringify(log)}, url + '\\n');\n  return await next(url, context);\n}\n`);
  const register = dir.path(`${name}-register.mjs`);
  writeFileSync(register, `import { register } from 'node:module';\nregister(${JSON.stringify(`file://${hooks}`)});\n`);
  const result = await run(process.execPath, ['--import', `file://${register}`, enbdMain, ...args], { timeoutMs: 30_000 });
  assert.notEqual(result.status, null, 'the CLI ended');
  return readFileSync(log, 'utf8').split('\n').filter((line) => line !== '');
}

test('the lean tree loads no engine, metadata, NBD server or pino; enbd status loads no engine or pino', async () => {
  const heavy = /\/src\/(engine|meta|nbd\/server|stubs|metrics)\/|\/node_modules\/(pino|piscina|prom-client|comlink|yaml)\//;
  const lean = await loadedModules('lean', ['backup']);
  const ours = lean.filter((url) => url.includes('/dist/src/'));
  assert.ok(ours.some((url) => url.endsWith('/src/cli/backup-command.js')), `the hook saw the lean tree:\n${lean.join('\n')}`);
  assert.deepEqual(lean.filter((url) => heavy.test(url)), [], 'nothing heavy in the lean tree');
  assert.ok(ours.length <= 16, `few of our modules before the command runs (${ours.length}):\n${ours.join('\n')}`);
  const status = await loadedModules('status', ['status', '--control', dir.path('nothing.ctl')]);
  assert.ok(status.some((url) => url.endsWith('/src/cli/control.js')), 'the full tree was built');
  assert.deepEqual(status.filter((url) => /\/src\/engine\/mirror\.js$|\/node_modules\/pino\//.test(url)), [], 'enbd status loads no engine and no pino');
});

test('an incremental backup holds exactly the changed chunks, byte for byte, and says what it did', async () => {
  const sizeBytes = 16 * kMiB;
  const socket = dir.path('m.sock');
  const control = `${socket}.ctl`;
  const mirror = await startMirror({ legs: [fileLeg('a', sizeBytes), fileLeg('b', sizeBytes)], socketPath: socket, args: ['--control', control] });
  const client = await NbdClient.connect(mirror.uri);
  try {
    for (let at = 0; at < sizeBytes; at += 2 * kMiB) await client.write(at, randomBytes(kMiB));
    await enbdOk('checkpoint', 'create', 'b1', '--control', control);
    const changed = new Set<number>();
    const mark = (offsetBytes: number, lengthBytes: number): void => {
      for (let chunk = Math.floor(offsetBytes / kChunk); chunk * kChunk < offsetBytes + lengthBytes; chunk += 1) changed.add(chunk);
    };
    const writes: Array<[number, number]> = [[3 * kChunk + 512, 4096], [10 * kChunk - 1024, 2048], [40 * kChunk, 3 * kChunk], [200 * kChunk + 4096, 8192]];
    for (const [offsetBytes, lengthBytes] of writes) {
      await client.write(offsetBytes, randomBytes(lengthBytes));
      mark(offsetBytes, lengthBytes);
    }
    await client.writeZeroes(100 * kChunk, 2 * kChunk);
    mark(100 * kChunk, 2 * kChunk);
    await client.trim(150 * kChunk, kChunk);
    mark(150 * kChunk, kChunk);
    await client.flush();

    const refused = await enbd('backup', '--to', dir.path('refused.img'), '--control', control);
    assert.equal(refused.status, 1, refused.stderr);
    assert.match(refused.stderr, /needs --new-checkpoint/);
    assert.ok(!existsSync(dir.path('refused.img')), 'a refused backup creates no file');

    const inc = dir.path('inc.img');
    const result = await enbd('backup', '--since', 'b1', '--to', inc, '--new-checkpoint', 'b2', '--control', control, '--timings');
    assert.equal(result.status, 0, result.stderr);
    assert.match(result.stdout, /^backup .*inc\.img: .* in \d+ extent\(s\) changed since b1; checkpoint b2 started\n$/);
    const device = await readNbd(mirror.uri, 0, sizeBytes);

    const chunks = [...changed].sort((a, b) => a - b);
    const expected: Array<{ offsetBytes: number; lengthBytes: number }> = [];
    for (const chunk of chunks) {
      const last = expected[expected.length - 1];
      if (last !== undefined && last.offsetBytes + last.lengthBytes === chunk * kChunk) last.lengthBytes += kChunk;
      else expected.push({ offsetBytes: chunk * kChunk, lengthBytes: kChunk });
    }
    const manifest = JSON.parse(readFileSync(`${inc}.json`, 'utf8')) as { since: string; checkpoint: string; sizeBytes: number; changedBytes: number; extents: Array<{ offsetBytes: number; lengthBytes: number }> };
    assert.deepEqual(manifest.extents, expected, 'the manifest lists exactly the changed 64 KiB chunks, merged');
    assert.equal(manifest.changedBytes, chunks.length * kChunk);
    assert.equal(manifest.sizeBytes, sizeBytes);
    assert.equal(statSync(inc).size, sizeBytes, 'FILE has the device size');
    const image = Buffer.alloc(sizeBytes);
    for (const extent of expected) device.copy(image, extent.offsetBytes, extent.offsetBytes, extent.offsetBytes + extent.lengthBytes);
    assertSameBytes(readFileSync(inc), image, 'FILE: the device at the changed extents, zeros elsewhere');

    const timings = /^enbd backup: timings \(ms since the process started\): node \d+, start \d+, status \d+, freeze \d+, runs \d+, connect \d+, copy \d+, sync \d+, remove \d+; (\d+) reads, (\d+) writes, (\d+) bytes, (\d+) in flight\n$/.exec(result.stderr);
    assert.ok(timings !== null, `a --timings line:\n${result.stderr}`);
    assert.equal(Number(timings[1]), expected.length, 'one read per extent (all shorter than a piece)');
    assert.ok(Number(timings[2]) >= expected.length, 'at least one write per extent');
    assert.equal(Number(timings[3]), manifest.changedBytes, 'every changed byte copied once');

    // a refused step (an unknown --since) leaves an earlier FILE of the same name as it was
    const before = readFileSync(inc);
    const unknown = await enbd('backup', '--since', 'nosuch', '--to', inc, '--new-checkpoint', 'b9', '--control', control);
    assert.equal(unknown.status, 1, unknown.stderr);
    assert.match(unknown.stderr, /^enbd: error: .*nosuch/);
    assertSameBytes(readFileSync(inc), before, 'FILE untouched by a refused backup');
    assert.deepEqual(JSON.parse(readFileSync(`${inc}.json`, 'utf8')), manifest, 'FILE.json untouched');

    const listed = await enbdOk('checkpoint', 'list', '--json', '--control', control);
    assert.deepEqual((JSON.parse(listed) as { checkpoints: Array<{ name: string; state: string }> }).checkpoints.map((view) => [view.name, view.state]), [['b2', 'active']], 'b1 removed after the backup, b2 active');
  } finally {
    await client.disconnect();
    await mirror.stop();
  }
});
