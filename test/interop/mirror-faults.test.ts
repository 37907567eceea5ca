/**
 * Leg faults that the mirror must survive without losing or mis-serving an acknowledged write
 * (issue 10, findings 1-4 and 6), against a real `enbd mirror` process whose legs are nbdkit
 * processes with faults switched on and off at run time. Leg state comes from the daemon's
 * control socket (status, pushed leg-state events); operator steps go through the real CLI.
 * Every test checks bytes: reads through the mirror, the legs' backing files compared byte for
 * byte, and against a model of what the client wrote. No test asserts a duration: deadlines are
 * waits, and finding 3 counts requests that outlived the leg timeout.
 *
 * | finding | fault                                                    | promise checked                     |
 * |---------|----------------------------------------------------------|-------------------------------------|
 * | 1       | in-sync leg A fails a WRITE that resyncing leg B took     | error, or the bytes survive A's return and the resync |
 * | 2       | leg B's pwrite sleeps past --leg-timeout, lands later     | the newer write wins; B not in sync while the old connection lives |
 * | 3       | leg B hangs writes 30 s / fails every write with EIO      | few slow client writes; 'faulty' after --leg-max-failures, quiet log |
 * | 4       | zero-length WRITE/TRIM/WRITE_ZEROES, FLUSH with offset    | no leg leaves in-sync, one answer, data intact |
 * | 6       | an idle leg's nbdkit gets SIGTERM / SIGSTOP              | --idle-probe notices; I/O keeps working |
 *
 * Threads: test process main thread; the daemon, nbdkit and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { EnbdError } from '../../src/core/errors.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import * as p from '../../src/nbd/protocol.js';
import { scratch, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { assertSameBytes, readNbd, startMirror, stopAllMirrors, type MirrorProcess } from '../helpers/mirror.js';
import { FaultLegs, MirrorControl, logLinesAboutLeg, type FaultLeg } from '../helpers/fault-legs.js';
import { NbdProbe } from '../helpers/nbd-probe.js';

const kMiB = 1024 * 1024;
const kLegBytes = 16 * kMiB;
const kBlock = 4096;
const kLegTimeoutMs = 1000;
/** Small timeouts so every fault plays out in seconds (flag names: /work/notes/common.md). */
const kMirrorFlags = [
  '--leg-timeout', String(kLegTimeoutMs),
  '--reconnect-min', '50',
  '--reconnect-max', '500',
  '--fence-timeout', '3000',
  '--probe-timeout', '1000',
  '--idle-probe', '300',
];

function eioOnWrites(trigger: string): string[] {
  return ['error-pwrite=EIO', 'error-pwrite-rate=100%', `error-pwrite-file=${trigger}`];
}

describe('enbd mirror: leg faults never lose or mis-serve an acknowledged write (issue 10)', { skip: skipUnlessTools('nbdkit'), timeout: 150_000 }, () => {
  let dir: Scratch;
  let legs: FaultLegs;
  const controls: MirrorControl[] = [];

  before(() => {
    dir = scratch('enbd-faults-');
    legs = new FaultLegs(dir);
  });

  after(async () => {
    for (const control of controls) control.close();
    await stopAllMirrors();
    await legs.stopAll();
    dir?.cleanup();
  });

  async function mirrorOf(legUris: string[], name: string, extra: string[] = [], logLevel = 'warn'): Promise<{ mirror: MirrorProcess; control: MirrorControl }> {
    const controlPath = dir.path(`${name}.ctl`);
    const mirror = await startMirror({
      legs: legUris,
      socketPath: dir.path(`${name}.sock`),
      args: ['--control', controlPath, ...kMirrorFlags, ...extra],
      logLevel,
    });
    const control = await MirrorControl.connect(controlPath, true);
    controls.push(control);
    return { mirror, control };
  }

  /** Stops the daemon quickly: a hung or stopped leg must not hold the test up. */
  async function stop(mirror: MirrorProcess, control: MirrorControl, client: NbdClient | null): Promise<void> {
    if (client !== null) await Promise.race([client.close().catch(() => undefined), sleep(2000)]);
    control.close();
    await mirror.stop('SIGTERM', 3000);
  }

  async function write(client: NbdClient, model: Buffer, offsetBytes: number, data: Buffer): Promise<void> {
    await client.write(offsetBytes, data);
    data.copy(model, offsetBytes);
  }

  function legFile(leg: FaultLeg): Buffer {
    assert.ok(leg.file !== null, 'a file-backed leg');
    return readFileSync(leg.file);
  }

  function isNbdError(error: unknown): error is EnbdError {
    return error instanceof EnbdError && error.errno !== 0;
  }

  test('finding 1: a WRITE that only a resyncing leg took is an error, or it survives the failed leg\'s return and the resync', async (t) => {
    const triggerA = dir.path('f1-a.eio');
    const triggerB = dir.path('f1-b.eio');
    const a = await legs.fileLeg(legs.image('f1-a.img', kLegBytes), ['error'], eioOnWrites(triggerA));
    const b = await legs.fileLeg(legs.image('f1-b.img', kLegBytes), ['error'], eioOnWrites(triggerB));
    const { mirror, control } = await mirrorOf([a.uri, b.uri], 'f1');
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      await write(client, model, 12 * kMiB, randomBytes(kMiB));
      // B misses a large write and comes back resyncing; the paused resync keeps it there.
      await control.cliOk(['resync', 'pause']);
      writeFileSync(triggerB, '');
      await write(client, model, 0, randomBytes(4 * kMiB));
      rmSync(triggerB);
      const resyncing = await control.waitLeg(1, 'resyncing', (leg) => leg.state === 'resyncing');
      assert.ok(resyncing.dirtyBytes >= 4 * kMiB, `leg 1 has the large write to copy: ${resyncing.dirtyBytes} dirty bytes`);
      assert.equal((await control.legs())[0]?.state, 'in-sync');

      // Now A, the only in-sync leg, fails two WRITEs that B takes: one to a range clean on B,
      // one of part of a chunk B still has to copy (B's copy of the rest of it is stale).
      const writes = [
        { what: 'a range clean on leg 1', at: 8 * kMiB, data: randomBytes(64 * 1024), acked: false },
        { what: 'part of a chunk dirty on leg 1', at: kMiB + 512, data: randomBytes(8 * 1024), acked: false },
      ];
      writeFileSync(triggerA, '');
      const outcomes = await Promise.all(writes.map(async (one) => await client.write(one.at, one.data).then(() => null, (error: unknown) => error)));
      rmSync(triggerA);
      for (const [index, one] of writes.entries()) {
        const outcome = outcomes[index];
        if (outcome !== null) assert.ok(isNbdError(outcome), `the write to ${one.what} failed with an NBD error: ${String(outcome)}`);
        one.acked = outcome === null;
        t.diagnostic(`the write to ${one.what} was ${one.acked ? 'acknowledged' : `refused: ${String(outcome)}`}`);
      }
      const before = Buffer.from(model);
      for (const one of writes) if (one.acked) one.data.copy(model, one.at);

      // A reconnects (and may resync from B); once it serves again, acknowledged bytes read back.
      await control.waitLeg(0, 'back (in-sync or resyncing)', (leg) => leg.state === 'in-sync' || leg.state === 'resyncing');
      for (const one of writes) {
        if (!one.acked) continue;
        assertSameBytes(await client.read(one.at, one.data.length), one.data, `the acknowledged write to ${one.what}, read after leg 0 returned`);
        assertSameBytes(await readNbd(mirror.uri, one.at, one.data.length), one.data, `the acknowledged write to ${one.what}, read on a new connection`);
      }
      await control.cliOk(['resync', 'resume']);
      await control.waitStates(['in-sync', 'in-sync']);
      await client.flush();
      const fileA = legFile(a);
      assertSameBytes(legFile(b), fileA, 'leg files after the resync (B vs A)');
      for (const one of writes) {
        if (one.acked) continue;
        // A refused write may leave the old bytes or the new ones (on both legs alike), nothing else.
        const held = fileA.subarray(one.at, one.at + one.data.length);
        assert.ok(held.equals(before.subarray(one.at, one.at + one.data.length)) || held.equals(one.data), `the refused write to ${one.what} left old or new bytes`);
        held.copy(model, one.at);
      }
      assertSameBytes(fileA, model, `leg files vs what the client wrote (acknowledged: ${writes.map((one) => one.acked).join(', ')})`);
      assertSameBytes(await client.read(0, kLegBytes), model, 'read through the mirror after the resync');
    } finally {
      await stop(mirror, control, client);
    }
  });

  test('finding 2: a late ("zombie") write landing after the resync never beats the newer write; no in-sync while it is pending', async (t) => {
    const a = await legs.fileLeg(legs.image('f2-a.img', kLegBytes));
    const b = await legs.lateWriteLeg(legs.image('f2-b.img', kLegBytes), kLegBytes, 3);
    const { mirror, control } = await mirrorOf([a.uri, b.uri], 'f2');
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    const at = 1 * kMiB;
    try {
      await write(client, model, 4 * kMiB, randomBytes(256 * 1024));
      // X: leg 1's pwrite sleeps 3 s, past the 1 s leg timeout; the client hears success via leg 0.
      writeFileSync(b.flag, '');
      await write(client, model, at, Buffer.alloc(64 * 1024, 0x58));
      assert.notEqual((await control.legs())[1]?.state, 'in-sync', 'leg 1 left in-sync after its write timed out');
      // Y: the newer write of the same block, as soon as X was acknowledged.
      await write(client, model, at, Buffer.alloc(64 * 1024, 0x59));
      // Until X has landed on leg 1 its old connection is open: leg 1 must not be in sync.
      let inSyncEarly: string | null = null;
      const seen = new Set<string>();
      const deadline = Date.now() + 15_000;
      while (!existsSync(b.landed)) {
        assert.ok(Date.now() < deadline, 'the late write landed');
        const legsNow = await control.legs();
        seen.add(legsNow[1]?.state ?? '?');
        if (!existsSync(b.landed) && legsNow[1]?.state === 'in-sync' && inSyncEarly === null) {
          inSyncEarly = JSON.stringify(legsNow.map((leg) => [leg.state, leg.failureReason]));
        }
        await sleep(50);
      }
      t.diagnostic(`leg 1 states while the late write was pending: ${[...seen].join(', ')}`);
      await control.waitStates(['in-sync', 'in-sync']);
      await client.flush();
      for (let round = 0; round < 20; round += 1) {
        assertSameBytes(await client.read(at, 64 * 1024), model.subarray(at, at + 64 * 1024), `read ${round} of the overwritten block`);
      }
      assertSameBytes(legFile(b), legFile(a), 'leg files after the late write and the resync (B vs A)');
      assertSameBytes(legFile(a), model, 'leg files vs what the client wrote');
      // Leg 1 alone must serve the newer bytes too.
      assert.equal(await control.cliOk(['leg', 'fail', '0']), 'leg 0: failed\n');
      assertSameBytes(await client.read(at, 64 * 1024), model.subarray(at, at + 64 * 1024), 'the block read from leg 1 alone');
      assertSameBytes(await readNbd(mirror.uri, 0, kLegBytes), model, 'the whole device read from leg 1 alone');
      assert.equal(inSyncEarly, null, `leg 1 showed in-sync while its timed-out write was still pending on the old connection: ${inSyncEarly}`);
    } finally {
      await stop(mirror, control, client);
    }
  });

  test('finding 3a: a leg whose writes hang costs the client only a few slow writes, not one per reconnect', async (t) => {
    const a = await legs.fileLeg(legs.image('f3a-a.img', kLegBytes));
    const b = await legs.fileLeg(legs.image('f3a-b.img', kLegBytes), ['delay'], ['delay-write=30']);
    const { mirror, control } = await mirrorOf([a.uri, b.uri], 'f3a');
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      const slow: number[] = [];
      let writes = 0;
      const end = Date.now() + 8000;
      while (Date.now() < end) {
        const offset = (writes % (kLegBytes / kBlock)) * kBlock;
        const started = performance.now();
        await write(client, model, offset, randomBytes(kBlock));
        const tookMs = performance.now() - started;
        if (tookMs > kLegTimeoutMs) slow.push(Math.round(tookMs));
        writes += 1;
      }
      t.diagnostic(`${slow.length} of ${writes} writes outlived the leg timeout`);
      assert.notEqual((await control.legs())[1]?.state, 'in-sync', 'the hung leg is out');
      assert.ok(slow.length <= 3, `${slow.length} of ${writes} client writes waited out the leg timeout (ms: ${slow.join(', ')}); a hung leg may cost 2-3, not one per reconnect`);
      assertSameBytes(await client.read(0, kLegBytes), model, 'read through the mirror');
      assertSameBytes(legFile(a), model, 'the good leg holds every write');
    } finally {
      await stop(mirror, control, client);
    }
  });

  test('finding 3b: a leg failing every write ends faulty after --leg-max-failures, stays so quietly, and `leg reconnect` brings it back', async (t) => {
    const trigger = dir.path('f3b.eio');
    const a = await legs.fileLeg(legs.image('f3b-a.img', kLegBytes));
    const b = await legs.fileLeg(legs.image('f3b-b.img', kLegBytes), ['error'], eioOnWrites(trigger));
    const { mirror, control } = await mirrorOf([a.uri, b.uri], 'f3b', ['--leg-max-failures', '3'], 'info');
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    let writing = true;
    let writes = 0;
    let writeError: unknown = null;
    const writer = (async () => {
      while (writing) {
        await write(client, model, (writes % 256) * kBlock, randomBytes(kBlock));
        writes += 1;
        await sleep(20);
      }
    })().catch((error: unknown) => {
      writeError = error;
    });
    try {
      const logStart = mirror.stderr().length;
      writeFileSync(trigger, '');
      // 5 s of client writes against the failing leg, then count what the daemon logged about it.
      const seen = new Set<string>();
      for (const end = Date.now() + 5000; Date.now() < end; await sleep(200)) {
        for (const state of await control.states()) seen.add(state);
      }
      const lines = logLinesAboutLeg(mirror.stderr().slice(logStart), 1);
      t.diagnostic(`${lines.length} log lines about leg 1 in 5 s; states seen: ${[...seen].join(', ')}`);
      assert.ok(lines.length < 30, `the daemon logged ${lines.length} lines about leg 1 in 5 s (states seen: ${[...seen].join(', ')}); first ones:\n${lines.slice(0, 5).join('\n')}`);
      await control.waitLeg(1, 'faulty', (leg) => leg.state === 'faulty', 5000);
      for (const end = Date.now() + 3000; Date.now() < end; await sleep(200)) {
        assert.equal((await control.legs())[1]?.state, 'faulty', 'a faulty leg stays parked while writes go on');
      }
      writing = false;
      await writer;
      assert.equal(writeError, null, 'every client write succeeded');
      assert.ok(writes > 50, `the client kept writing (${writes} writes)`);
      rmSync(trigger);
      await control.cliOk(['leg', 'reconnect', '1']);
      await control.waitLeg(1, 'out of faulty', (leg) => leg.state !== 'faulty', 5000);
      await control.waitStates(['in-sync', 'in-sync']);
      await client.flush();
      assertSameBytes(legFile(b), legFile(a), 'leg files after leg 1 was reconnected by hand (B vs A)');
      assertSameBytes(legFile(a), model, 'leg files vs what the client wrote');
    } finally {
      writing = false;
      await writer;
      await stop(mirror, control, client);
    }
  });

  test('finding 4: zero-length WRITE/TRIM/WRITE_ZEROES and a FLUSH with offset/length: one answer, no leg leaves in-sync, data intact', async (t) => {
    const memory = await legs.memoryLeg(kLegBytes);
    const file = legs.image('f4-file.img', kLegBytes);
    // Leg 1 is enbd's own file leg (a path), leg 0 an nbdkit memory leg: two implementations.
    const { mirror, control } = await mirrorOf([memory.uri, file], 'f4');
    const model = Buffer.alloc(kLegBytes);
    const client = await NbdClient.connect(mirror.uri);
    const probe = await NbdProbe.connect({ path: dir.path('f4.sock') });
    try {
      await write(client, model, 0, randomBytes(kMiB));
      await write(client, model, 4 * kMiB, randomBytes(kMiB));
      await client.flush();
      await probe.negotiate({ structured: true });
      const cases: Array<[string, { type: number; offset: number; length: number; flags?: number }]> = [
        ['WRITE length 0 at 0', { type: p.kCmdWrite, offset: 0, length: 0 }],
        ['WRITE length 0 at 4096', { type: p.kCmdWrite, offset: 4096, length: 0 }],
        ['WRITE length 0 FUA', { type: p.kCmdWrite, offset: 0, length: 0, flags: p.kCmdFlagFua }],
        ['WRITE length 0 at the end', { type: p.kCmdWrite, offset: kLegBytes, length: 0 }],
        ['TRIM length 0', { type: p.kCmdTrim, offset: 0, length: 0 }],
        ['TRIM length 0 at 1 MiB', { type: p.kCmdTrim, offset: kMiB, length: 0 }],
        ['WRITE_ZEROES length 0', { type: p.kCmdWriteZeroes, offset: 0, length: 0 }],
        ['WRITE_ZEROES length 0 FUA', { type: p.kCmdWriteZeroes, offset: 4 * kMiB, length: 0, flags: p.kCmdFlagFua }],
        ['FLUSH offset 4096', { type: p.kCmdFlush, offset: 4096, length: 0 }],
        ['FLUSH length 4096', { type: p.kCmdFlush, offset: 0, length: 4096 }],
        ['FLUSH offset 512 length 512', { type: p.kCmdFlush, offset: 512, length: 512 }],
      ];
      let cookie = 1n;
      const answers: string[] = [];
      for (const [name, request] of cases) {
        const errnos: number[] = [];
        for (let repeat = 0; repeat < 2; repeat += 1) {
          probe.sendRequest({ ...request, cookie, payload: request.type === p.kCmdWrite ? Buffer.alloc(0) : undefined });
          const chunks = await probe.readReplyChunks();
          assert.ok(chunks.every((chunk) => chunk.cookie === cookie), `${name}: the reply is for this request`);
          errnos.push(chunks.find((chunk) => chunk.errno !== 0)?.errno ?? 0);
          cookie += 1n;
        }
        answers.push(`${name}: ${errnos.join(', ')}`);
        // A status round trip: a leg-state event sent before the reply has arrived by now.
        const states = await control.states();
        const changes = [0, 1].map((leg) => control.legStateEvents(leg));
        assert.deepEqual(changes, [[], []], `${name}: no leg changed state (states now ${states.join(', ')}; answers: ${answers.join('; ')})`);
        assert.ok(errnos.every((errno) => errno === 0 || errno === p.kEInval), `${name}: success or EINVAL, got ${errnos.join(', ')} (all: ${answers.join('; ')})`);
        assert.equal(errnos[0], errnos[1], `${name}: the same answer twice (all: ${answers.join('; ')})`);
      }
      t.diagnostic(`answers: ${answers.join('; ')}`);
      const events = [0, 1].map((leg) => control.legStateEvents(leg));
      assert.deepEqual(events, [[], []], `no leg changed state (answers: ${answers.join('; ')})`);
      const view = await control.legs();
      for (const leg of view) {
        assert.equal(leg.state, 'in-sync', `leg ${leg.index} in sync`);
        assert.equal(leg.failureReason, null, `leg ${leg.index} has no failure reason`);
        const failures = (leg as { failures?: unknown }).failures;
        if (failures !== undefined) assert.equal(failures, 0, `leg ${leg.index}: 0 failures`);
      }
      assertSameBytes(await client.read(0, kLegBytes), model, 'read through the mirror');
      assertSameBytes(await readNbd(memory.uri, 0, kLegBytes), model, 'the memory leg');
      assertSameBytes(readFileSync(file), model, 'the file leg');
    } finally {
      probe.destroy();
      await stop(mirror, control, client);
    }
  });

  for (const signal of ['SIGTERM', 'SIGSTOP'] as const) {
    test(`finding 6: an idle leg whose nbdkit got ${signal} is noticed by the idle probe; I/O keeps working`, async () => {
      const a = await legs.memoryLeg(kLegBytes);
      const b = await legs.memoryLeg(kLegBytes);
      const { mirror, control } = await mirrorOf([a.uri, b.uri], `f6-${signal}`);
      const client = await NbdClient.connect(mirror.uri);
      const model = Buffer.alloc(kLegBytes);
      try {
        await write(client, model, 0, randomBytes(kMiB));
        await client.flush();
        assertSameBytes(await client.read(0, kMiB), model.subarray(0, kMiB), 'read before the fault');
        b.child.process.kill(signal);
        // No client I/O now: only the idle probe can notice.
        await control.waitLeg(1, 'out of in-sync', (leg) => leg.state !== 'in-sync', 6000);
        assert.equal((await control.legs())[0]?.state, 'in-sync', 'the healthy leg stays in sync');
        for (let index = 0; index < 32; index += 1) {
          await write(client, model, 2 * kMiB + index * 64 * 1024, randomBytes(64 * 1024));
        }
        await client.flush();
        assertSameBytes(await client.read(0, kLegBytes), model, 'read through the mirror after the fault');
        assertSameBytes(await readNbd(a.uri, 0, kLegBytes), model, 'the healthy leg holds every write');
      } finally {
        await stop(mirror, control, client);
      }
    });
  }
});
