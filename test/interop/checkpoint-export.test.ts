/**
 * Changed-block tracking over NBD (issue 17), real clients against a real daemon:
 * - nbdinfo --map=qemu:dirty-bitmap:NAME, nbdsh block_status with three contexts at once
 *   (base:allocation, the checkpoint, enbd:dirty:0; and REQ_ONE), and qemu-img map with
 *   x-dirty-bitmap all agree with a model of the WRITE / WRITE_ZEROES / TRIM requests sent
 *   since the checkpoint (64 KiB chunks); LIST_META_CONTEXT lists the contexts for `qemu:`,
 *   `qemu:dirty-bitmap:` and `enbd:` queries.
 * - An incremental backup chain with `enbd backup`: a full copy starting b1, writes (some of
 *   them racing the next backup), an increment starting b2, more writes, a second increment
 *   starting b3; full + both increments restored with `enbd backup-apply` equal the device at
 *   b3 byte for byte, and the increments hold only the changed extents.
 * Threads: test process main thread; the daemon and the tools are child processes.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { statSync, readFileSync } from 'node:fs';
import { requires, runOk, scratch, sparseFile } from '../helpers/tools.js';
import { readNbd, startMirror, stopAllMirrors, assertSameBytes } from '../helpers/mirror.js';
import { enbdOk } from '../helpers/meta-legs.js';
import { ControlClient } from '../../src/control/client.js';
import { NbdClient } from '../../src/nbd/client/client.js';

const kMiB = 1024 * 1024;
const kChunk = 64 * 1024;
const dir = scratch('enbd-cbt-export-');

after(async () => {
  await stopAllMirrors();
  dir.cleanup();
});

function fileLeg(name: string, sizeBytes: number): string {
  return `file://${sparseFile(dir.path(`${name}.img`), sizeBytes)}`;
}

/** Expected [start, end, dirty] runs over the device from a set of dirty chunk indexes. */
function modelRuns(dirty: Set<number>, sizeBytes: number): Array<[number, number, number]> {
  const runs: Array<[number, number, number]> = [];
  for (let chunk = 0; chunk * kChunk < sizeBytes; chunk += 1) {
    const flag = dirty.has(chunk) ? 1 : 0;
    const start = chunk * kChunk;
    const end = Math.min(sizeBytes, start + kChunk);
    const last = runs[runs.length - 1];
    if (last !== undefined && last[2] === flag && last[1] === start) last[1] = end;
    else runs.push([start, end, flag]);
  }
  return runs;
}

function markModel(dirty: Set<number>, offsetBytes: number, lengthBytes: number): void {
  for (let chunk = Math.floor(offsetBytes / kChunk); chunk * kChunk < offsetBytes + lengthBytes; chunk += 1) dirty.add(chunk);
}

async function withControl<T>(path: string, run: (client: ControlClient) => Promise<T>): Promise<T> {
  const client = await ControlClient.connect(path);
  try {
    return await run(client);
  } finally {
    client.close();
  }
}

test('nbdinfo, nbdsh and qemu-img read qemu:dirty-bitmap:NAME as the model of the writes says', async (t) => {
  if (!requires(t, 'nbdinfo', 'nbdsh', 'qemu-img')) return;
  const sizeBytes = 32 * kMiB;
  const socket = dir.path('m1.sock');
  const control = `${socket}.ctl`;
  const mirror = await startMirror({ legs: [fileLeg('a1', sizeBytes), fileLeg('b1', sizeBytes)], socketPath: socket, args: ['--control', control] });
  const uri = mirror.uri;
  const client = await NbdClient.connect(uri);
  await client.write(3 * kMiB, randomBytes(8192)); // before the checkpoint: not in it
  await withControl(control, async (c) => await c.call('checkpoint.create', { name: 'cp1' }));
  const dirty = new Set<number>();
  let seed = 12345;
  const next = (limit: number): number => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed % limit;
  };
  for (let index = 0; index < 40; index += 1) {
    const offset = next(sizeBytes / 4096 - 64) * 4096;
    const length = (1 + next(48)) * 4096;
    const kind = next(3);
    if (kind === 0) await client.write(offset, randomBytes(length));
    else if (kind === 1) await client.writeZeroes(offset, length);
    else await client.trim(offset, length);
    markModel(dirty, offset, length);
  }
  await client.flush();
  await client.disconnect();
  const expected = modelRuns(dirty, sizeBytes);

  const nbdinfo = await runOk('nbdinfo', ['--json', '--map=qemu:dirty-bitmap:cp1', uri]);
  const mapped = (JSON.parse(nbdinfo.stdout) as Array<{ offset: number; length: number; type: number }>).map((entry) => [entry.offset, entry.offset + entry.length, entry.type]);
  assert.deepEqual(mapped, expected, 'nbdinfo --map=qemu:dirty-bitmap:cp1');

  const listed = await runOk('nbdinfo', ['--list', uri]);
  for (const name of ['base:allocation', 'qemu:dirty-bitmap:cp1', 'enbd:dirty:0', 'enbd:dirty:1']) assert.match(listed.stdout, new RegExp(name), `nbdinfo lists ${name}`);

  const script = `
import json
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(${JSON.stringify(uri)})
found = {}
for query in ['qemu:', 'qemu:dirty-bitmap:', 'enbd:']:
    h.clear_meta_contexts(); h.add_meta_context(query)
    names = []
    h.opt_list_meta_context(lambda name: names.append(name))
    found[query] = names
h.clear_meta_contexts()
for name in ['base:allocation', 'qemu:dirty-bitmap:cp1', 'enbd:dirty:0']: h.add_meta_context(name)
h.opt_go()
out = {'list': found, 'full': {}, 'one': {}}
def keep(where):
    def cb(meta, offset, entries, err):
        where.setdefault(meta, []).append([offset, list(entries)])
        return 0
    return cb
at = 0
while at < ${sizeBytes}:
    before = out['full'].get('qemu:dirty-bitmap:cp1', [])
    h.block_status(${sizeBytes} - at, at, keep(out['full']))
    last = out['full']['qemu:dirty-bitmap:cp1'][-1]
    at = last[0] + sum(last[1][0::2])
h.block_status(1 << 20, ${expected[1]?.[0] ?? 0}, keep(out['one']), nbd.CMD_FLAG_REQ_ONE)
print(json.dumps(out))
`;
  const nbdsh = await runOk('nbdsh', ['-n', '-c', script], { timeoutMs: 60_000 });
  const parsed = JSON.parse(nbdsh.stdout) as { list: Record<string, string[]>; full: Record<string, Array<[number, number[]]>>; one: Record<string, Array<[number, number[]]>> };
  assert.deepEqual(parsed.list['qemu:'], ['qemu:dirty-bitmap:cp1']);
  assert.deepEqual(parsed.list['qemu:dirty-bitmap:'], ['qemu:dirty-bitmap:cp1']);
  assert.deepEqual(parsed.list['enbd:'], ['enbd:dirty:0', 'enbd:dirty:1']);
  const runsOf = (answers: Array<[number, number[]]>): Array<[number, number, number]> => {
    const runs: Array<[number, number, number]> = [];
    for (const [offset, entries] of answers) {
      let at = offset;
      for (let index = 0; index < entries.length; index += 2) {
        const length = entries[index] as number;
        const flag = entries[index + 1] as number;
        const last = runs[runs.length - 1];
        if (last !== undefined && last[2] === flag && last[1] === at) last[1] = at + length;
        else runs.push([at, at + length, flag]);
        at += length;
      }
    }
    return runs;
  };
  assert.deepEqual(runsOf(parsed.full['qemu:dirty-bitmap:cp1'] ?? []), expected, 'nbdsh block_status, several contexts');
  assert.deepEqual(runsOf(parsed.full['enbd:dirty:0'] ?? []), [[0, sizeBytes, 0]], 'enbd:dirty:0: the leg is in sync');
  assert.ok((parsed.full['base:allocation'] ?? []).length > 0, 'base:allocation answered alongside');
  for (const [name, answers] of Object.entries(parsed.one)) {
    assert.equal(answers.length, 1, `${name}: one chunk with REQ_ONE`);
    const entries = answers[0]?.[1] ?? [];
    assert.equal(entries.length, 2, `${name}: exactly one extent with REQ_ONE`);
    assert.ok((entries[0] ?? 0) <= kMiB, `${name}: the extent is not longer than the request`);
  }
  const second = expected[1];
  assert.ok(second !== undefined);
  assert.deepEqual(parsed.one['qemu:dirty-bitmap:cp1']?.[0]?.[1], [Math.min(kMiB, second[1] - second[0]), second[2]]);

  const qemu = await runOk('qemu-img', ['map', '--output=json', '--image-opts', `driver=nbd,server.type=unix,server.path=${socket},x-dirty-bitmap=qemu:dirty-bitmap:cp1`], { timeoutMs: 60_000 });
  // With x-dirty-bitmap, qemu reports changed extents as not data (a hole) and the rest as data.
  const qemuRuns = (JSON.parse(qemu.stdout) as Array<{ start: number; length: number; data: boolean }>).map((entry) => [entry.start, entry.start + entry.length, entry.data ? 0 : 1]);
  assert.deepEqual(qemuRuns, expected, 'qemu-img map x-dirty-bitmap');
  await mirror.stop();
});

test('an incremental backup chain restores the device at the last checkpoint byte for byte', async () => {
  const sizeBytes = 32 * kMiB;
  const socket = dir.path('m2.sock');
  const control = `${socket}.ctl`;
  const mirror = await startMirror({ legs: [fileLeg('a2', sizeBytes), fileLeg('b2', sizeBytes)], socketPath: socket, args: ['--control', control] });
  const client = await NbdClient.connect(mirror.uri);
  for (let at = 0; at < sizeBytes; at += 4 * kMiB) await client.write(at, randomBytes(kMiB));
  const full = dir.path('full.img');
  const inc1 = dir.path('inc1.img');
  const inc2 = dir.path('inc2.img');
  const out = await enbdOk('backup', '--to', full, '--new-checkpoint', 'b1', '--control', control);
  assert.match(out, /full copy/);
  await client.write(5 * kMiB, randomBytes(100 * 1024));
  await client.writeZeroes(9 * kMiB, 300 * 1024);
  // Writes racing the freeze of b1: each lands in b1's increment or in b2's, never neither.
  let racing = true;
  const racer = (async () => {
    let offset = 12 * kMiB;
    while (racing) {
      await client.write(offset, randomBytes(4096));
      offset = offset >= 16 * kMiB ? 12 * kMiB : offset + 68 * 1024;
    }
  })();
  await enbdOk('backup', '--since', 'b1', '--to', inc1, '--new-checkpoint', 'b2', '--control', control);
  racing = false;
  await racer;
  await client.trim(25 * kMiB, 128 * 1024);
  await client.write(31 * kMiB, randomBytes(kMiB));
  await client.flush();
  await enbdOk('backup', '--since', 'b2', '--to', inc2, '--new-checkpoint', 'b3', '--control', control);
  const device = await readNbd(mirror.uri, 0, sizeBytes);
  await client.disconnect();

  const manifest1 = JSON.parse(readFileSync(`${inc1}.json`, 'utf8')) as { changedBytes: number; since: string; checkpoint: string };
  assert.equal(manifest1.since, 'b1');
  assert.equal(manifest1.checkpoint, 'b2');
  assert.ok(manifest1.changedBytes > 0 && manifest1.changedBytes < sizeBytes / 4, `increment 1 holds only changed extents (${manifest1.changedBytes} bytes)`);
  assert.ok(statSync(inc2).blocks * 512 < sizeBytes / 2, 'increment 2 is sparse');
  const listed = await withControl(control, async (c) => await c.call('checkpoint.list'));
  assert.deepEqual(listed.checkpoints.map((view) => view.name), ['b3'], 'the backed-up checkpoints are removed');

  const restored = dir.path('restored.img');
  for (const backup of [full, inc1, inc2]) await enbdOk('backup-apply', backup, restored);
  assertSameBytes(readFileSync(restored), device, 'full + increments vs the device at b3');
  await mirror.stop();
});
