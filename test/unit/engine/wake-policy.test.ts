/**
 * Wake-up policy (src/engine/wake-policy.ts) and the spin statistics it is measured by: the
 * budgets by CPU count and ENBD_SPIN_US, and, over a real mirror with inline file legs, that the
 * counters move the way the protocol says (a spinning master is not notified for completions it
 * polls; with no budget every consumer that runs empty sleeps) while every write reads back.
 * Threads: main only (inline placement).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { truncateSync, writeFileSync } from 'node:fs';
import { defaultWakePolicy, kActorSpinMicrosDefault, kMasterSpinMicrosDefault, kSpinMicrosMax, SpinWindow } from '../../../src/engine/wake-policy.js';
import { MirrorDevice } from '../../../src/engine/mirror.js';
import { createLogger } from '../../../src/core/log.js';
import { scratch } from '../../helpers/tools.js';

test('budgets: 0 on one CPU, the defaults (0 today) with more, ENBD_SPIN_US overrides and is clamped', () => {
  assert.deepEqual(defaultWakePolicy(1, {}), { actorSpinMicros: 0, masterSpinMicros: 0 });
  assert.equal(defaultWakePolicy(2, {}).actorSpinMicros, kActorSpinMicrosDefault);
  assert.equal(defaultWakePolicy(16, {}).masterSpinMicros, kMasterSpinMicrosDefault);
  assert.deepEqual(defaultWakePolicy(8, { ENBD_SPIN_US: '0' }), { actorSpinMicros: 0, masterSpinMicros: 0 });
  assert.deepEqual(defaultWakePolicy(1, { ENBD_SPIN_US: '120' }), { actorSpinMicros: 120, masterSpinMicros: 120 });
  assert.equal(defaultWakePolicy(2, { ENBD_SPIN_US: '1e9' }).actorSpinMicros, kSpinMicrosMax);
  assert.equal(defaultWakePolicy(2, { ENBD_SPIN_US: '-5' }).actorSpinMicros, 0);
  assert.equal(defaultWakePolicy(8, { ENBD_SPIN_US: 'fast' }).actorSpinMicros, kActorSpinMicrosDefault, 'not a number: ignored');
  assert.equal(defaultWakePolicy(1, { ENBD_SPIN_US: '' }).actorSpinMicros, 0, 'empty: unset');
});

test('SpinWindow: no budget never polls; a window opens at the first empty check, counts a hit, and closes after its budget', async () => {
  const off = new SpinWindow(0);
  assert.equal(off.pollAgain(), false, 'budget 0: sleep at once');
  assert.equal(off.worked(), false, 'no window, no hit');
  const wide = new SpinWindow(kSpinMicrosMax * 1000);
  assert.equal(wide.worked(), false, 'work without polling first is no hit');
  assert.equal(wide.pollAgain(), true, 'the first empty check opens the window');
  assert.equal(wide.pollAgain(), true, 'still inside it');
  assert.equal(wide.worked(), true, 'work found while polling: a hit');
  assert.equal(wide.worked(), false, 'the hit closed the window');
  const short = new SpinWindow(1000); // 1 ms
  assert.equal(short.pollAgain(), true);
  await new Promise((resolve) => setTimeout(resolve, 5));
  assert.equal(short.pollAgain(), false, 'past the budget: sleep');
  assert.equal(short.worked(), false, 'the window closed when it ran out');
  assert.equal(short.pollAgain(), true, 'the next empty check opens a new window');
});

async function writeAndRead(spinMicros: number): Promise<ReturnType<MirrorDevice['wakeCounters']>> {
  const dir = scratch('enbd-wake-');
  const legs = [dir.path('a.img'), dir.path('b.img')];
  for (const leg of legs) {
    writeFileSync(leg, '');
    truncateSync(leg, 4 << 20);
  }
  const mirror = await MirrorDevice.open({
    legs, placement: 'inline', logger: createLogger({ level: 'silent', pretty: false }),
    wakePolicy: { actorSpinMicros: spinMicros, masterSpinMicros: spinMicros },
  });
  try {
    const pending = new Map<number, (errno: number) => void>();
    mirror.setCompletionHandler((token, errno) => pending.get(token)?.(errno));
    // The server's buffer seam: acquire a ring slot, fill it (WRITE), submit with its handle,
    // read it and release it (READ; a WRITE's slot returns at completion).
    const request = async (command: number, offset: number, data: Buffer, token: number): Promise<number> => {
      const lease = mirror.acquireBuffer(command, data.length, token);
      assert.ok(lease !== null, 'a free ring slot');
      const { handle, view } = lease;
      if (command === 1) view.set(data);
      const errno = await new Promise<number>((resolve) => {
        pending.set(token, resolve);
        mirror.submit(command, 0, offset, data.length, view, token, handle);
      });
      if (command === 0) {
        data.set(view);
        mirror.releaseBuffer(handle);
      }
      return errno;
    };
    for (let round = 0; round < 20; round += 1) {
      const data = Buffer.alloc(4096, round + 1);
      assert.equal(await request(1, round * 4096, data, 2 * round), 0, 'write ok');
      const back = Buffer.alloc(4096);
      assert.equal(await request(0, round * 4096, back, 2 * round + 1), 0, 'read ok');
      assert.deepEqual(back, data, `block ${round} reads back`);
      await new Promise((resolve) => setTimeout(resolve, 2)); // idle: every consumer runs empty
    }
    return mirror.wakeCounters();
  } finally {
    await mirror.close();
    dir.cleanup();
  }
}

test('no budget: consumers sleep when they run empty; a budget lets polls find work without a sleep', async () => {
  const none = await writeAndRead(0);
  assert.ok(none.requests >= 40, `requests counted: ${none.requests}`);
  assert.equal(none.actorSpinHits + none.masterSpinHits, 0, 'no polls without a budget');
  assert.ok(none.actorSleeps >= 20 && none.masterSleeps >= 20, `every idle gap is a sleep: ${JSON.stringify(none)}`);
  const spinning = await writeAndRead(kSpinMicrosMax);
  assert.ok(spinning.actorSpinHits + spinning.masterSpinHits > 0, `a 1 ms poll finds the next completion or dispatch: ${JSON.stringify(spinning)}`);
});
