/**
 * Issue 10 findings 2 and 6, device/actor half: a LegActor (inline, over its own ring, queues
 * and doorbell, as the mirror builds them) against real nbdkit legs.
 * - Fence: a leg whose WRITE timed out still applies it later (nbdkit eval plugin whose pwrite
 *   sleeps before writing the file); fence() resolves ok only once that late write is in the
 *   file (the server finished it and closed after NBD_CMD_DISC). A leg that never finishes
 *   (pause filter) is not ok within the fence timeout, and ok on a later fence once it does.
 * - Idle probe: a leg that stops answering while idle (SIGTERM, SIGSTOP) is reported as a drop
 *   (the per-leg events counter) although no request was sent to it.
 * - Probation probe: READ + WRITE back + FLUSH of block 0 on a healthy leg (seen in nbdkit's
 *   log, data unchanged); not ok on a leg whose writes hang or fail.
 * - A hung leg's disconnect() still ends, acking what it held with EIO.
 * Threads: test main thread (the actor runs inline); legs are nbdkit child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { createLogger } from '../../src/core/log.js';
import { LegActor } from '../../src/engine/leg-actor.js';
import type { LegActorInit } from '../../src/engine/messages.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import * as p from '../../src/nbd/protocol.js';
import { kMaxLegs } from '../../src/ring/layout.js';
import { RequestRing } from '../../src/ring/request-ring.js';
import { Doorbell, SpscQueue } from '../../src/ring/spsc-queue.js';
import { readRange, requires, scratch, startNbdkit, stopProcess, unixUri, waitFor, type Child, type Scratch } from '../helpers/tools.js';

const kMiB = 1024 * 1024;
const kBlockBytes = 4096;
const logger = createLogger({ level: 'silent', pretty: false });

/** One leg actor with the ring, queues and doorbell the mirror would give it (leg 0). */
class Harness {
  readonly ring = RequestRing.create({ slotCount: 8, slotBytes: 64 * 1024 });
  readonly dispatch = SpscQueue.create(8);
  readonly completion = SpscQueue.create(8);
  readonly doorbell = Doorbell.create();
  readonly events = new Int32Array(new SharedArrayBuffer(kMaxLegs * 4));
  readonly actor: LegActor;

  constructor(uri: string, options: { requestTimeoutMs?: number; idleProbeMs?: number } = {}) {
    const init: LegActorInit = {
      legIndex: 0,
      uri,
      ring: this.ring.buffers,
      dispatch: this.dispatch.buffer,
      completion: this.completion.buffer,
      doorbell: this.doorbell.buffer,
      events: this.events.buffer as SharedArrayBuffer,
      logLevel: 'silent',
      connectTimeoutMs: 5000,
      requestTimeoutMs: options.requestTimeoutMs ?? 0,
      idleProbeMs: options.idleProbeMs ?? 0,
    };
    this.actor = new LegActor(init, logger);
  }

  async open(): Promise<void> {
    const info = await this.actor.open();
    assert.ok(!('error' in info), `leg opens: ${'error' in info ? info.error.message : ''}`);
  }

  get drops(): number {
    return Atomics.load(this.events, 0);
  }

  /** Dispatches one request to the leg; resolves with the slot once the actor handed it back. */
  dispatchRequest(command: number, offsetBytes: number, data: Uint8Array | null, lengthBytes = data?.length ?? 0): number {
    const slot = this.ring.allocate(1);
    assert.ok(slot >= 0, 'a free slot');
    this.ring.setRequest(slot, command, 0, offsetBytes, lengthBytes, 1, 1);
    if (data !== null && command === p.kCmdWrite) this.ring.slotData(slot).set(data);
    this.ring.markDispatched(slot);
    assert.ok(this.dispatch.push(slot), 'dispatch queue has room');
    return slot;
  }

  /** Waits for `slot` on the completion queue; returns leg 0's errno for it and frees it. */
  async completed(slot: number, what: string, timeoutMs = 15_000): Promise<number> {
    let seen = -1;
    await waitFor(`completion of ${what}`, () => {
      const next = this.completion.pop();
      if (next >= 0) {
        assert.equal(next, slot, 'the dispatched slot comes back');
        seen = next;
      }
      return seen >= 0;
    }, timeoutMs);
    const errno = this.ring.legErrno(slot, 0);
    assert.equal(this.ring.visitedMask(slot), 1, 'leg 0 acked');
    this.ring.free(slot);
    return errno;
  }
}

function image(dir: Scratch, name: string, sizeBytes = kMiB): string {
  const path = dir.path(name);
  writeFileSync(path, '');
  truncateSync(path, sizeBytes);
  return path;
}

/** Sends one control byte to nbdkit's pause filter and returns its one-byte answer. */
async function pauseControl(socketPath: string, command: 'p' | 'r'): Promise<string> {
  return await new Promise((resolve, reject) => {
    const socket = connect(socketPath);
    socket.once('error', reject);
    socket.once('connect', () => socket.write(command));
    socket.once('data', (data) => {
      socket.destroy();
      resolve(data.toString());
    });
  });
}

async function waitForAsync(what: string, predicate: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(25);
  }
}

describe('leg actor: fence, idle probe, probation probe against nbdkit', { timeout: 90_000 }, () => {
  let dir: Scratch;
  const children: Child[] = [];
  const harnesses: Harness[] = [];
  let seq = 0;

  before(() => {
    dir = scratch('enbd-leg-fence-');
  });

  after(async () => {
    await Promise.all(children.map(async (child) => {
      child.process.kill('SIGCONT');
      await child.stop('SIGKILL');
    }));
    await Promise.all(harnesses.map(async (harness) => await harness.actor.shutdown()));
    dir?.cleanup();
  });

  async function leg(plugin: string[], extra: string[] = []): Promise<{ uri: string; child: Child; socket: string }> {
    seq += 1;
    const socket = dir.path(`leg${seq}.sock`);
    const child = await startNbdkit(socket, plugin, extra);
    children.push(child);
    return { uri: unixUri(socket), child, socket };
  }

  function harness(uri: string, options: { requestTimeoutMs?: number; idleProbeMs?: number } = {}): Harness {
    const made = new Harness(uri, options);
    harnesses.push(made);
    return made;
  }

  test('zombie write: the timed-out WRITE lands after its EIO, and fence() is ok only after it landed', async (t) => {
    if (!requires(t, 'nbdkit')) return;
    const file = image(dir, 'zombie.img');
    const { uri } = await leg([
      'eval',
      `get_size=stat -c %s ${file}`,
      `pread=dd if=${file} iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none`,
      `pwrite=sleep 4; dd of=${file} oflag=seek_bytes conv=notrunc seek=$4 status=none`,
      'can_write=exit 0',
    ]);
    const legActor = harness(uri, { requestTimeoutMs: 500 });
    await legActor.open();
    const offsetBytes = 8 * kBlockBytes;
    const data = Buffer.alloc(kBlockBytes, 0x5a);
    const slot = legActor.dispatchRequest(p.kCmdWrite, offsetBytes, data);
    assert.equal(await legActor.completed(slot, 'the slow WRITE'), p.kEIo, 'the WRITE times out with EIO');
    assert.ok(readRange(file, offsetBytes, kBlockBytes).every((byte) => byte === 0), 'the leg has not applied it yet when the EIO comes');

    const fenced = await legActor.actor.fence(10_000);
    assert.deepEqual(fenced, { ok: true });
    assert.deepEqual(readRange(file, offsetBytes, kBlockBytes), data, 'when fence() is ok, the late write is in the file');

    // Fenced: new work fails with EIO at once; a second fence is ok at once.
    const later = legActor.dispatchRequest(p.kCmdWrite, 0, Buffer.alloc(kBlockBytes, 1));
    assert.equal(await legActor.completed(later, 'a WRITE after the fence'), p.kEIo);
    assert.deepEqual(await legActor.actor.fence(10), { ok: true });
    assert.equal(legActor.drops, 1, 'the timeout was reported once as a drop');
  });

  test('a leg whose server never finishes: fence() is not ok within its timeout; a later fence() is, once it finished', async (t) => {
    if (!requires(t, 'nbdkit')) return;
    const control = dir.path('pause.ctl');
    const { uri } = await leg(['memory', '1M', `pause-control=${control}`], ['--filter=pause']);
    const legActor = harness(uri, { requestTimeoutMs: 500 });
    await legActor.open();
    assert.equal(await pauseControl(control, 'p'), 'P');
    const slot = legActor.dispatchRequest(p.kCmdWrite, 0, Buffer.alloc(kBlockBytes, 7));
    assert.equal(await legActor.completed(slot, 'the paused WRITE'), p.kEIo);
    const first = await legActor.actor.fence(1000);
    assert.equal(first.ok, false);
    assert.ok(!first.ok && /not fenced within 1000 ms/.test(first.reason), `names the timeout: ${JSON.stringify(first)}`);
    assert.equal(await pauseControl(control, 'r'), 'R');
    assert.deepEqual(await legActor.actor.fence(10_000), { ok: true }, 'once the server finished and closed, the fence holds');
    const info = await legActor.actor.reconnect();
    assert.ok(!('error' in info), 'the leg reconnects after the fence');
    const read = legActor.dispatchRequest(p.kCmdRead, 0, null, kBlockBytes);
    assert.equal(await legActor.completed(read, 'a READ on the new connection'), 0);
    assert.ok(legActor.ring.slotData(read).subarray(0, kBlockBytes).every((byte) => byte === 7), 'the paused write landed before the close');
  });

  test('NbdClient.fence on a healthy connection: true once the server closed after DISC; in-flight requests fail EIO', async (t) => {
    if (!requires(t, 'nbdkit')) return;
    const { uri } = await leg(['memory', '1M', 'delay-read=1'], ['--filter=delay']);
    const client = await NbdClient.connect(uri);
    const completions: [number, number][] = [];
    client.setCompletionHandler((token, errno) => completions.push([token, errno]));
    client.submit(p.kCmdRead, 0, 0, kBlockBytes, Buffer.alloc(kBlockBytes), 42);
    const fenced = client.fence(10_000);
    assert.deepEqual(completions, [[42, p.kEIo]], 'the request in flight completes with EIO at once');
    assert.equal(await fenced, true);
    assert.equal(client.isConnected, false);
    assert.equal(await client.fence(10), true, 'already closed: true at once');
    await client.close();
  });

  test('NbdClient.fence: a server that is gone proves the fence; a socket we cut ourselves never does', async (t) => {
    if (!requires(t, 'nbdkit')) return;
    const killed = await leg(['memory', '1M']);
    const lost = await NbdClient.connect(killed.uri);
    lost.setCompletionHandler(() => undefined);
    await killed.child.stop('SIGKILL');
    await waitFor('the client to see the close', () => !lost.isConnected);
    assert.equal(await lost.fence(10), true, 'closed by the peer: nothing can land any more');

    const slow = await leg(['memory', '1M', 'delay-read=30'], ['--filter=delay']);
    const cut = await NbdClient.connect(slow.uri);
    const errnos: number[] = [];
    cut.setCompletionHandler((_token, errno) => errnos.push(errno));
    cut.submit(p.kCmdRead, 0, 0, kBlockBytes, Buffer.alloc(kBlockBytes), 1);
    cut.destroy();
    assert.deepEqual(errnos, [p.kEIo]);
    assert.equal(await cut.fence(1000), false, 'the server may still hold the READ');
  });

  test('a hung leg (SIGSTOP) with a request in flight: disconnect() still ends and acks it with EIO', async (t) => {
    if (!requires(t, 'nbdkit')) return;
    const { uri, child } = await leg(['memory', '1M']);
    const legActor = harness(uri);
    await legActor.open();
    await stopProcess(child.process.pid ?? -1);
    const slot = legActor.dispatchRequest(p.kCmdRead, 0, null, kBlockBytes);
    await waitForAsync('the READ reached the leg', async () => (await legActor.actor.stats()).requests === 1);
    await legActor.actor.disconnect();
    assert.equal(await legActor.completed(slot, 'the READ on the hung leg'), p.kEIo);
    child.process.kill('SIGCONT');
  });

  for (const signal of ['SIGTERM', 'SIGSTOP'] as const) {
    test(`idle probe: a leg that stops answering while idle (${signal}) is reported as a drop`, async (t) => {
      if (!requires(t, 'nbdkit')) return;
      const log = dir.path(`idle-${signal}.log`);
      const { uri, child } = await leg(['memory', '1M', `logfile=${log}`], ['--filter=log']);
      const legActor = harness(uri, { idleProbeMs: 300 });
      await legActor.open();
      await waitFor('idle probes in the leg log', () => (readFileSync(log, 'utf8').match(/Read id=\d+ offset=0x0 count=0x1 /g) ?? []).length >= 2);
      assert.equal(legActor.drops, 0, 'a healthy idle leg is not reported');
      assert.equal((await legActor.actor.stats()).connected, true);
      child.process.kill(signal);
      await waitFor(`a drop after ${signal}`, () => legActor.drops > 0, 8000);
      assert.equal((await legActor.actor.stats()).connected, false);
      assert.equal(legActor.drops, 1, 'reported once');
      child.process.kill('SIGCONT');
    });
  }

  test('probation probe: READ, WRITE back, FLUSH of block 0 on a healthy leg; the data is unchanged', async (t) => {
    if (!requires(t, 'nbdkit')) return;
    const file = image(dir, 'probe.img');
    const pattern = Buffer.alloc(kBlockBytes);
    for (let index = 0; index < pattern.length; index += 1) pattern[index] = (index * 7 + 3) & 0xff;
    const whole = readFileSync(file);
    pattern.copy(whole, 0);
    writeFileSync(file, whole);
    const log = dir.path('probe.log');
    const { uri } = await leg(['file', file, `logfile=${log}`], ['--filter=log']);
    const legActor = harness(uri);
    await legActor.open();
    assert.deepEqual(await legActor.actor.probe(5000), { ok: true });
    const lines = readFileSync(log, 'utf8');
    assert.match(lines, /Read id=\d+ offset=0x0 count=0x1000 /);
    assert.match(lines, /Write id=\d+ offset=0x0 count=0x1000 /);
    assert.match(lines, /Flush id=\d+/);
    assert.deepEqual(readRange(file, 0, kBlockBytes), pattern, 'the probe wrote back exactly what the leg held');
    assert.deepEqual(await harness(uri).actor.probe(1000), { ok: false, reason: 'not connected' });
  });

  test('probation probe: not ok within its timeout on a leg whose writes hang', async (t) => {
    if (!requires(t, 'nbdkit')) return;
    const { uri } = await leg(['memory', '1M', 'delay-write=30'], ['--filter=delay']);
    const legActor = harness(uri);
    await legActor.open();
    const result = await legActor.actor.probe(1000);
    assert.equal(result.ok, false);
    assert.ok(!result.ok && /WRITE at 0\+4096 not answered/.test(result.reason), JSON.stringify(result));
  });

  test('probation probe: not ok on a leg that fails writes, naming the errno', async (t) => {
    if (!requires(t, 'nbdkit')) return;
    const { uri } = await leg(['memory', '1M', 'error-pwrite=EIO', 'error-pwrite-rate=100%'], ['--filter=error']);
    const legActor = harness(uri);
    await legActor.open();
    const result = await legActor.actor.probe(5000);
    assert.equal(result.ok, false);
    assert.ok(!result.ok && /WRITE at 0\+4096 failed: EIO/.test(result.reason), JSON.stringify(result));
  });

  test('file leg: fence is ok at once and later work fails with EIO', async () => {
    const file = image(dir, 'file-leg.img');
    const legActor = harness(`file://${file}`, { idleProbeMs: 200 });
    await legActor.open();
    const write = legActor.dispatchRequest(p.kCmdWrite, 0, Buffer.alloc(kBlockBytes, 9));
    assert.equal(await legActor.completed(write, 'a file WRITE'), 0);
    assert.deepEqual(await legActor.actor.probe(1000), { ok: true });
    assert.deepEqual(await legActor.actor.fence(1000), { ok: true });
    const later = legActor.dispatchRequest(p.kCmdWrite, 0, Buffer.alloc(kBlockBytes, 1));
    assert.equal(await legActor.completed(later, 'a WRITE after the fence'), p.kEIo);
    assert.ok(readRange(file, 0, kBlockBytes).every((byte) => byte === 9));
    assert.equal(legActor.drops, 0);
  });
});
