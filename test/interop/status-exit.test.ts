/**
 * Issue 12: `enbd status` and `enbd wait` exit codes, like `mdadm --detail --test`, against a
 * real `enbd mirror` process on two `nbdkit memory` legs, in each state of the array:
 *   every leg in sync -> 0; a leg failed or resyncing -> 1; no in-sync leg -> 2; no daemon
 *   (never started, stopped, stale socket) -> 4; the same with --json. `enbd wait` returns 0
 *   once a paused resync is resumed and finishes, 1 when --timeout passes first, 4 when the
 *   daemon goes away while it waits.
 * Threads: test process main thread; the daemon, nbdkit and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { StatusResult } from '../../src/control/protocol.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { scratch, startNbdkit, toolEnv, unixUri, type Child, type Scratch } from '../helpers/tools.js';
import { run, skipUnlessTools } from '../helpers/serve.js';
import { enbdCli, startMirror, stopAllMirrors, type MirrorProcess } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;
const kLegBytes = 32 * kMiB;

interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

describe('enbd status / enbd wait exit codes', { skip: skipUnlessTools('nbdkit', 'python3') }, () => {
  let dir: Scratch;
  const legs: Child[] = [];
  let seq = 0;

  before(() => {
    dir = scratch('enbd-status-exit-');
  });

  after(async () => {
    await stopAllMirrors();
    await Promise.all(legs.map(async (child) => await child.stop('SIGKILL')));
    dir?.cleanup();
  });

  async function memoryLeg(): Promise<{ child: Child; uri: string }> {
    seq += 1;
    const socket = dir.path(`leg${seq}.sock`);
    const child = await startNbdkit(socket, ['memory', String(kLegBytes)]);
    legs.push(child);
    return { child, uri: unixUri(socket) };
  }

  async function mirrorOf(legUris: string[]): Promise<{ mirror: MirrorProcess; control: string }> {
    seq += 1;
    const control = dir.path(`m${seq}.ctl`);
    const mirror = await startMirror({
      legs: legUris,
      socketPath: dir.path(`m${seq}.sock`),
      args: ['--control', control, '--reconnect-min', '50', '--reconnect-max', '200', '--leg-timeout', '2000', '--idle-probe', '200'],
    });
    return { mirror, control };
  }

  async function cli(control: string, args: string[]): Promise<CliResult> {
    return await run(process.execPath, [enbdCli, ...args, '--control', control], { timeoutMs: 90_000 });
  }

  async function statusJson(control: string): Promise<{ code: number | null; status: StatusResult }> {
    const result = await cli(control, ['status', '--json']);
    return { code: result.status, status: JSON.parse(result.stdout) as StatusResult };
  }

  async function waitUntil(control: string, what: string, predicate: (status: StatusResult) => boolean, timeoutMs = 30_000): Promise<StatusResult> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const { status } = await statusJson(control);
      if (predicate(status)) return status;
      if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}: ${JSON.stringify(status.legs.map((leg) => leg.state))}`);
      await sleep(100);
    }
  }

  function assertCode(result: CliResult, code: number, what: string): void {
    assert.equal(result.status, code, `${what}: exit ${String(result.status)}, expected ${code}\n${result.stdout}\n${result.stderr}`);
  }

  test('0 in sync, 1 failed, 1 resyncing (wait: 1 on timeout, 0 once resumed), 4 once stopped', async () => {
    const [a, b] = [await memoryLeg(), await memoryLeg()];
    const { mirror, control } = await mirrorOf([a.uri, b.uri]);

    assertCode(await cli(control, ['status']), 0, 'status, both legs in sync');
    const json = await cli(control, ['status', '--json']);
    assertCode(json, 0, 'status --json, both legs in sync');
    assert.deepEqual((JSON.parse(json.stdout) as StatusResult).legs.map((leg) => leg.state), ['in-sync', 'in-sync']);
    const waited = await cli(control, ['wait', '--timeout', '10']);
    assertCode(waited, 0, 'wait with every leg in sync');
    assert.match(waited.stdout, /every leg in sync \(2 legs\)/);

    assertCode(await cli(control, ['leg', 'fail', '1']), 0, 'leg fail 1');
    assertCode(await cli(control, ['status']), 1, 'status with leg 1 failed');
    assertCode(await cli(control, ['status', '--json']), 1, 'status --json with leg 1 failed');
    const timedOut = await cli(control, ['wait', '--timeout', '300ms']);
    assertCode(timedOut, 1, 'wait --timeout 300ms with leg 1 failed');
    assert.match(timedOut.stderr, /timed out after 300ms: leg 1 failed/);

    // leg 1 misses 4 MiB, then comes back with the resync paused: it stays resyncing
    const client = await NbdClient.connect(mirror.uri);
    const data = randomBytes(4 * kMiB);
    await client.write(0, data);
    await client.flush();
    assertCode(await cli(control, ['resync', 'pause']), 0, 'resync pause');
    assertCode(await cli(control, ['leg', 'reconnect', '1']), 0, 'leg reconnect 1');
    await waitUntil(control, 'leg 1 resyncing', (status) => status.legs[1]?.state === 'resyncing');
    assertCode(await cli(control, ['status']), 1, 'status with leg 1 resyncing (paused)');
    assertCode(await cli(control, ['wait', '--timeout', '0.5']), 1, 'wait --timeout 0.5 with the resync paused');

    // a wait started now returns 0 only after the resync, resumed later, has finished
    const waiting = cli(control, ['wait', '--timeout', '60', '--json']);
    await sleep(500);
    assertCode(await cli(control, ['resync', 'resume']), 0, 'resync resume');
    const done = await waiting;
    assertCode(done, 0, 'wait after resume');
    const final = JSON.parse(done.stdout) as StatusResult;
    assert.deepEqual(final.legs.map((leg) => leg.state), ['in-sync', 'in-sync'], 'wait printed a status with both legs in sync');
    assert.equal(final.legs[1]?.dirtyBytes, 0, 'leg 1 has nothing dirty left');
    assert.ok(data.equals(await client.read(0, data.length)), 'the data written while degraded reads back');
    await client.close();

    assert.equal(await mirror.stop(), 0, 'the mirror stops cleanly');
    const gone = await cli(control, ['status']);
    assertCode(gone, 4, 'status after the daemon stopped');
    assert.match(gone.stderr, /^enbd: error: no control socket at /m);
    const goneJson = await cli(control, ['status', '--json']);
    assertCode(goneJson, 4, 'status --json after the daemon stopped');
    const body = JSON.parse(goneJson.stdout) as { error: { reason: string; code: string; message: string } };
    assert.equal(body.error.reason, 'connect');
    assert.equal(body.error.code, 'ENOENT');
    assertCode(await cli(control, ['wait', '--timeout', '5']), 4, 'wait after the daemon stopped');
  });

  test('2 when no leg is in sync (both nbdkit legs killed), with and without --json', async () => {
    const [a, b] = [await memoryLeg(), await memoryLeg()];
    const { mirror, control } = await mirrorOf([a.uri, b.uri]);
    await a.child.stop('SIGKILL');
    await b.child.stop('SIGKILL');
    // a read makes the engine notice at once (the idle probe would too, a little later)
    const client = await NbdClient.connect(mirror.uri);
    await client.read(0, 4096).catch(() => undefined);
    await waitUntil(control, 'no leg in sync', (status) => status.legs.every((leg) => leg.state !== 'in-sync'));
    await client.close().catch(() => undefined);
    assertCode(await cli(control, ['status']), 2, 'status with no in-sync leg');
    assertCode(await cli(control, ['status', '--json']), 2, 'status --json with no in-sync leg');
    assertCode(await cli(control, ['wait', '--timeout', '200ms']), 1, 'wait --timeout with no in-sync leg');
    assert.ok(mirror.alive(), 'the daemon stays up with every leg out');
  });

  test('wait exits 4 when the daemon goes away while it waits', async () => {
    const [a, b] = [await memoryLeg(), await memoryLeg()];
    const { mirror, control } = await mirrorOf([a.uri, b.uri]);
    assertCode(await cli(control, ['leg', 'fail', '1']), 0, 'leg fail 1');
    const waiting = cli(control, ['wait']);
    await sleep(500);
    assert.equal(await mirror.stop(), 0);
    const result = await waiting;
    assertCode(result, 4, 'wait when the daemon stopped under it');
    assert.match(result.stderr, /^enbd: error: /m);
  });

  test('4 for a stale control socket (nothing accepts) and for no socket at all', async () => {
    const stale = dir.path('stale.ctl');
    const bound = spawnSync('/usr/bin/python3', ['-c', 'import socket,sys;s=socket.socket(socket.AF_UNIX);s.bind(sys.argv[1])', stale], { env: toolEnv });
    assert.equal(bound.status, 0, String(bound.stderr));
    const result = await cli(stale, ['status']);
    assertCode(result, 4, 'status on a stale socket');
    assert.match(result.stderr, /nothing listens on control socket/);
    // no --control and no default socket in the working directory
    const lonely = await new Promise<CliResult>((resolveRun) => {
      const child = spawn(process.execPath, [enbdCli, 'status', '--json'], { cwd: dir.dir, env: { ...toolEnv, ENBD_CONTROL: '' }, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
      child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
      child.once('close', (status) => resolveRun({ status, stdout, stderr }));
    });
    assertCode(lonely, 4, 'status --json with no control socket anywhere');
    assert.match(lonely.stderr, /no control socket found/);
    assert.equal((JSON.parse(lonely.stdout) as { error: { reason: string } }).error.reason, 'connect');
  });
});
