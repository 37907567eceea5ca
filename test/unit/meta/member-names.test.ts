/**
 * Leg names in the on-leg member table (issue 12): a member's optional `name` survives the
 * superblock's encode/decode, a member without one (metadata written before names) decodes with
 * none, a bad recorded name is refused like any bad field; at assembly a name given on the
 * command line wins, a recorded one is kept when no given name (or earlier leg) holds it, and a
 * leg new to the array does not inherit its slot's old name.
 * Thread: test main thread.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EnbdError } from '../../../src/core/errors.js';
import { planAssembly, superblockFor, type AssemblyOptions, type FoundLeg } from '../../../src/meta/assemble.js';
import { computeLayout, superblockOffsets } from '../../../src/meta/layout.js';
import { inspectCopy, type LegMetaRead } from '../../../src/meta/leg-meta.js';
import { decodeSuperblock, encodeSuperblock, type MemberRecord, type Superblock } from '../../../src/meta/superblock.js';

const kLegBytes = 1024 * 1024;
const kLayout = computeLayout(kLegBytes, 4096);
const kArray = '11111111-aaaa-4aaa-8aaa-000000000001';
const kUuids = ['leg-uuid-slot-0', 'leg-uuid-slot-1'];

function sbOf(slot: number, names: Array<string | undefined>): Superblock {
  const members: MemberRecord[] = names.map((name, at) => ({ legUuid: kUuids[at] as string, state: 'in-sync', events: 5, recoveryOffsetBytes: 0, ...(name !== undefined ? { name } : {}) }));
  return superblockFor({ arrayUuid: kArray, arrayName: 'test', createdMs: 1, layout: kLayout }, kLayout, { slotIndex: slot, legUuid: kUuids[slot] as string }, members, 5, 'clean', null, 1000);
}

function legOf(uri: string, superblock: Superblock): FoundLeg {
  const offsets = superblockOffsets(kLegBytes);
  const copies: LegMetaRead['copies'] = [inspectCopy(0, offsets[0], encodeSuperblock(superblock, 0, 1)), inspectCopy(1, offsets[1], encodeSuperblock(superblock, 1, 2))];
  const read: LegMetaRead = { legSizeBytes: kLegBytes, copies, usedCopy: 1, superblock: copies[1].superblock ?? null, hasMetadata: true };
  return { uri, read, bitmap: new Uint8Array(kLayout.bitmapBytes) };
}

function opts(legNames: Array<string | null>): AssemblyOptions {
  return { forceSource: null, degraded: false, nowMs: 2000, host: 'here', pid: 1, pidAlive: () => false, newUuid: () => 'new-uuid', legNames };
}

function namesOf(members: MemberRecord[]): Array<string | undefined> {
  return members.map((member) => member.name);
}

test('superblock: member names round-trip; a member without one decodes without one', () => {
  const named = decodeSuperblock(encodeSuperblock(sbOf(0, ['fast', 'a']), 0, 1)).superblock;
  assert.deepEqual(namesOf(named.members), ['fast', 'a']);
  const old = decodeSuperblock(encodeSuperblock(sbOf(0, [undefined, undefined]), 0, 1)).superblock;
  assert.deepEqual(namesOf(old.members), [undefined, undefined]);
  assert.ok(!('name' in (old.members[0] as MemberRecord)), 'no name key at all for an unnamed member');
  assert.throws(() => decodeSuperblock(encodeSuperblock(sbOf(0, ['a b', undefined]), 0, 1)), (error: unknown) =>
    error instanceof EnbdError && error.code === 'ENBD_ERR_META' && /member 0 has a bad name/.test(error.message));
});

test('assembly: recorded names kept, given names win, a clash keeps the given one', () => {
  const found = (): FoundLeg[] => [legOf('leg0', sbOf(0, ['fast', 'a'])), legOf('leg1', sbOf(1, ['fast', 'a']))];
  assert.deepEqual(namesOf(planAssembly(found(), opts([null, null])).members), ['fast', 'a']);
  assert.deepEqual(namesOf(planAssembly(found(), opts(['other', null])).members), ['other', 'a']);
  assert.deepEqual(namesOf(planAssembly(found(), opts([null, 'fast'])).members), [undefined, 'fast'], 'leg 1 is given fast: leg 0 gives its recorded name up');
  const unnamed = [legOf('leg0', sbOf(0, [undefined, undefined])), legOf('leg1', sbOf(1, [undefined, undefined]))];
  assert.deepEqual(namesOf(planAssembly(unnamed, opts([null, null])).members), [undefined, undefined], 'old metadata: no names, the engine picks automatic ones');
});
