/**
 * Issue 14 over real nbdkit legs: read-error repair (nbdkit's error filter on reads, switched
 * on and off with an error file; the leg ends holding the right bytes, read from its file
 * directly), reads per leg under each read policy, and write-behind with a slow leg (nbdkit's
 * delay filter) killed with SIGKILL mid-load: every acknowledged write reads back, the leg is
 * resynced after it returns and the legs compare byte for byte.
 *
 * Threads: test main thread; the mirror runs in process (worker actors), nbdkit as children.
 * Nothing asserts a duration: waits have generous deadlines.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import type { MirrorDevice, MirrorOptions } from '../../src/engine/mirror.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { scratch, sparseFile, startNbdkit, unixUri, waitFor, type Child, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { assertSameBytes, startInProcessMirror, stopAllMirrors, type InProcessMirror } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;
const kLegBytes = 16 * kMiB;

describe('enbd mirror: read repair, read policy and write-behind over nbdkit legs', { skip: skipUnlessTools('nbdkit'), timeout: 90_000 }, () => {
  let dir: Scratch;
  const children: Child[] = [];
  let seq = 0;

  before(() => {
    dir = scratch('enbd-readpol-');
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
    args: string[];
    filters: string[];
    child: Child;
  }

  function image(name: string): string {
    return sparseFile(dir.path(name), kLegBytes);
  }

  async function startLeg(file: string, filters: string[] = [], params: string[] = []): Promise<Leg> {
    seq += 1;
    const socket = dir.path(`leg${seq}.sock`);
    const args = ['file', file, ...params];
    const child = await startNbdkit(socket, args, filters);
    children.push(child);
    return { file, socket, uri: unixUri(socket), args, filters, child };
  }

  async function mirrorOf(legs: Leg[], name: string, engine: Partial<MirrorOptions>): Promise<InProcessMirror> {
    return await startInProcessMirror({
      legs: legs.map((leg) => leg.uri),
      socketPath: dir.path(`${name}.sock`),
      engine: { legTimeoutMs: 2000, reconnectMinMs: 30, reconnectMaxMs: 300, resyncRates: { minBytesPerSecond: 0, maxBytesPerSecond: 0 }, ...engine },
    });
  }

  function states(device: MirrorDevice): string {
    return device.legStatus().map((leg) => leg.state).join(',');
  }

  test('a READ error is served from the other leg and the range is rewritten on the failing leg', async () => {
    const trigger = dir.path('pread-trigger');
    const legs = [
      await startLeg(image('rr-0.img'), ['--filter=error'], ['error-pread=EIO', 'error-pread-rate=100%', `error-pread-file=${trigger}`]),
      await startLeg(image('rr-1.img')),
    ];
    const mirror = await mirrorOf(legs, 'rr', { readPolicy: 'primary', idleProbeMs: 0 });
    const client = await NbdClient.connect(mirror.uri);
    try {
      const offset = 3 * kMiB;
      const data = randomBytes(256 * 1024);
      await client.write(offset, data);
      await client.flush();
      // Behind the mirror's back the range goes bad on leg 0 (what a failing disk does)...
      const fd = openSync((legs[0] as Leg).file, 'r+');
      writeSync(fd, Buffer.alloc(data.length, 0xee), 0, data.length, offset);
      closeSync(fd);
      // ...and its reads fail: the mirror reads leg 0 first (primary).
      writeFileSync(trigger, '');
      const read = await client.read(offset, data.length);
      rmSync(trigger);
      assertSameBytes(read, data, 'the read is served from leg 1');
      await waitFor(`leg 0 repaired (${states(mirror.device)})`, () => {
        const leg = mirror.device.legStatus()[0];
        return (leg?.readRepairs ?? 0) >= 1 && leg?.state === 'in-sync' && leg.dirtyBytes === 0;
      }, 30_000);
      assert.equal(mirror.device.legStatus()[0]?.failures, 0, 'leg 0 never left the mirror');
      const onLeg = readFileSync((legs[0] as Leg).file).subarray(offset, offset + data.length);
      assertSameBytes(onLeg, data, 'leg 0 holds the right bytes again (read from its file)');
      const again = await client.read(offset, data.length);
      assertSameBytes(again, data, 'and serves them');
      assert.ok((mirror.device.legStatus()[0]?.reads ?? 0) > 0, 'leg 0 serves reads again');
    } finally {
      await client.close();
      await mirror.close();
    }
  });

  test('each read policy picks the legs it should (reads counted per leg)', async () => {
    const legs = [
      await startLeg(image('rp-0.img')),
      // 40 ms, not a few: on a loaded 2-core CI machine the undelayed leg's reads took ~6 ms, and a
      // 5 ms delay was too close to tell the legs apart reliably.
      await startLeg(image('rp-1.img'), ['--filter=delay'], ['rdelay=40ms', 'wdelay=5ms']),
    ];
    const mirror = await mirrorOf(legs, 'rp', { readPolicy: 'primary', writeMostly: [] });
    const client = await NbdClient.connect(mirror.uri);
    const counts = (): number[] => mirror.device.legStatus().map((leg) => leg.reads ?? 0);
    const readBurst = async (count: number): Promise<void> => {
      const reads = [];
      for (let index = 0; index < count; index += 1) reads.push(client.read((index * 64 * 1024) % kLegBytes, 4096));
      await Promise.all(reads);
    };
    try {
      await readBurst(64);
      assert.deepEqual(counts(), [64, 0], 'primary: leg 0 only');
      mirror.device.setReadPolicy('round-robin');
      for (let index = 0; index < 32; index += 1) await client.read(index * 4096, 4096);
      assert.deepEqual(counts(), [80, 16], 'round-robin: turns');
      mirror.device.setReadPolicy('latency');
      // The estimates follow completions: a few unloaded reads first (the 64-read burst above
      // measured leg 0 with a queue), then 8 at a time.
      for (let index = 0; index < 40; index += 1) await client.read(index * 4096, 4096);
      const before = counts();
      for (let round = 0; round < 25; round += 1) await readBurst(8);
      const after = counts();
      const fast = (after[0] ?? 0) - (before[0] ?? 0);
      const slow = (after[1] ?? 0) - (before[1] ?? 0);
      assert.ok(fast >= 0.9 * (fast + slow), `latency: the fast leg served ${fast} of ${fast + slow}; estimates ${mirror.device.legStatus().map((leg) => leg.readLatencyMs).join(", ")}`);
    } finally {
      await client.close();
      await mirror.close();
    }
  });

  test('write-behind: the slow write-mostly leg killed mid-load loses nothing; it resyncs and the legs are identical', async () => {
    const legs = [
      await startLeg(image('wb-0.img')),
      await startLeg(image('wb-1.img'), ['--filter=delay'], ['wdelay=5ms', 'rdelay=5ms']),
    ];
    const mirror = await mirrorOf(legs, 'wb', { writeMostly: [1], writeBehindBytes: 8 * kMiB });
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    const writeSome = async (count: number): Promise<void> => {
      const pending: Array<Promise<void>> = [];
      for (let index = 0; index < count; index += 1) {
        const length = 4096 * (1 + Math.floor(Math.random() * 8));
        const offset = 4096 * Math.floor(Math.random() * ((kLegBytes - length) / 4096));
        const data = randomBytes(length);
        data.copy(model, offset);
        pending.push(client.write(offset, data));
        if (pending.length >= 16) await Promise.all(pending.splice(0));
      }
      await Promise.all(pending);
    };
    try {
      await writeSome(200);
      assert.ok((mirror.device.legStatus()[1]?.deferredWrites ?? 0) > 0, 'writes were acknowledged before leg 1 had them');
      const load = writeSome(400);
      await waitFor('leg 1 behind', () => (mirror.device.legStatus()[1]?.behindBytes ?? 0) > 0, 30_000);
      await (legs[1] as Leg).child.stop('SIGKILL');
      await load; // every write acknowledged (an error would have thrown)
      await waitFor(`leg 1 out (${states(mirror.device)})`, () => mirror.device.legStatus()[1]?.state !== 'in-sync', 30_000);
      await writeSome(100);
      for (let offset = 0; offset < kLegBytes; offset += kMiB) assertSameBytes(await client.read(offset, kMiB), model.subarray(offset, offset + kMiB), `read back at ${offset} while leg 1 is out`);
      const leg = legs[1] as Leg;
      leg.child = await startNbdkit(leg.socket, leg.args, leg.filters);
      children.push(leg.child);
      await waitFor(`both in sync and caught up (${states(mirror.device)})`, () => states(mirror.device) === 'in-sync,in-sync' && (mirror.device.legStatus()[1]?.behindBytes ?? -1) === 0, 60_000);
      await client.flush();
      assert.ok((mirror.device.legStatus()[1]?.resyncedBytes ?? 0) > 0, 'leg 1 was resynced');
      assertSameBytes(readFileSync((legs[0] as Leg).file), model, 'leg 0 holds every acknowledged write');
      assertSameBytes(readFileSync(leg.file), model, 'leg 1 too, byte for byte');
    } finally {
      await client.close();
      await mirror.close();
    }
  });
});
