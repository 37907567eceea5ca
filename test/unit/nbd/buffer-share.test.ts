/**
 * The fair share of device buffers (src/nbd/server/buffer-share.ts): the share arithmetic, each row
 * of the decision table, charging in whole units, the issue-10 scenario (stalled 32 MiB WRITEs
 * on a 64 MiB ring), option errors, and a model-based check (fast-check) that the counters
 * match the users' state after any sequence of acquire / release / want steps and that a
 * newcomer's one-unit request is never refused by the share.
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { BufferShare, fairShareBytes, mayAcquireShare, type ShareUser } from '../../../src/nbd/server/buffer-share.js';

const kMiB = 1024 * 1024;
const kRingBytes = 64 * kMiB;
const kSlotBytes = 256 * 1024;

function user(): ShareUser {
  return { shareHeldBytes: 0, shareWanting: false };
}

test('share = capacity / (active + 1)', () => {
  assert.equal(fairShareBytes(kRingBytes, 1), 32 * kMiB);
  assert.equal(fairShareBytes(kRingBytes, 3), 16 * kMiB);
  assert.equal(fairShareBytes(100, 2), 33);
  assert.throws(() => fairShareBytes(kRingBytes, 0), /asker is active/);
});

test('within the share: may acquire, whatever the others hold', () => {
  assert.equal(mayAcquireShare(kRingBytes, 2, 60 * kMiB, 0, 4 * kMiB), true);
  assert.equal(mayAcquireShare(kRingBytes, 2, 30 * kMiB, 10 * kMiB, 11 * kMiB), true);
});

test('over the share while holding something: waits for its own releases', () => {
  assert.equal(mayAcquireShare(kRingBytes, 2, 20 * kMiB, 20 * kMiB, 2 * kMiB), false);
  // Alone too: a single connection keeps to half the capacity once it holds something.
  assert.equal(mayAcquireShare(kRingBytes, 1, 32 * kMiB, 32 * kMiB, kSlotBytes), false);
});

test('one request over the share: alone always, with others only while a share stays free', () => {
  assert.equal(mayAcquireShare(kRingBytes, 1, 0, 0, 64 * kMiB), true);
  // 2 active: share 21.3 MiB; 32 MiB more with nothing held elsewhere leaves 32 >= 21.3 free.
  assert.equal(mayAcquireShare(kRingBytes, 2, 0, 0, 32 * kMiB), true);
  // Another connection holds 32 MiB: 32 + 32 + 21.3 > 64.
  assert.equal(mayAcquireShare(kRingBytes, 2, 32 * kMiB, 0, 32 * kMiB), false);
  assert.equal(mayAcquireShare(kRingBytes, 2, 10 * kMiB, 0, 32 * kMiB), true);
});

test('charges are whole units, at least one', () => {
  const share = new BufferShare(kRingBytes, kSlotBytes);
  assert.equal(share.chargeFor(0), kSlotBytes);
  assert.equal(share.chargeFor(4096), kSlotBytes);
  assert.equal(share.chargeFor(kSlotBytes), kSlotBytes);
  assert.equal(share.chargeFor(kSlotBytes + 1), 2 * kSlotBytes);
  assert.equal(share.chargeFor(32 * kMiB), 32 * kMiB);
  // Without a unit from the device: capacity / 256, at least 4 KiB.
  assert.equal(new BufferShare(kRingBytes, undefined).unitBytes, kSlotBytes);
  assert.equal(new BufferShare(64 * 1024, undefined).unitBytes, 4096);
});

test('bad capacity or unit: OptionError (ENBD_ERR_OPTION) naming the device field', () => {
  assert.throws(() => new BufferShare(0, undefined), { name: 'OptionError', code: 'ENBD_ERR_OPTION', message: /bufferCapacityBytes/ });
  assert.throws(() => new BufferShare(1.5, undefined), { name: 'OptionError', code: 'ENBD_ERR_OPTION', message: /bufferCapacityBytes/ });
  assert.throws(() => new BufferShare(kRingBytes, 0), { name: 'OptionError', code: 'ENBD_ERR_OPTION', message: /bufferUnitBytes/ });
  assert.throws(() => new BufferShare(kRingBytes, kRingBytes * 2), { name: 'OptionError', code: 'ENBD_ERR_OPTION', message: /bufferUnitBytes/ });
});

test('issue 10: three stalled 32 MiB WRITEs on a 64 MiB ring leave room for a 4 KiB request', () => {
  const share = new BufferShare(kRingBytes, kSlotBytes);
  const stallers = [user(), user(), user()];
  const charge = share.chargeFor(32 * kMiB);
  const [first, second, third] = stallers as [ShareUser, ShareUser, ShareUser];
  assert.equal(share.mayAcquire(first, charge), true);
  share.acquired(first, charge);
  for (const waiting of [second, third]) {
    assert.equal(share.mayAcquire(waiting, charge), false, 'a second 32 MiB would fill the ring');
    share.setWanting(waiting, true);
  }
  assert.equal(share.activeCount, 3);
  const victim = user();
  assert.equal(share.mayAcquire(victim, share.chargeFor(4096)), true);
  share.acquired(victim, share.chargeFor(4096));
  assert.equal(share.heldTotalBytes, 32 * kMiB + kSlotBytes);
  // The first staller is closed (payload timeout) and the victim is done: the next one may go.
  share.released(first, charge);
  share.released(victim, kSlotBytes);
  assert.equal(share.activeCount, 2);
  assert.equal(share.mayAcquire(second, charge), true);
});

test('release of more than held, or of nothing acquired, is a programmer error', () => {
  const share = new BufferShare(kRingBytes, kSlotBytes);
  const someone = user();
  share.acquired(someone, kSlotBytes);
  assert.throws(() => share.released(someone, 2 * kSlotBytes), /released what was acquired/);
  assert.throws(() => share.acquired(someone, 0), /acquired a charged buffer/);
});

type Step = { kind: 'acquire' | 'release' | 'want' | 'unwant'; who: number; units: number };

const stepArb: fc.Arbitrary<Step> = fc.record({
  kind: fc.constantFrom<Step['kind']>('acquire', 'release', 'want', 'unwant'),
  who: fc.integer({ min: 0, max: 9 }),
  units: fc.integer({ min: 1, max: 40 }),
});

test('model: counters match the users, and a newcomer one unit is never refused by the share', () => {
  fc.assert(
    fc.property(fc.array(stepArb, { maxLength: 200 }), (steps) => {
      const share = new BufferShare(kRingBytes, kSlotBytes);
      const users = Array.from({ length: 10 }, user);
      const held: number[][] = users.map(() => []);
      for (const step of steps) {
        const who = users[step.who] as ShareUser;
        const charges = held[step.who] as number[];
        if (step.kind === 'acquire') {
          const charge = share.chargeFor(step.units * kSlotBytes);
          // Only what the device could hold, and only what the share allows.
          if (share.heldTotalBytes + charge <= kRingBytes && share.mayAcquire(who, charge)) {
            share.acquired(who, charge);
            charges.push(charge);
          }
        } else if (step.kind === 'release') {
          const charge = charges.pop();
          if (charge !== undefined) share.released(who, charge);
        } else {
          share.setWanting(who, step.kind === 'want');
        }
        const total = held.flat().reduce((sum, charge) => sum + charge, 0);
        assert.equal(share.heldTotalBytes, total);
        const active = users.filter((each) => each.shareHeldBytes > 0 || each.shareWanting).length;
        assert.equal(share.activeCount, active);
        users.forEach((each, index) => {
          assert.equal(each.shareHeldBytes, (held[index] as number[]).reduce((sum, charge) => sum + charge, 0));
        });
        assert.equal(share.mayAcquire(user(), kSlotBytes), true, 'a newcomer may ask for one unit');
      }
    }),
    { numRuns: propertyRuns(300) },
  );
});
