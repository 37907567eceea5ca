/**
 * The buffer seam with lease handles and the one queue for ring slots (issue 15):
 * - SlotWaiters alone (src/engine/slot-waiters.ts): freed slots go to queued payload-less
 *   requests first (FIFO), then the server is told, then the engine's own waiters wake; queued
 *   records are reused; close fails what is queued and wakes every internal waiter.
 * - Over a real MirrorDevice with two inline file legs and a 4-slot ring: a WRITE's lent slot
 *   comes back at its completion without releaseBuffer (and releasing it then is refused); a
 *   READ's slot stays lent until releaseBuffer(handle); with the ring full, a FLUSH waits, takes
 *   the first freed slot, and the server hears onBufferAvailable only after it; the bytes
 *   written read back.
 * Threads: main only (inline placement).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { truncateSync, writeFileSync } from 'node:fs';
import { SlotWaiters, type QueuedSubmit, type SlotGiver } from '../../../src/engine/slot-waiters.js';
import { MirrorDevice } from '../../../src/engine/mirror.js';
import { createLogger } from '../../../src/core/log.js';
import * as p from '../../../src/nbd/protocol.js';
import { scratch } from '../../helpers/tools.js';

class FakeGiver implements SlotGiver {
  readonly events: string[] = [];
  constructor(public free: number) {}
  allocateOne(): number {
    if (this.free === 0) return -1;
    this.free -= 1;
    return 100 + this.free;
  }
  freeCount(): number {
    return this.free;
  }
  start(slot: number, request: QueuedSubmit): void {
    this.events.push(`start ${request.token} in ${slot}`);
  }
  notifyServer(): void {
    this.events.push('server');
  }
}

test('SlotWaiters: queued submits first (FIFO), then the server, then internal waiters', async () => {
  const waiters = new SlotWaiters();
  const woken: string[] = [];
  waiters.queueSubmit(p.kCmdFlush, 0, 0, 0, 1);
  waiters.queueSubmit(p.kCmdTrim, 0, 4096, 4096, 2);
  waiters.queueSubmit(p.kCmdFlush, 0, 0, 0, 3);
  waiters.serverRefused();
  const internal = waiters.internalWait().then(() => woken.push('internal'));
  assert.equal(waiters.queuedCount, 3);
  assert.equal(waiters.internalCount, 1);

  const giver = new FakeGiver(2);
  waiters.onFreed(giver);
  assert.deepEqual(giver.events, ['start 1 in 101', 'start 2 in 100'], 'two slots: the two oldest start; nobody else hears of it');
  assert.equal(waiters.queuedCount, 1);
  await Promise.resolve();
  assert.deepEqual(woken, [], 'the internal waiter still sleeps');

  giver.free = 3;
  waiters.onFreed(giver);
  assert.deepEqual(giver.events.slice(2), ['start 3 in 102', 'server'], 'the last queued request, then the server once');
  await internal;
  assert.deepEqual(woken, ['internal'], 'slots left: the internal waiter woke');
  waiters.onFreed(giver);
  assert.deepEqual(giver.events.slice(4), [], 'the server is told once per refusal');
});

test('SlotWaiters: queued records are reused; close returns what is queued and wakes internal waiters', async () => {
  const waiters = new SlotWaiters();
  const giver = new FakeGiver(0);
  const seen = new Set<QueuedSubmit>();
  const recording: SlotGiver = { ...giver, allocateOne: () => 7, freeCount: () => 0, start: (_slot, request) => seen.add(request), notifyServer: () => undefined };
  for (let round = 0; round < 50; round += 1) {
    waiters.queueSubmit(p.kCmdFlush, 0, 0, 0, round);
    waiters.onFreed(recording);
  }
  assert.equal(seen.size, 1, 'one record served 50 queued requests');
  waiters.queueSubmit(p.kCmdFlush, 0, 0, 0, 90);
  waiters.queueSubmit(p.kCmdCache, 0, 0, 4096, 91);
  let wakes = 0;
  const asleep = [waiters.internalWait(), waiters.internalWait()].map(async (wait) => {
    await wait;
    wakes += 1;
  });
  const left = waiters.drainAll();
  assert.deepEqual(left.map((queued) => queued.token), [90, 91]);
  await Promise.all(asleep);
  assert.equal(wakes, 2);
  assert.equal(waiters.queuedCount, 0);
});

async function smallMirror(): Promise<MirrorDevice> {
  const dir = scratch('enbd-lease-');
  const legs = [dir.path('a.img'), dir.path('b.img')];
  for (const leg of legs) {
    writeFileSync(leg, '');
    truncateSync(leg, 1 << 20);
  }
  return await MirrorDevice.open({
    legs, placement: 'inline', logger: createLogger({ level: 'silent', pretty: false }),
    ring: { slotCount: 4, slotBytes: 64 * 1024 },
  });
}

test('mirror: a WRITE lease returns at completion, a READ lease at releaseBuffer; a full ring serves a waiting FLUSH before the server', async () => {
  const mirror = await smallMirror();
  try {
    const done = new Map<number, (errno: number) => void>();
    const order: string[] = [];
    mirror.setCompletionHandler((token, errno) => {
      order.push(`done ${token}`);
      done.get(token)?.(errno);
    });
    mirror.onBufferAvailable = () => order.push('buffer available');
    const completion = (token: number): Promise<number> => new Promise<number>((resolve) => done.set(token, resolve));
    const inUse = (): number => mirror.stats().ringSlotsInUse;

    // WRITE: lent, submitted with its handle, back at completion without releaseBuffer
    const write = mirror.acquireBuffer(p.kCmdWrite, 8192, 1);
    assert.ok(write !== null);
    const writeHandle = write.handle;
    write.view.fill(0x5a);
    assert.equal(inUse(), 1);
    const wrote = completion(1);
    mirror.submit(p.kCmdWrite, 0, 65536, 8192, write.view, 1, writeHandle);
    assert.equal(await wrote, 0);
    assert.equal(inUse(), 0, 'the WRITE slot went back at completion');
    assert.throws(() => mirror.releaseBuffer(writeHandle), /lent buffer/, 'releasing a returned WRITE slot is refused');

    // READ: stays lent after completion until releaseBuffer(handle)
    const read = mirror.acquireBuffer(p.kCmdRead, 8192, 2);
    assert.ok(read !== null);
    const { handle: readHandle, view: readView } = read;
    const readDone = completion(2);
    mirror.submit(p.kCmdRead, 0, 65536, 8192, readView, 2, readHandle);
    assert.equal(await readDone, 0);
    assert.ok(readView.every((byte) => byte === 0x5a), 'the written bytes read back');
    assert.equal(inUse(), 1, 'the READ slot is still the server\'s');
    mirror.releaseBuffer(readHandle);
    assert.equal(inUse(), 0);

    // Full ring: 4 READ leases; the server is refused; a FLUSH queues
    const held = [10, 11, 12, 13].map((token) => mirror.acquireBuffer(p.kCmdRead, 4096, token)?.handle ?? -1);
    assert.ok(held.every((handle) => handle >= 0), 'four slots lent');
    assert.equal(mirror.acquireBuffer(p.kCmdRead, 4096, 14), null, 'the ring is full');
    const flushed = completion(20);
    mirror.submit(p.kCmdFlush, 0, 0, 0, null, 20);
    assert.equal(inUse(), 4, 'the FLUSH waits for a slot');
    order.length = 0;
    mirror.releaseBuffer(held[0] as number);
    assert.equal(inUse(), 4, 'the freed slot went to the waiting FLUSH');
    assert.deepEqual(order, ['buffer available'], 'then the server heard of it, once');
    assert.equal(await flushed, 0);
    assert.equal(inUse(), 3, 'the FLUSH slot came back at completion');
    for (const handle of held.slice(1)) mirror.releaseBuffer(handle);
    assert.equal(inUse(), 0);
  } finally {
    await mirror.close();
  }
});
