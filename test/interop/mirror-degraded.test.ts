/**
 * Degraded mode with real faults: legs are `nbdkit file` processes (behind nbdkit's error,
 * pause or no filter) that return EIO on demand, hang, or are killed with SIGKILL and started
 * again on the same file. Through an in-process mirror (real actors on workers) each test keeps
 * writing while a leg is out, brings it back, waits for the resync, and compares the leg files
 * byte for byte, and against what the client wrote.
 * Threads: test process main thread; legs are child processes; the mirror's actors are workers.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { EnbdError } from '../../src/core/errors.js';
import type { LegState, MirrorDevice } from '../../src/engine/mirror.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import * as p from '../../src/nbd/protocol.js';
import { run, scratch, sparseFile, startNbdkit, unixUri, waitFor, type Child, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { assertSameBytes, startInProcessMirror, stopAllMirrors, type InProcessMirror } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;
const kLegBytes = 16 * kMiB;
const kEngine = {
  legTimeoutMs: 1000,
  reconnectMinMs: 30,
  reconnectMaxMs: 300,
  resyncRates: { minBytesPerSecond: 0, maxBytesPerSecond: 0 },
};

describe('enbd mirror: degraded mode, reconnect and resync with real faults', { skip: skipUnlessTools('nbdkit', 'fio'), timeout: 90_000 }, () => {
  let dir: Scratch;
  const children: Child[] = [];
  let seq = 0;

  before(() => {
    dir = scratch('enbd-degraded-');
  });

  after(async () => {
    await stopAllMirrors();
    await Promise.all(children.map(async (child) => await child.stop('SIGKILL')));
    dir?.cleanup();
  });

  interface Leg {
    file: string;
    socket: string;
    uri: string;
    filters: string[];
    params: string[];
    child: Child;
  }

  function image(name: string, sizeBytes = kLegBytes): string {
    return sparseFile(dir.path(name), sizeBytes);
  }

  /** `nbdkit [--filter=F ...] file FILE [filter params]` on a fresh socket. */
  async function startLeg(file: string, filter?: string, params: string[] = []): Promise<Leg> {
    seq += 1;
    const socket = dir.path(`leg${seq}.sock`);
    const filters = filter === undefined ? [] : [`--filter=${filter}`];
    const child = await startNbdkit(socket, ['file', file, ...params], filters);
    children.push(child);
    return { file, socket, uri: unixUri(socket), filters, params, child };
  }

  async function restartLeg(leg: Leg): Promise<void> {
    leg.child = await startNbdkit(leg.socket, ['file', leg.file, ...leg.params], leg.filters);
    children.push(leg.child);
  }

  async function mirrorOf(legs: Leg[], name: string): Promise<InProcessMirror> {
    return await startInProcessMirror({ legs: legs.map((leg) => leg.uri), socketPath: dir.path(`${name}.sock`), engine: kEngine });
  }

  function states(device: MirrorDevice): LegState[] {
    return device.legStatus().map((leg) => leg.state);
  }

  async function waitStates(device: MirrorDevice, wanted: LegState[], timeoutMs = 30_000): Promise<void> {
    await waitFor(`leg states ${wanted.join(',')} (now ${states(device).join(',')})`, () => states(device).join() === wanted.join(), timeoutMs);
  }

  /** Writes `count` random 4 KiB..64 KiB blocks at random offsets; mirrors them into `model`. */
  async function randomWrites(client: NbdClient, model: Buffer, count: number, region = [0, kLegBytes]): Promise<void> {
    const [start, end] = region as [number, number];
    const pending: Promise<void>[] = [];
    for (let index = 0; index < count; index += 1) {
      const length = 4096 * (1 + Math.floor(Math.random() * 16));
      const offset = start + 4096 * Math.floor(Math.random() * ((end - start - length) / 4096));
      const data = randomBytes(length);
      data.copy(model, offset);
      pending.push(client.write(offset, data));
      if (pending.length >= 16) await Promise.all(pending.splice(0));
    }
    await Promise.all(pending);
  }

  function assertLegsEqual(legs: Leg[], model: Buffer | null, what: string): void {
    const first = readFileSync((legs[0] as Leg).file);
    for (const [index, leg] of legs.entries()) {
      if (index > 0) assertSameBytes(readFileSync(leg.file), first, `${what}: leg ${index} vs leg 0`);
    }
    if (model !== null) assertSameBytes(first, model, `${what}: legs vs what the client wrote`);
  }

  test('a leg returning EIO is degraded, marked, reconnected and resynced; the client never sees an error', async () => {
    const trigger = dir.path('eio-trigger');
    const legs = [
      await startLeg(image('eio-0.img')),
      await startLeg(image('eio-1.img'), 'error', ['error=EIO', 'error-rate=100%', `error-file=${trigger}`]),
    ];
    const mirror = await mirrorOf(legs, 'eio');
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      await randomWrites(client, model, 100);
      writeFileSync(trigger, '');
      await randomWrites(client, model, 200);
      const status = mirror.device.legStatus()[1];
      assert.notEqual(status?.state, 'in-sync', 'the failing leg left in-sync');
      assert.ok((status?.dirtyBytes ?? 0) > 0, 'the failing leg has dirty chunks');
      // Reads come from the good leg: every byte is what the client wrote.
      assertSameBytes(await client.read(0, kLegBytes), model, 'read through the degraded mirror');
      rmSync(trigger);
      await waitStates(mirror.device, ['in-sync', 'in-sync']);
      assert.equal(mirror.device.legStatus()[1]?.dirtyBytes, 0);
      await client.flush();
      assertLegsEqual(legs, model, 'after resync');
    } finally {
      await client.close();
      await mirror.close();
    }
  });

  test('a read error on one leg is retried on the other and the range is rewritten on the failing leg', async () => {
    const trigger = dir.path('pread-trigger');
    const legs = [
      await startLeg(image('rd-0.img')),
      await startLeg(image('rd-1.img'), 'error', ['error-pread=EIO', 'error-pread-rate=100%', `error-pread-file=${trigger}`]),
    ];
    const mirror = await mirrorOf(legs, 'rd');
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      await randomWrites(client, model, 50);
      writeFileSync(trigger, '');
      // Many small reads so both legs get some (fewest-in-flight picks spread them).
      for (let round = 0; round < 4; round += 1) {
        const reads = [];
        for (let offset = 0; offset < kLegBytes; offset += 256 * 1024) reads.push(client.read(offset, 256 * 1024));
        assertSameBytes(Buffer.concat(await Promise.all(reads)), model, `read round ${round}`);
      }
      // Only reads fail there: each EIO is repaired (the range rewritten from leg 0, leg 1 stays
      // admitted), or, if an idle probe's read failed too, leg 1 left and came back.
      const status = mirror.device.legStatus()[1];
      assert.ok((status?.readRepairs ?? 0) + (status?.failures ?? 0) > 0, 'leg 1 failed reads and had them repaired');
      rmSync(trigger);
      await waitStates(mirror.device, ['in-sync', 'in-sync']);
      assertLegsEqual(legs, model, 'after read failures');
    } finally {
      await client.close();
      await mirror.close();
    }
  });

  test('fio with verification keeps running while a leg is killed with SIGKILL and restarted', async () => {
    const legs = [await startLeg(image('kill-0.img')), await startLeg(image('kill-1.img'))];
    const mirror = await mirrorOf(legs, 'kill');
    try {
      const fio = run('fio', [
        '--name=degraded', '--ioengine=nbd', `--uri=${mirror.uri}`, '--rw=randwrite', '--bs=4k',
        `--size=${kLegBytes}`, '--iodepth=16', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1',
        '--loops=6', '--output-format=json', `--output=${dir.path('fio-kill.json')}`,
      ], { timeoutMs: 120_000 });
      await sleep(300);
      await legs[1]?.child.stop('SIGKILL');
      await waitFor('leg 1 out of sync', () => states(mirror.device)[1] !== 'in-sync');
      await sleep(300);
      await restartLeg(legs[1] as Leg);
      const result = await fio;
      assert.equal(result.status, 0, `fio failed:\n${result.stdout}\n${result.stderr}`);
      const job = (JSON.parse(readFileSync(dir.path('fio-kill.json'), 'utf8')) as { jobs: Array<{ error: number; read: { io_bytes: number } }> }).jobs[0];
      assert.equal(job?.error, 0);
      assert.ok((job?.read.io_bytes ?? 0) > 0, 'fio verified what it wrote');
      await waitStates(mirror.device, ['in-sync', 'in-sync']);
      assertLegsEqual(legs, null, 'after SIGKILL and resync');
    } finally {
      await mirror.close();
    }
  });

  test('writes during a slow resync, on the very chunks being copied, end identical and as written', async () => {
    const legs = [await startLeg(image('busy-0.img')), await startLeg(image('busy-1.img'))];
    const mirror = await mirrorOf(legs, 'busy');
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      const everything = randomBytes(kLegBytes);
      everything.copy(model);
      mirror.device.failLegByHand(1);
      for (let offset = 0; offset < kLegBytes; offset += kMiB) await client.write(offset, everything.subarray(offset, offset + kMiB));
      assert.equal(mirror.device.legStatus()[1]?.dirtyBytes, kLegBytes, 'every chunk written while leg 1 was out is dirty');
      // Slow: ~8 MiB/s, so the resync takes about two seconds while the client keeps writing.
      mirror.device.setResyncRates({ minBytesPerSecond: 8 * kMiB, maxBytesPerSecond: 8 * kMiB });
      assert.equal(await mirror.device.reconnectLegNow(1), 'resyncing');
      let rounds = 0;
      while (states(mirror.device)[1] === 'resyncing') {
        await randomWrites(client, model, 20);
        rounds += 1;
      }
      assert.ok(rounds >= 2, `the client wrote during the resync (${rounds} rounds)`);
      await waitStates(mirror.device, ['in-sync', 'in-sync']);
      assertLegsEqual(legs, model, 'after writes racing the resync');
    } finally {
      await client.close();
      await mirror.close();
    }
  });

  test('a hung leg does not stall the client: its request times out, the leg degrades and comes back', async () => {
    const control = dir.path('pause.ctl');
    const legs = [
      await startLeg(image('hang-0.img')),
      await startLeg(image('hang-1.img'), 'pause', [`pause-control=${control}`]),
    ];
    const mirror = await mirrorOf(legs, 'hang');
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      await randomWrites(client, model, 20);
      assert.equal(await pauseControl(control, 'p'), 'P');
      // With leg 1 paused forever, these writes complete once the 1 s leg timeout fires.
      await randomWrites(client, model, 40);
      assert.notEqual(states(mirror.device)[1], 'in-sync');
      // nbdkit 1.32 may abort ("raw_send_socket: Assertion `sock >= 0' failed") when replies
      // of a connection its client already left are released; start it again if it did.
      const hung = legs[1] as Leg;
      if (hung.child.process.exitCode === null && hung.child.process.signalCode === null) {
        const answer = await pauseControl(control, 'r').catch(() => '');
        await Promise.race([new Promise((resolveExit) => hung.child.process.once('exit', resolveExit)), sleep(1000)]);
        const exited = hung.child.process.exitCode !== null || hung.child.process.signalCode !== null;
        assert.ok(answer === 'R' || exited, `the pause filter resumed (answer "${answer}") or nbdkit aborted`);
      }
      if (hung.child.process.exitCode !== null || hung.child.process.signalCode !== null) await restartLeg(hung);
      await waitStates(mirror.device, ['in-sync', 'in-sync']);
      assertLegsEqual(legs, model, 'after the hang');
    } finally {
      await client.close();
      await mirror.close();
    }
  });

  test('every leg down: EIO and the daemon stays up; it serves again once the legs return', async () => {
    const legs = [await startLeg(image('down-0.img')), await startLeg(image('down-1.img'))];
    const mirror = await mirrorOf(legs, 'down');
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      await randomWrites(client, model, 50);
      await client.flush();
      await Promise.all(legs.map(async (leg) => await leg.child.stop('SIGKILL')));
      const isEio = (error: unknown): boolean => error instanceof EnbdError && error.errno === p.kEIo;
      // The first requests may meet the dead connections, later ones no leg at all: all EIO.
      for (let attempt = 0; attempt < 3; attempt += 1) {
        await assert.rejects(client.write(0, Buffer.alloc(4096, 7)), isEio);
        await assert.rejects(client.read(0, 4096), isEio);
      }
      assert.deepEqual(states(mirror.device).map((state) => state === 'in-sync'), [false, false]);
      for (const leg of legs) await restartLeg(leg);
      await waitStates(mirror.device, ['in-sync', 'in-sync']);
      // What was acknowledged before the crash is still there, on both legs.
      assertSameBytes(await client.read(0, kLegBytes), model, 'read after every leg returned');
      await randomWrites(client, model, 50);
      await client.flush();
      assertLegsEqual(legs, model, 'after all legs returned');
    } finally {
      await client.close();
      await mirror.close();
    }
  });

  test('a failed FLUSH re-copies exactly the writes since that leg\'s last good flush', async () => {
    // nbdkit's error filter cannot fail FLUSH (1.32): leg 1 is nbdkit's eval plugin over a
    // file, whose flush fails while a trigger file exists.
    const trigger = dir.path('flush-trigger');
    const file = image('flush-1.img');
    seq += 1;
    const socket = dir.path(`leg${seq}.sock`);
    const child = await startNbdkit(socket, [
      'eval',
      `get_size=echo ${kLegBytes}`,
      `pread=dd if=${file} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none`,
      `pwrite=dd of=${file} seek=$4 conv=notrunc oflag=seek_bytes status=none`,
      `flush=if [ -e ${trigger} ]; then echo "EIO flush refused by the test" >&2; exit 1; fi`,
    ]);
    children.push(child);
    const legs = [await startLeg(image('flush-0.img')), { file, socket, uri: unixUri(socket), filters: [], params: [], child }];
    const mirror = await mirrorOf(legs, 'flush');
    const client = await NbdClient.connect(mirror.uri);
    try {
      await client.write(4 * kMiB, Buffer.alloc(64 * 1024, 0x57)); // W: made durable below
      await client.flush();
      await client.write(1 * kMiB, Buffer.alloc(64 * 1024, 0x58)); // X: after the last good flush
      writeFileSync(trigger, '');
      await client.flush(); // leg 0 flushed: success for the client
      assert.ok((mirror.device.legStatus()[1]?.failures ?? 0) > 0, 'leg 1 failed its flush');
      rmSync(trigger);
      await waitStates(mirror.device, ['in-sync', 'in-sync']);
      const resyncedBytes = mirror.device.legStatus()[1]?.resyncedBytes;
      assert.equal(resyncedBytes, 64 * 1024, 'leg 1 was resynced, and only X (one 64 KiB unflushed chunk) was copied again, not W');
      const model = Buffer.alloc(kLegBytes);
      model.fill(0x57, 4 * kMiB, 4 * kMiB + 64 * 1024);
      model.fill(0x58, 1 * kMiB, 1 * kMiB + 64 * 1024);
      assertLegsEqual(legs, model, 'after a failed flush');
    } finally {
      await client.close();
      await mirror.close();
    }
  });

  test('a leg added to a running mirror gets a full resync; a removed leg stops; the last in-sync leg stays', async () => {
    const legs = [await startLeg(image('add-0.img')), await startLeg(image('add-1.img'))];
    const mirror = await mirrorOf(legs, 'add');
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      await randomWrites(client, model, 40);
      const extra = await startLeg(image('add-2.img'));
      await assert.rejects(mirror.device.addLeg(legs[0]?.uri as string), /already a leg/);
      assert.equal(await mirror.device.addLeg(extra.uri), 2);
      await randomWrites(client, model, 40);
      await waitStates(mirror.device, ['in-sync', 'in-sync', 'in-sync']);
      assertLegsEqual([...legs, extra], model, 'after adding leg 2');
      await mirror.device.removeLeg(0);
      await mirror.device.removeLeg(1);
      await assert.rejects(mirror.device.removeLeg(2), /last in-sync leg/);
      await randomWrites(client, model, 20);
      assertSameBytes(await client.read(0, kLegBytes), model, 'served by the one leg left');
      assertSameBytes(readFileSync(extra.file), model, 'leg 2 holds everything');
    } finally {
      await client.close();
      await mirror.close();
    }
  });

  test('a leg failed by hand and marked whole gets a full resync that ends identical', async () => {
    const legs = [await startLeg(image('full-0.img')), await startLeg(image('full-1.img'))];
    const mirror = await mirrorOf(legs, 'full');
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      assert.throws(() => mirror.device.failLegByHand(5), /no leg 5/);
      await randomWrites(client, model, 30);
      mirror.device.failLegByHand(1);
      assert.throws(() => mirror.device.failLegByHand(0), /last in-sync leg/);
      // Scribble on leg 1 behind the mirror's back; the full resync must repair it.
      writeFileSync(legs[1]?.file as string, randomBytes(kLegBytes));
      mirror.device.markLegDirty(1);
      await mirror.device.reconnectLegNow(1);
      await waitStates(mirror.device, ['in-sync', 'in-sync']);
      assertLegsEqual(legs, model, 'after a full resync');
    } finally {
      await client.close();
      await mirror.close();
    }
  });
});

/**
 * Sends one byte to nbdkit's pause filter control socket and returns its one-byte answer, or ''
 * when the connection closed without one (nbdkit may abort right as it resumes, see the test).
 */
async function pauseControl(path: string, command: 'p' | 'r'): Promise<string> {
  return await new Promise((resolveAnswer, reject) => {
    const socket = connect(path);
    socket.once('error', reject);
    socket.once('connect', () => socket.write(command));
    socket.once('close', () => resolveAnswer(''));
    socket.once('data', (data: Buffer) => {
      resolveAnswer(data.toString('latin1', 0, 1));
      socket.destroy();
    });
  });
}
