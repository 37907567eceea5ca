/**
 * Checkpoints across restarts (issue 17): a checkpoint created on a mirror with on-leg metadata
 * survives a clean restart with its exact map, and a SIGKILL of the daemon with every changed
 * block still listed (a superset is allowed, a missing block fails): writes whose write-intent
 * bits were already cleared must be in the stored map, writes just before the kill are
 * recovered from the write-intent bitmap. `enbd examine` of a stopped leg shows the stored
 * checkpoint (exact after a clean stop) and no section once it is removed. With --metadata
 * none, create says memory only.
 * Real daemon (the CLI), nbdkit file legs, the real `enbd checkpoint` commands.
 * Threads: test process main thread; nbdkit and the daemon are child processes.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { requires, scratch } from '../helpers/tools.js';
import { stopAllMirrors, startMirror } from '../helpers/mirror.js';
import { MetaLegs, createArray, enbd, enbdOk, startMetaMirror, writeFlush, type FileLeg, type MetaMirror } from '../helpers/meta-legs.js';
import { ControlClient } from '../../src/control/client.js';
import type { CheckpointListResult } from '../../src/control/protocol.js';

const kMiB = 1024 * 1024;
const kLegBytes = 64 * kMiB;
const dir = scratch('enbd-cbt-crash-');
const legs = new MetaLegs(dir, kLegBytes);

after(async () => {
  await stopAllMirrors();
  await legs.stopAll();
  dir.cleanup();
});

type Range = [number, number];

async function changedRuns(controlPath: string, name: string): Promise<Range[]> {
  const client = await ControlClient.connect(controlPath);
  try {
    const result = await client.call('checkpoint.runs', { name }, 10_000);
    return result.runs.map((run) => [run.offsetBytes, run.offsetBytes + run.lengthBytes]);
  } finally {
    client.close();
  }
}

function assertCovered(runs: Range[], wanted: Range[], what: string): void {
  for (const [start, end] of wanted) {
    let at = start;
    for (const [runStart, runEnd] of runs) if (runStart <= at && runEnd > at) at = Math.max(at, runEnd);
    assert.ok(at >= end, `${what}: changed range [${start}, ${end}) is not fully listed (covered up to ${at}); runs ${JSON.stringify(runs)}`);
  }
}

async function list(controlPath: string): Promise<CheckpointListResult> {
  return JSON.parse(await enbdOk('checkpoint', 'list', '--json', '--control', controlPath)) as CheckpointListResult;
}

async function waitBitmapClear(mirror: MetaMirror): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const status = await mirror.control.status();
    if (status.metadata?.dirtyChunks === 0) return;
    assert.ok(Date.now() < deadline, `the write-intent bitmap clears while all legs are in sync (still ${status.metadata?.dirtyChunks} chunks)`);
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

test('a checkpoint survives a clean restart exactly and a SIGKILL with every changed block', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const a = await legs.leg('a');
  const b = await legs.leg('b');
  const pair: FileLeg[] = [a, b];
  await createArray(pair);
  let mirror = await startMetaMirror(dir, pair, 'm1');
  const control = dir.path('mirror-m1.ctl');
  const created = await enbdOk('checkpoint', 'create', 'cp1', '--control', control);
  assert.match(created, /checkpoint cp1 created \(kept in the on-leg metadata\)/);
  const bad = await enbd('checkpoint', 'create', 'no:colon', '--control', control);
  assert.notEqual(bad.status, 0);
  assert.match(bad.stderr, /checkpoint name must be/);

  const early: Range[] = [[kMiB + 100 * 1024, kMiB + 104 * 1024], [20 * kMiB, 20 * kMiB + 256 * 1024]];
  for (const [start, end] of early) await writeFlush(mirror.mirror.uri, start, randomBytes(end - start));
  // The bits of these writes are cleared lazily; from then on only the stored map holds them.
  await waitBitmapClear(mirror);
  const late: Range = [40 * kMiB + 4096, 40 * kMiB + 8192];
  await writeFlush(mirror.mirror.uri, late[0], randomBytes(late[1] - late[0]));
  const exact = await changedRuns(control, 'cp1');
  assertCovered(exact, [...early, late], 'before the crash');

  await mirror.stop('SIGKILL');
  mirror = await startMetaMirror(dir, pair, 'm1');
  const afterCrash = await changedRuns(control, 'cp1');
  assertCovered(afterCrash, [...early, late], 'after SIGKILL and restart');
  const listed = await list(control);
  assert.deepEqual(listed.checkpoints.map((view) => view.name), ['cp1']);
  assert.ok(listed.persistent);

  // More writes, then a clean stop: the map comes back as it was (nothing lost, nothing added).
  const more: Range = [50 * kMiB, 50 * kMiB + 65536];
  await writeFlush(mirror.mirror.uri, more[0], randomBytes(more[1] - more[0]));
  const beforeClean = await changedRuns(control, 'cp1');
  assert.equal(await mirror.stop('SIGTERM'), 0);
  // enbd examine shows the stored checkpoint (name, state, granularity, unit, changed bytes)
  const examined = JSON.parse(await enbdOk('examine', '--json', a.uri)) as { checkpoints: Array<{ name: string; createdMs: number; state: string; granularityBytes: number; unitBytes: number; changedBytes: number | null }> };
  const listedBytes = beforeClean.reduce((sum, [start, end]) => sum + end - start, 0);
  assert.deepEqual(examined.checkpoints.map(({ createdMs: _created, ...view }) => view), [{ name: 'cp1', state: 'active', granularityBytes: 65536, unitBytes: 65536, changedBytes: listedBytes }], 'examine --json: the stored checkpoint, exact after a clean stop');
  assert.ok((examined.checkpoints[0]?.createdMs ?? 0) > Date.now() - 600_000, 'examine --json: its creation time');
  assert.match(await enbdOk('examine', a.uri), /\n {5}Checkpoints : name .*\n {19}cp1 +active +64\.0 KiB +64\.0 KiB +/, 'examine: the checkpoint section');
  mirror = await startMetaMirror(dir, pair, 'm1');
  const afterClean = await changedRuns(control, 'cp1');
  assert.deepEqual(afterClean, beforeClean, 'a clean restart keeps the map exactly');
  assertCovered(afterClean, [...early, late, more], 'after a clean restart');
  await enbdOk('checkpoint', 'remove', 'cp1', '--control', control);
  assert.equal(await mirror.stop('SIGTERM'), 0);
  mirror = await startMetaMirror(dir, pair, 'm1');
  assert.deepEqual((await list(control)).checkpoints, [], 'a removed checkpoint stays removed');
  assert.equal(await mirror.stop('SIGTERM'), 0);
  assert.doesNotMatch(await enbdOk('examine', a.uri), /Checkpoints/, 'examine: no checkpoint section without checkpoints');
});

test('--metadata none: checkpoints live in memory and create says so', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const c = await legs.leg('c', [], 8 * kMiB);
  const controlPath = dir.path('none.ctl');
  const mirror = await startMirror({ legs: [c.uri], socketPath: dir.path('none.sock'), args: ['--control', controlPath, '--metadata', 'none'] });
  const out = await enbdOk('checkpoint', 'create', 'mem', '--control', controlPath);
  assert.match(out, /in memory only/);
  const listed = await list(controlPath);
  assert.equal(listed.persistent, false);
  const client = await ControlClient.connect(controlPath);
  try {
    for (let index = 1; index < 8; index += 1) assert.equal((await client.call('checkpoint.create', { name: `m${index}` })).persistent, false);
  } finally {
    client.close();
  }
  const ninth = await enbd('checkpoint', 'create', 'm9', '--control', controlPath);
  assert.notEqual(ninth.status, 0);
  assert.match(ninth.stderr, /at most 8 checkpoints/);
  await mirror.stop();
});
