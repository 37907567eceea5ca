/**
 * Operating a running `enbd mirror` through its control socket, with the real CLI against a
 * real daemon process whose legs are `nbdkit memory 64M`:
 * - `enbd status` (table and --json) before, during and after a leg failure and its resync
 *   (`leg fail 1` -> failed; `leg reconnect 1` -> resyncing -> in-sync), with `resync pause`,
 *   `resync resume` and `resync rate` on the way; then both legs compared byte for byte;
 * - `leg add` of an empty nbdkit leg ends in sync and identical; `leg remove`; the refusals
 *   (last in-sync leg, too small a leg, no such leg);
 * - `resync rate` parsing and validation, `log-level`.
 * Threads: test process main thread; the daemon, nbdkit and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { ControlClient } from '../../src/control/client.js';
import type { ControlEvent, StatusResult } from '../../src/control/protocol.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { scratch, startNbdkit, unixUri, waitFor, type Child, type Scratch } from '../helpers/tools.js';
import { run, skipUnlessTools } from '../helpers/serve.js';
import { assertSameBytes, enbdCli, startMirror, stopAllMirrors, type MirrorProcess } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;
const kLegBytes = 64 * kMiB;
const kReadPieceBytes = 4 * kMiB;

interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

describe('enbd control: status and leg/resync commands against a running mirror', { skip: skipUnlessTools('nbdkit') }, () => {
  let dir: Scratch;
  const children: Child[] = [];
  let seq = 0;

  before(() => {
    dir = scratch('enbd-ctl-legs-');
  });

  after(async () => {
    await stopAllMirrors();
    await Promise.all(children.map(async (child) => await child.stop('SIGKILL')));
    dir?.cleanup();
  });

  async function memoryLeg(sizeBytes = kLegBytes): Promise<{ socket: string; uri: string }> {
    seq += 1;
    const socket = dir.path(`leg${seq}.sock`);
    children.push(await startNbdkit(socket, ['memory', String(sizeBytes)]));
    return { socket, uri: unixUri(socket) };
  }

  async function mirrorOf(legs: string[], extra: string[] = []): Promise<{ mirror: MirrorProcess; control: string }> {
    seq += 1;
    const control = dir.path(`m${seq}.ctl`);
    const mirror = await startMirror({
      legs,
      socketPath: dir.path(`m${seq}.sock`),
      args: ['--control', control, '--reconnect-min', '50', '--reconnect-max', '500', ...extra],
    });
    return { mirror, control };
  }

  async function cli(control: string, args: string[]): Promise<CliResult> {
    return await run(process.execPath, [enbdCli, ...args, '--control', control], { timeoutMs: 60_000 });
  }

  async function cliOk(control: string, args: string[]): Promise<string> {
    const result = await cli(control, args);
    // `enbd status` exits 1 (degraded/resyncing) or 2 (no in-sync leg) when it did its job
    const ok = args[0] === 'status' ? [0, 1, 2] : [0];
    assert.ok(ok.includes(result.status ?? -1), `enbd ${args.join(' ')} exits ${ok.join(' or ')}, got ${String(result.status)}:\n${result.stdout}\n${result.stderr}`);
    assert.equal(result.stderr, '', `enbd ${args.join(' ')} writes nothing to stderr`);
    return result.stdout;
  }

  async function status(control: string): Promise<StatusResult> {
    return JSON.parse(await cliOk(control, ['status', '--json'])) as StatusResult;
  }

  async function waitLegState(control: string, leg: number, state: string, timeoutMs = 60_000): Promise<StatusResult> {
    let last: StatusResult;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      last = await status(control);
      if (last.legs.find((view) => view.index === leg)?.state === state) return last;
      if (Date.now() > deadline) assert.fail(`leg ${leg} did not reach ${state}: ${JSON.stringify(last.legs)}`);
      await sleep(200);
    }
  }

  async function readWhole(uri: string): Promise<Buffer> {
    const client = await NbdClient.connect(uri);
    try {
      const whole = Buffer.alloc(kLegBytes);
      for (let at = 0; at < kLegBytes; at += kReadPieceBytes) (await client.read(at, kReadPieceBytes)).copy(whole, at);
      return whole;
    } finally {
      await client.close();
    }
  }

  /** Writes `count` random blocks of 1 MiB from `offsetBytes` on, and mirrors them in `model`. */
  async function writeBlocks(client: NbdClient, model: Buffer, offsetBytes: number, count: number): Promise<void> {
    for (let index = 0; index < count; index += 1) {
      const data = randomBytes(kMiB);
      data.copy(model, offsetBytes + index * kMiB);
      await client.write(offsetBytes + index * kMiB, data);
    }
    await client.flush();
  }

  test('status before, during and after a leg failure and its resync; the legs end identical', async () => {
    const legs = [await memoryLeg(), await memoryLeg()];
    const { mirror, control } = await mirrorOf(legs.map((leg) => leg.uri), ['--resync-rate-min', '1M', '--resync-rate-max', '2M']);
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    const watcher = await ControlClient.connect(control);
    const events: ControlEvent[] = [];
    await watcher.subscribe((event) => events.push(event));
    try {
      // ---- before: both legs in sync
      let view = await status(control);
      assert.equal(view.export.sizeBytes, kLegBytes);
      assert.equal(view.export.name, '');
      assert.equal(view.export.clients, 1, 'our NbdClient is counted');
      assert.equal(view.daemon.control, control);
      assert.deepStrictEqual(view.legs.map((leg) => [leg.index, leg.state, leg.dirtyBytes, leg.resync]), [[0, 'in-sync', 0, null], [1, 'in-sync', 0, null]]);
      assert.deepStrictEqual(view.legs.map((leg) => leg.uri), legs.map((leg) => leg.uri));
      assert.deepStrictEqual(view.resync, { paused: false, minBytesPerSecond: kMiB, maxBytesPerSecond: 2 * kMiB });
      await writeBlocks(client, model, 0, 4);
      view = await status(control);
      for (const leg of view.legs) {
        assert.ok(leg.latencyMeanMs !== null && leg.latencyMeanMs > 0, `leg ${leg.index} has a mean latency: ${leg.latencyMeanMs}`);
        assert.ok((leg.requests ?? 0) >= 4, `leg ${leg.index} counted its requests`);
        assert.equal(leg.inFlight, 0);
      }
      assert.ok((view.latency['write']?.count ?? 0) >= 4, 'write latency counted');
      assert.ok((view.latency['write']?.meanMs ?? 0) > 0, 'write latency mean');
      const table = await cliOk(control, ['status']);
      assert.match(table, /^export "": 64\.0 MiB \(67108864 bytes\), 1 client/m);
      assert.match(table, /^a\s+in-sync\s+0\s+[\d.]+ ms\s+0 B\s+nbd\+unix/m);
      assert.match(table, /^b\s+in-sync\s+0\s+[\d.]+ ms\s+0 B\s+nbd\+unix/m);

      // ---- during the failure: leg 1 out, writes marked on its dirty map
      assert.equal(await cliOk(control, ['leg', 'fail', '1']), 'leg b: failed\n');
      view = await status(control);
      assert.equal(view.legs[1]?.state, 'failed');
      assert.match(view.legs[1]?.failureReason ?? '', /operator/);
      await writeBlocks(client, model, 8 * kMiB, 16);
      view = await status(control);
      assert.equal(view.legs[0]?.state, 'in-sync');
      assert.ok((view.legs[1]?.dirtyBytes ?? 0) >= 16 * kMiB, `leg 1 dirty bytes ${view.legs[1]?.dirtyBytes}`);
      assert.match(await cliOk(control, ['status']), /^b\s+failed\s+.*\n\s+reason: failed by the operator/m);

      // ---- reconnect: a rate-limited resync we can watch, pause and resume
      assert.equal(await cliOk(control, ['leg', 'reconnect', '1']), 'leg b: resyncing\n');
      view = await status(control);
      assert.equal(view.legs[1]?.state, 'resyncing');
      const progress = view.legs[1]?.resync;
      assert.ok(progress !== null && progress !== undefined, 'a resyncing leg reports progress');
      assert.ok(progress.bytesTotal >= 16 * kMiB && progress.bytesLeft > 0, JSON.stringify(progress));
      assert.match(await cliOk(control, ['status']), /^\s+resync [\d.]+% [\d.]+ MiB of [\d.]+ MiB left, .*\/s, ETA /m);
      assert.equal(await cliOk(control, ['resync', 'pause']), 'resync paused\n');
      // Copies already started (in flight or waiting for rate tokens: at most 4 lanes of 1 MiB)
      // still finish; then the dirty bytes hold still.
      let pausedAt = (await status(control)).legs[1]?.dirtyBytes ?? -1;
      const settleBy = Date.now() + 8000;
      for (;;) {
        await sleep(700);
        const now = (await status(control)).legs[1]?.dirtyBytes ?? -1;
        if (now === pausedAt || Date.now() > settleBy) break;
        pausedAt = now;
      }
      await sleep(1000);
      view = await status(control);
      assert.equal(view.legs[1]?.dirtyBytes, pausedAt, 'no progress while paused');
      assert.ok(pausedAt > 0, 'the resync was paused before it finished');
      assert.equal(view.resync.paused, true);
      assert.equal(view.legs[1]?.resync?.paused, true);
      assert.equal(view.legs[1]?.state, 'resyncing');
      assert.equal(await cliOk(control, ['resync', 'resume']), 'resync resumed\n');
      assert.equal(await cliOk(control, ['resync', 'rate', '--max', '0']), 'resync rate: floor 1.0 MiB/s, ceiling unlimited\n');

      // ---- after: in sync again, nothing dirty, both legs identical
      view = await waitLegState(control, 1, 'in-sync');
      assert.equal(view.legs[1]?.dirtyBytes, 0);
      assert.equal(view.legs[1]?.resync, null);
      assert.equal(view.resync.paused, false);
      const watched = (await cliOk(control, ['status', '--watch', '--json', '--count', '2', '--interval', '200'])).trim().split('\n');
      assert.equal(watched.length, 2, 'status --watch --json --count 2 prints two objects');
      for (const line of watched) assert.deepStrictEqual((JSON.parse(line) as StatusResult).legs.map((leg) => leg.state), ['in-sync', 'in-sync']);
      const leg0 = await readWhole(legs[0]?.uri ?? '');
      const leg1 = await readWhole(legs[1]?.uri ?? '');
      assertSameBytes(leg1, leg0, 'leg 1 vs leg 0 after the resync');
      assertSameBytes(leg0, model, 'legs vs what the client wrote');

      // ---- what a subscriber heard on the way
      const states = events.filter((event) => event.event === 'leg-state').map((event) => (event.data as { leg: number; state: string }));
      const leg1States = states.filter((event) => event.leg === 1).map((event) => event.state);
      // Failed by hand; reconnect: fenced first, then reconnect, probation, resync, in sync.
      assert.deepStrictEqual(leg1States.filter((state) => state !== 'reconnecting'), ['failed', 'fencing', 'degraded', 'probation', 'resyncing', 'in-sync'], `leg 1 state events: ${leg1States.join()}`);
      const ticks = events.filter((event) => event.event === 'resync-progress').map((event) => event.data as { leg: number; bytesLeft: number });
      assert.ok(ticks.length >= 2, `resync-progress events about once a second (${ticks.length})`);
      assert.ok(ticks.every((event) => event.leg === 1));
    } finally {
      watcher.close();
      await client.close();
    }
    assert.ok(mirror.alive(), 'the daemon is still running');
    assert.equal(await mirror.stop(), 0, `mirror exits 0:\n${mirror.stderr()}`);
  });

  test('leg add of an empty leg ends in sync and identical; leg remove; the refusals', async () => {
    const legs = [await memoryLeg(), await memoryLeg()];
    const { mirror, control } = await mirrorOf(legs.map((leg) => leg.uri));
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      await writeBlocks(client, model, 0, 3);
      await writeBlocks(client, model, 40 * kMiB, 5);
      const added = await memoryLeg();
      assert.equal(await cliOk(control, ['leg', 'add', added.uri]), 'leg c added: resyncing (full resync from an in-sync leg)\n');
      let view = await waitLegState(control, 2, 'in-sync');
      assert.deepStrictEqual(view.legs.map((leg) => leg.state), ['in-sync', 'in-sync', 'in-sync']);
      assert.equal(view.legs[2]?.uri, added.uri);
      assertSameBytes(await readWhole(added.uri), await readWhole(legs[0]?.uri ?? ''), 'added leg vs leg 0');
      assertSameBytes(await readWhole(added.uri), model, 'added leg vs what the client wrote');

      const again = await cli(control, ['leg', 'add', added.uri]);
      assert.equal(again.status, 1);
      assert.match(again.stderr, /^enbd: error: .* is already a leg\n$/);
      const small = await memoryLeg(32 * kMiB);
      const tooSmall = await cli(control, ['leg', 'add', small.uri]);
      assert.equal(tooSmall.status, 1);
      assert.match(tooSmall.stderr, /^enbd: error: cannot add leg .*: it has 33554432 bytes, fewer than the export's 67108864\n$/);

      assert.equal(await cliOk(control, ['leg', 'remove', '2']), 'leg c removed\n');
      view = await status(control);
      assert.deepStrictEqual(view.legs.map((leg) => leg.index), [0, 1], 'a removed leg is no longer listed');

      assert.equal(await cliOk(control, ['leg', 'fail', '1']), 'leg b: failed\n');
      const removeLast = await cli(control, ['leg', 'remove', '0']);
      assert.equal(removeLast.status, 1, 'removing the last in-sync leg is refused');
      assert.equal(removeLast.stderr, 'enbd: error: leg a is the last in-sync leg; refusing to remove it\n');
      const failLast = await cli(control, ['leg', 'fail', '0']);
      assert.equal(failLast.status, 1);
      assert.equal(failLast.stderr, 'enbd: error: leg a is the last in-sync leg; refusing to fail it\n');
      const noLeg = await cli(control, ['leg', 'fail', '9']);
      assert.equal(noLeg.status, 1);
      assert.match(noLeg.stderr, /^enbd: error: no leg 9/);
      const badIndex = await cli(control, ['leg', 'fail', 'one']);
      assert.equal(badIndex.status, 1);
      assert.match(badIndex.stderr, /^enbd: error: no leg "one" \(legs: a, b; a name, an index or a leg.s URI\)\n$/);
      assert.match(await cliOk(control, ['leg', 'reconnect', '1']), /^leg b: (resyncing|in-sync)\n$/);
      await waitLegState(control, 1, 'in-sync');
      assert.deepStrictEqual((await readNbdRange(mirror.uri, 40 * kMiB, kMiB)).equals(model.subarray(40 * kMiB, 41 * kMiB)), true, 'reads still work');
    } finally {
      await client.close();
    }
    assert.equal(await mirror.stop(), 0, `mirror exits 0:\n${mirror.stderr()}`);
  });

  async function readNbdRange(uri: string, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const reader = await NbdClient.connect(uri);
    try {
      return await reader.read(offsetBytes, lengthBytes);
    } finally {
      await reader.close();
    }
  }

  test('resync rate, pause/resume and log-level are accepted and validated', async () => {
    const legs = [await memoryLeg(), await memoryLeg()];
    const { mirror, control } = await mirrorOf(legs.map((leg) => leg.uri));
    assert.equal(await cliOk(control, ['resync', 'rate']), 'resync rate: floor 32.0 MiB/s, ceiling unlimited\n');
    assert.equal(await cliOk(control, ['resync', 'rate', '--min', '64M', '--max', '128M']), 'resync rate: floor 64.0 MiB/s, ceiling 128.0 MiB/s\n');
    let view = await status(control);
    assert.deepStrictEqual(view.resync, { paused: false, minBytesPerSecond: 64 * kMiB, maxBytesPerSecond: 128 * kMiB });
    const inverted = await cli(control, ['resync', 'rate', '--min', '8M', '--max', '1M']);
    assert.equal(inverted.status, 1);
    assert.match(inverted.stderr, /^enbd: error: resync rate max \(1048576 B\/s\) is below min \(8388608 B\/s\)/);
    const notASize = await cli(control, ['resync', 'rate', '--max', 'fast']);
    assert.equal(notASize.status, 2);
    assert.match(notASize.stderr, /^enbd: error: --max must be a size in bytes \(4096, 64K, 1G\), got fast\n/);
    assert.equal(await cliOk(control, ['resync', 'pause']), 'resync paused\n');
    assert.equal((await status(control)).resync.paused, true);
    assert.equal(await cliOk(control, ['resync', 'resume']), 'resync resumed\n');
    assert.equal((await status(control)).resync.paused, false);

    assert.equal(await cliOk(control, ['log-level', 'debug']), 'log level: debug (was warn)\n');
    view = await status(control);
    assert.equal(view.daemon.logLevel, 'debug');
    await waitFor('a debug line in the daemon log', () => mirror.stderr().includes('"level":20'), 10_000);
    assert.equal(await cliOk(control, ['log-level', 'warn']), 'log level: warn (was debug)\n');
    const loud = await cli(control, ['log-level', 'loud']);
    assert.equal(loud.status, 2, 'an unknown level is a usage error');
    assert.match(loud.stderr, /^enbd: error: <level> must be fatal, error, warn, info, debug, trace or silent, got loud$/m);
    assert.ok(mirror.alive());
    assert.equal(await mirror.stop(), 0, `mirror exits 0:\n${mirror.stderr()}`);
  });
});
