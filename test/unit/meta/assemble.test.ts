/**
 * Assembly rules (src/meta/assemble.ts, `planAssembly`): one test per row of the rules table in
 * its header, on FoundLeg values built from real encoded superblocks (encodeSuperblock, then
 * inspectCopy as LegMeta.read does), asserting each leg's role, the member table the plan
 * writes (states; events = max + 1 for in-sync members), the union bitmap, and that refusals
 * throw EnbdError('ENBD_ERR_META') with a message naming what to do. One end-to-end case runs
 * createArray + assembleArray over MemoryDevices and reads the claim back.
 *
 * Then a fast-check property: random histories of a 3-leg array (a leg fails, returns, resyncs;
 * heartbeats; the daemon crashes or stops cleanly; it starts again on any subset of the legs,
 * --degraded when members are missing; a leg is wiped). A small model plays the MetaKeeper's
 * superblock writes (what each leg's superblock would say) and tracks which acknowledged writes
 * each leg holds. At every start it checks planAssembly:
 *   S1 it never picks as in-sync a leg lacking an acknowledged write another given leg holds;
 *   S2 it refuses when given legs hold writes the others lack and no given leg holds them all
 *      (split brain), and --force-source then accepts, with only the named leg in sync;
 *   S3 it refuses nothing else, except when no given leg holds the data the array last served
 *      (the metadata then rightly finds no leg known up to date) or every given leg is blank;
 *   S4 after an unclean stop exactly one leg is in sync.
 * The model takes the worst case the metadata must assume: every run takes writes, and a leg
 * fails on a write the others take (so "ran without the other" always means divergence).
 * Model limits (documented, not bugs): the last in-sync leg never fails (the engine then has no
 * source; what it does is not modelled); writes in flight at a crash are not modelled (the
 * bitmap covers them; test/unit/engine/meta-keeper.test.ts checks the bitmap rules).
 *
 * Runs: ENBD_ASSEMBLE_RUNS (default 400), fixed seed under CI=true, ENBD_ASSEMBLE_SEED wins;
 * ENBD_ASSEMBLE_NO_WIPE=1 leaves out wiped legs (the known replaced-leg split brain);
 * ENBD_ASSEMBLE_SAFETY_ONLY=1 turns S3 off (needless refusals pass; unsafe plans still fail).
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { EnbdError } from '../../../src/core/errors.js';
import { planAssembly, assembleArray, superblockFor, type AssemblyOptions, type AssemblyPlan, type FoundLeg } from '../../../src/meta/assemble.js';
import { createArray } from '../../../src/meta/create-array.js';
import { computeLayout, superblockOffsets, type LegLayout } from '../../../src/meta/layout.js';
import { LegMeta, bitmapSet, bitmapTest, inspectCopy, type LegMetaRead } from '../../../src/meta/leg-meta.js';
import { encodeSuperblock, kGenerationsMax, nextGenerations, type ArrayState, type MemberRecord, type MemberState, type OwnerRecord, type Superblock } from '../../../src/meta/superblock.js';
import { MemoryDevice } from '../../helpers/memory-device.js';

const kLegBytes = 1024 * 1024;
const kLayout = computeLayout(kLegBytes, 4096);
const kArray = '11111111-aaaa-4aaa-8aaa-000000000001';
const kOtherArray = '22222222-bbbb-4bbb-8bbb-000000000002';
const kUuids = ['leg-uuid-slot-0', 'leg-uuid-slot-1', 'leg-uuid-slot-2'];
const kHost = 'this-host';
const kPid = 4242;
const kNow = 1_900_000_000_000;
const kRuns = Number(process.env['ENBD_ASSEMBLE_RUNS'] ?? 400);
const kCiSeed = 20261201;
const kSeed = process.env['ENBD_ASSEMBLE_SEED'] !== undefined ? Number(process.env['ENBD_ASSEMBLE_SEED']) : process.env['CI'] === 'true' ? kCiSeed : undefined;

// ---- building FoundLeg values from encoded superblocks ---------------------------------------

interface SbSpec {
  slot: number;
  /** Per slot: [state, events]. */
  members: Array<[MemberState, number]>;
  events: number;
  state?: ArrayState;
  owner?: OwnerRecord | null;
  arrayUuid?: string;
  legUuid?: string;
  uuids?: string[];
  layout?: LegLayout;
  /** Generation history, newest first (ids are padded to 16 hex digits: 'a1' -> '00000000000000a1'). */
  generations?: string[];
}

/** A generation id for tests: `hex` padded to 16 hex digits. */
const gen = (hex: string): string => hex.padStart(16, '0');

function sbOf(spec: SbSpec): Superblock {
  const uuids = spec.uuids ?? kUuids;
  const layout = spec.layout ?? kLayout;
  const members: MemberRecord[] = spec.members.map(([state, events], slot) => ({ legUuid: uuids[slot] as string, state, events, recoveryOffsetBytes: 0 }));
  const legUuid = spec.legUuid ?? (uuids[spec.slot] as string);
  (members[spec.slot] as MemberRecord).legUuid = legUuid;
  return superblockFor(
    { arrayUuid: spec.arrayUuid ?? kArray, arrayName: 'test', createdMs: 1, layout },
    layout,
    { slotIndex: spec.slot, legUuid },
    members,
    spec.events,
    spec.state ?? 'clean',
    spec.owner ?? null,
    kNow - 1000,
    [],
    (spec.generations ?? []).map(gen),
  );
}

const kBlank = new Uint8Array(4096);

/** What LegMeta.read() reports for a leg holding `superblock` in both copies (sequences 1, 2). */
function readOf(superblock: Superblock | null, legSizeBytes = kLegBytes, damage = false): LegMetaRead {
  const offsets = superblockOffsets(legSizeBytes);
  const blocks = superblock === null ? [kBlank, kBlank] : [encodeSuperblock(superblock, 0, 1), encodeSuperblock(superblock, 1, 2)];
  if (damage) for (const block of blocks) block[100] = (block[100] as number) ^ 0xff;
  const copies: LegMetaRead['copies'] = [inspectCopy(0, offsets[0], blocks[0] as Uint8Array), inspectCopy(1, offsets[1], blocks[1] as Uint8Array)];
  const valid = copies.filter((copy) => copy.status === 'valid');
  const used = valid.length === 0 ? null : valid.reduce((a, b) => ((b.sequence ?? 0) > (a.sequence ?? 0) ? b : a));
  return { legSizeBytes, copies, usedCopy: used?.copyIndex ?? null, superblock: used?.superblock ?? null, hasMetadata: copies[0].magic || copies[1].magic };
}

function legOf(uri: string, superblock: Superblock | null, chunks: number[] = [], options: { legSizeBytes?: number; damage?: boolean } = {}): FoundLeg {
  const read = readOf(superblock, options.legSizeBytes ?? superblock?.legSizeBytes ?? kLegBytes, options.damage ?? false);
  let bitmap: Uint8Array | null = null;
  if (read.superblock !== null) {
    bitmap = new Uint8Array(computeLayout(read.superblock.legSizeBytes, read.superblock.bitmapChunkBytes).bitmapBytes);
    for (const chunk of chunks) bitmapSet(bitmap, chunk);
  }
  return { uri, read, bitmap };
}

function opts(extra: Partial<AssemblyOptions> = {}): AssemblyOptions {
  let next = 0;
  return {
    forceSource: null,
    degraded: false,
    nowMs: kNow,
    host: kHost,
    pid: kPid,
    pidAlive: () => false,
    newUuid: () => `new-uuid-${next++}`,
    ...extra,
  };
}

/** planAssembly must refuse with ENBD_ERR_META and a message matching every pattern. */
function refused(found: FoundLeg[], options: AssemblyOptions, ...patterns: RegExp[]): string {
  let message = '';
  assert.throws(() => planAssembly(found, options), (error: unknown) => {
    assert.ok(error instanceof EnbdError, `an EnbdError, got ${String(error)}`);
    assert.equal(error.code, 'ENBD_ERR_META');
    message = error.message;
    for (const pattern of patterns) assert.match(error.message, pattern);
    return true;
  });
  return message;
}

function roles(plan: AssemblyPlan): string[] {
  return plan.legs.map((leg) => leg.role);
}

function states(plan: AssemblyPlan): string[] {
  return plan.members.map((member) => member.state);
}

/** Two clean in-sync legs at events 5, as a clean stop leaves them. */
function cleanPair(): FoundLeg[] {
  return [0, 1].map((slot) => legOf(`leg${slot}`, sbOf({ slot, members: [['in-sync', 5], ['in-sync', 5]], events: 5 })));
}

// ---- one test per rule ------------------------------------------------------------------------

test('no leg has enbd metadata: refused, naming enbd create and --metadata none', () => {
  const message = refused([legOf('a.img', null), legOf('b.img', null)], opts(), /enbd create --leg a\.img --leg b\.img/, /--metadata none/);
  assert.doesNotMatch(message, /undefined/);
  refused([], opts(), /no legs given/);
});

test('a leg with enbd magic but no valid copy: refused as damaged, naming examine and create --force', () => {
  const good = legOf('a.img', sbOf({ slot: 0, members: [['in-sync', 5], ['in-sync', 5]], events: 5 }));
  const damaged = legOf('b.img', sbOf({ slot: 1, members: [['in-sync', 5], ['in-sync', 5]], events: 5 }), [], { damage: true });
  assert.equal(damaged.read.hasMetadata, true);
  assert.equal(damaged.read.superblock, null);
  refused([good, damaged], opts(), /leg 1 \(b\.img\) has damaged enbd metadata/, /checksum mismatch/, /enbd examine b\.img/, /enbd create --force/);
});

test('legs of two arrays: refused, naming both arrays', () => {
  const a = legOf('a', sbOf({ slot: 0, members: [['in-sync', 5], ['in-sync', 5]], events: 5 }));
  const b = legOf('b', sbOf({ slot: 1, members: [['in-sync', 5], ['in-sync', 5]], events: 5, arrayUuid: kOtherArray }));
  refused([a, b], opts(), /different arrays/, new RegExp(kArray), new RegExp(kOtherArray), /enbd create --force/);
});

test('the same leg UUID twice: refused as the same device given twice', () => {
  const [a] = cleanPair();
  refused([a as FoundLeg, { ...(a as FoundLeg), uri: 'a-again' }], opts(), /legs 0 and 1 carry the same leg UUID/, /given twice/);
});

test('data sizes or bitmap chunks differ: refused', () => {
  const big = computeLayout(2 * kLegBytes, 4096);
  const a = legOf('a', sbOf({ slot: 0, members: [['in-sync', 5], ['in-sync', 5]], events: 5 }));
  const b = legOf('b', sbOf({ slot: 1, members: [['in-sync', 5], ['in-sync', 5]], events: 5, layout: big }));
  refused([a, b], opts(), /data sizes differ/);
  const chunky = computeLayout(kLegBytes, 8192);
  const c = legOf('c', sbOf({ slot: 1, members: [['in-sync', 5], ['in-sync', 5]], events: 5, layout: chunky }));
  refused([a, c], opts(), /8192-byte chunks/, /data sizes differ/);
});

test('a claim on the same host: live pid refused; dead pid taken over as an unclean stop', () => {
  const owner: OwnerRecord = { host: kHost, pid: 777, heartbeatMs: kNow - 1000 };
  const found = [0, 1].map((slot) => legOf(`leg${slot}`, sbOf({ slot, members: [['in-sync', 5], ['in-sync', 5]], events: 5, state: 'active', owner })));
  refused(found, opts({ pidAlive: (pid) => pid === 777 }), /in use by enbd pid 777 on this-host/, /stop that daemon first/);
  // The pid check is what decides on the same host, not the heartbeat age.
  const old = [0, 1].map((slot) => legOf(`leg${slot}`, sbOf({ slot, members: [['in-sync', 5], ['in-sync', 5]], events: 5, state: 'active', owner: { ...owner, heartbeatMs: 0 } })));
  refused(old, opts({ pidAlive: (pid) => pid === 777 }), /pid 777/);
  const plan = planAssembly(found, opts({ pidAlive: () => false }));
  assert.equal(plan.unclean, true);
  assert.deepEqual(plan.takenOver, [owner], 'one owner, listed once for two legs');
  assert.ok(plan.notes.some((note) => /stale claim of pid 777/.test(note)));
  assert.deepEqual(roles(plan), ['in-sync', 'bitmap-resync'], 'unclean: only the first in-sync leg is the source');
  assert.deepEqual(states(plan), ['in-sync', 'needs-resync']);
});

test('a claim from another host: fresh heartbeat refused, stale heartbeat taken over', () => {
  const fresh: OwnerRecord = { host: 'other-host', pid: kPid, heartbeatMs: kNow - 29_000 };
  const make = (owner: OwnerRecord): FoundLeg[] => [0, 1].map((slot) => legOf(`leg${slot}`, sbOf({ slot, members: [['in-sync', 5], ['in-sync', 5]], events: 5, state: 'active', owner })));
  // The same pid on another host is another process; pidAlive is not asked about it.
  refused(make(fresh), opts({ pidAlive: () => { throw new Error('pidAlive asked about another host'); } }), /in use by enbd pid 4242 on other-host \(heartbeat 29 s ago\)/, /stale 30 s after/);
  const stale = { ...fresh, heartbeatMs: kNow - 31_000 };
  const plan = planAssembly(make(stale), opts());
  assert.deepEqual(plan.takenOver, [stale]);
  assert.equal(plan.unclean, true);
  assert.deepEqual(roles(plan), ['in-sync', 'bitmap-resync']);
  // staleClaimMs overrides the 30 s.
  refused(make(stale), opts({ staleClaimMs: 60_000 }), /stale 60 s after/);
});

test('our own pid on this host (a restart reusing the pid) is not a live claim', () => {
  const owner: OwnerRecord = { host: kHost, pid: kPid, heartbeatMs: kNow };
  const found = [0, 1].map((slot) => legOf(`leg${slot}`, sbOf({ slot, members: [['in-sync', 5], ['in-sync', 5]], events: 5, state: 'active', owner })));
  const plan = planAssembly(found, opts({ pidAlive: () => true }));
  assert.equal(plan.unclean, true);
});

test('unclean stop (state active, no owner): one in-sync source, the others resync the union bitmap', () => {
  const found = [0, 1, 2].map((slot) => legOf(`leg${slot}`, sbOf({ slot, members: [['in-sync', 7], ['in-sync', 7], ['in-sync', 7]], events: 7, state: 'active' }), [slot, 10 + slot]));
  const plan = planAssembly(found, opts());
  assert.equal(plan.unclean, true);
  assert.deepEqual(roles(plan), ['in-sync', 'bitmap-resync', 'bitmap-resync']);
  assert.match(plan.legs[1]?.why ?? '', /unclean stop: .* from leg 0/);
  assert.deepEqual(states(plan), ['in-sync', 'needs-resync', 'needs-resync']);
  assert.equal(plan.previousEvents, 7);
  assert.equal(plan.events, 8);
  assert.equal(plan.members[0]?.events, 8, 'the in-sync member is recorded at the new events');
  assert.equal(plan.members[1]?.events, 7, 'a resyncing member keeps the events it reached');
  for (const chunk of [0, 1, 2, 10, 11, 12]) assert.ok(bitmapTest(plan.bitmap, chunk), `chunk ${chunk} in the union`);
  let set = 0;
  for (let chunk = 0; chunk < kLayout.chunkCount; chunk += 1) if (bitmapTest(plan.bitmap, chunk)) set += 1;
  assert.equal(set, 6, 'the union holds exactly the legs\' bits');
  assert.equal(plan.bitmap.length, kLayout.bitmapBytes);
});

test('clean stop, all freshest and in sync: every leg in sync, events = max + 1 for all', () => {
  const plan = planAssembly(cleanPair(), opts());
  assert.equal(plan.unclean, false);
  assert.deepEqual(roles(plan), ['in-sync', 'in-sync']);
  assert.deepEqual(plan.members.map((member) => [member.legUuid, member.state, member.events]), [[kUuids[0], 'in-sync', 6], [kUuids[1], 'in-sync', 6]]);
  assert.equal(plan.arrayUuid, kArray);
  assert.equal(plan.layout.dataSizeBytes, kLayout.dataSizeBytes);
  assert.deepEqual(plan.takenOver, []);
});

test('older events: bitmap resync; recorded needs-resync: bitmap resync; needs-full-sync: full resync', () => {
  // Leg 1 left at events 5 (its superblock still says all in sync); leg 0 went on to 9.
  const a = legOf('a', sbOf({ slot: 0, members: [['in-sync', 9], ['needs-resync', 5], ['needs-full-sync', 0]], events: 9 }), [3]);
  const b = legOf('b', sbOf({ slot: 1, members: [['in-sync', 5], ['in-sync', 5], ['in-sync', 5]], events: 5 }), [4]);
  const c = legOf('c', sbOf({ slot: 2, members: [['in-sync', 9], ['needs-resync', 5], ['needs-full-sync', 0]], events: 9 }));
  const plan = planAssembly([a, b, c], opts());
  assert.deepEqual(roles(plan), ['in-sync', 'bitmap-resync', 'full-resync']);
  assert.match(plan.legs[1]?.why ?? '', /stale \(events 5 < 9\)/);
  assert.match(plan.legs[2]?.why ?? '', /full sync/);
  assert.deepEqual(states(plan), ['in-sync', 'needs-resync', 'needs-full-sync']);
  assert.deepEqual(plan.members.map((member) => member.events), [10, 5, 0]);
  assert.ok(bitmapTest(plan.bitmap, 3) && bitmapTest(plan.bitmap, 4), 'union of both legs\' bitmaps');
  // Same events but recorded needs-resync in the freshest table.
  const d = legOf('d', sbOf({ slot: 0, members: [['in-sync', 9], ['needs-resync', 9]], events: 9 }));
  const e = legOf('e', sbOf({ slot: 1, members: [['in-sync', 9], ['needs-resync', 9]], events: 9 }));
  const second = planAssembly([d, e], opts());
  assert.deepEqual(roles(second), ['in-sync', 'bitmap-resync']);
  assert.match(second.legs[1]?.why ?? '', /recorded needs-resync/);
});

test('split brain: refused naming --force-source; accepted with it, the others synced from the survivor', () => {
  // Each ran alone and recorded the other as needing a resync.
  const a = legOf('a', sbOf({ slot: 0, members: [['in-sync', 8], ['needs-resync', 5]], events: 8 }), [1]);
  const b = legOf('b', sbOf({ slot: 1, members: [['needs-resync', 5], ['in-sync', 7]], events: 7 }), [2]);
  refused([a, b], opts(), /split brain: leg 0 \(a, events 8\) and leg 1 \(b, events 7\)/, /--force-source LEG/);
  for (const forced of [0, 1]) {
    const plan = planAssembly([a, b], opts({ forceSource: forced }));
    assert.deepEqual(roles(plan), forced === 0 ? ['in-sync', 'bitmap-resync'] : ['bitmap-resync', 'in-sync'], `--force-source ${forced}`);
    assert.equal(plan.events, 9, 'max + 1 even when the older leg is forced');
    assert.equal(plan.members[forced]?.events, 9);
    assert.equal(plan.members[forced]?.state, 'in-sync');
    assert.equal(plan.members[1 - forced]?.state, 'needs-resync');
    assert.ok(bitmapTest(plan.bitmap, 1) && bitmapTest(plan.bitmap, 2), 'both legs\' writes are resynced');
    assert.ok(plan.notes.some((note) => /split brain between legs 0 and 1: --force-source/.test(note)));
  }
  refused([a, b], opts({ forceSource: 2 }), /--force-source 2: there is no leg 2 \(legs are 0\.\.1\)/);
  refused([a, legOf('blank', null)], opts({ forceSource: 1 }), /--force-source 1: leg 1 \(blank\) has no enbd metadata/);
});

test('two legs resyncing together from one source are no split brain (one table records both stale)', () => {
  // 3 legs; legs 1 and 2 resync from leg 0; the daemon stops (or crashes) before they finish:
  // every leg holds the same table, in which legs 1 and 2 each record the other as needs-resync.
  const table: Array<[MemberState, number]> = [['in-sync', 6], ['needs-resync', 5], ['needs-resync', 5]];
  const found = [0, 1, 2].map((slot) => legOf(`leg${slot}`, sbOf({ slot, members: table, events: 6 })));
  const plan = planAssembly(found, opts());
  assert.deepEqual(roles(plan), ['in-sync', 'bitmap-resync', 'bitmap-resync']);
  // Without leg 0 no leg is up to date: refused, but not as a split brain.
  refused(found.slice(1), opts({ degraded: true }), /no leg is known to be up to date/);
});

test('split brain through a replaced leg: a new member synced from one side, the other side ran alone', () => {
  // Found by the history property. 3 legs in sync (events 2). Leg 2 runs alone (--degraded) and
  // takes writes: its table records slots 0 and 1 needs-resync (events 3). Leg 0 is wiped; legs
  // 0 (blank: new member, new UUID) and 1 run without leg 2, take other writes, leg 0 finishes its
  // full resync from leg 1 (events 4). Now legs 2 and 0 are given: each ran without the other.
  const leg2 = legOf('leg2', sbOf({ slot: 2, members: [['needs-resync', 2], ['needs-resync', 2], ['in-sync', 3]], events: 3, state: 'active' }));
  const uuids = ['replacement-uuid', kUuids[1] as string, kUuids[2] as string];
  const leg0 = legOf('leg0', sbOf({ slot: 0, uuids, members: [['in-sync', 4], ['in-sync', 4], ['needs-resync', 2]], events: 4, state: 'active' }));
  // Leg 0's side (from leg 1) and leg 2's writes diverged: trusting leg 0 loses leg 2's writes.
  refused([leg2, leg0], opts({ degraded: true }), /split brain/, /--force-source/);
});

test('no split brain when the legs a stale leg ran with were later resynced into the other (generation history)', () => {
  // Found by the history property. 3 legs; leg 1 fails and legs 0, 2 take writes (events 3);
  // crash. Legs 1, 0 run: leg 1 resyncs from leg 0 and ends in sync (events 5), so it holds leg
  // 2's writes too; crash. Now legs 1 and 2 are given: each records the other as not in sync,
  // yet leg 1 holds everything leg 2 holds (leg 2 went on only while leg 0 was with it).
  // Generations: leg 2 stopped in generation 3; leg 1's line went 2, 3 (leg 0's run with leg 2,
  // the table leg 1 got from leg 0), 4 (the run of legs 1 and 0), 5 (leg 1 resynced).
  const leg1 = legOf('leg1', sbOf({ slot: 1, members: [['in-sync', 5], ['in-sync', 5], ['needs-resync', 3]], events: 5, state: 'active', generations: ['5', '4', '3', '2'] }), [7]);
  const leg2 = legOf('leg2', sbOf({ slot: 2, members: [['in-sync', 3], ['needs-resync', 2], ['in-sync', 3]], events: 3, state: 'active', generations: ['3', '2'] }), [9]);
  for (const order of [[leg1, leg2], [leg2, leg1]]) {
    const plan = planAssembly(order, opts({ degraded: true, newGeneration: () => gen('6') }));
    const roleOf = (uri: string): string | undefined => plan.legs.find((leg) => leg.uri === uri)?.role;
    assert.equal(roleOf('leg1'), 'in-sync');
    assert.equal(roleOf('leg2'), 'bitmap-resync');
    assert.ok(plan.notes.some((note) => /went on from the last generation of leg \d: no split brain/.test(note)), plan.notes.join('; '));
    assert.ok(bitmapTest(plan.bitmap, 7) && bitmapTest(plan.bitmap, 9), 'the resync copies both legs\' marked chunks');
    assert.deepEqual(plan.generations, ['6', '5', '4', '3', '2'].map(gen), 'a new generation on the trusted leg\'s line');
  }
  // Without the history (metadata from before generations) the same tables are refused, as before.
  const old1 = legOf('leg1', sbOf({ slot: 1, members: [['in-sync', 5], ['in-sync', 5], ['needs-resync', 3]], events: 5, state: 'active' }));
  const old2 = legOf('leg2', sbOf({ slot: 2, members: [['in-sync', 3], ['needs-resync', 2], ['in-sync', 3]], events: 3, state: 'active' }));
  refused([old1, old2], opts({ degraded: true }), /split brain/, /--force-source/);
});

test('generation history: legs that went on from a common generation apart are a split brain; a resync target\'s history proves nothing', () => {
  // Both ran alone from generation 2.
  const a = legOf('a', sbOf({ slot: 0, members: [['in-sync', 8], ['needs-resync', 5]], events: 8, generations: ['8', '2'] }), [1]);
  const b = legOf('b', sbOf({ slot: 1, members: [['needs-resync', 5], ['in-sync', 7]], events: 7, generations: ['7', '2'] }), [2]);
  refused([a, b], opts(), /split brain: leg 0 \(a, events 8\) and leg 1 \(b, events 7\)/);
  // Leg c holds b's generation in its history but records itself needs-resync (its resync never
  // ended): it does not hold everything b holds, so b's own run without c still counts.
  const c = legOf('c', sbOf({ slot: 0, members: [['needs-resync', 9], ['needs-resync', 7]], events: 9, generations: ['9', '7', '2'] }));
  const b2 = legOf('b', sbOf({ slot: 1, members: [['needs-resync', 5], ['in-sync', 7]], events: 7, generations: ['7', '2'] }));
  refused([c, b2], opts(), /split brain/);
});

test('generation history is bounded: the plan keeps the newest kGenerationsMax ids', () => {
  const long = Array.from({ length: kGenerationsMax }, (_unused, at) => (1000 - at).toString(16));
  const a = legOf('a', sbOf({ slot: 0, members: [['in-sync', 5], ['in-sync', 5]], events: 5, generations: long }));
  const b = legOf('b', sbOf({ slot: 1, members: [['in-sync', 5], ['in-sync', 5]], events: 5, generations: long }));
  const plan = planAssembly([a, b], opts({ newGeneration: () => gen('ffff') }));
  assert.equal(plan.generations.length, kGenerationsMax);
  assert.equal(plan.generations[0], gen('ffff'));
  assert.equal(plan.generations[kGenerationsMax - 1], gen(long[kGenerationsMax - 2] as string));
});

test('a leg that records itself needs-full-sync gets a full resync even where the other leg\'s table says needs-resync', () => {
  // A wiped leg returning to a running mirror: the keeper's identity check finds it blank and
  // writes it fresh superblocks (self needs-full-sync, the current events) before the member-
  // table change reaches leg 0, whose table still says needs-resync (from when the leg dropped).
  // A crash in between: leg 1 is all zeros but for what the bitmap marks; a bitmap resync would
  // leave it serving zeros as in sync.
  const leg0 = legOf('leg0', sbOf({ slot: 0, members: [['in-sync', 7], ['needs-resync', 6]], events: 7, state: 'active' }), [2]);
  const leg1 = legOf('leg1', sbOf({ slot: 1, members: [['in-sync', 7], ['needs-full-sync', 6]], events: 7, state: 'active' }), [2]);
  for (const order of [[leg0, leg1], [leg1, leg0]]) {
    const plan = planAssembly(order, opts());
    const role = plan.legs.find((leg) => leg.slotIndex === 1)?.role;
    assert.equal(role, 'full-resync', `given as ${order.map((leg) => leg.uri).join(',')}`);
  }
});

test('a member not given: refused naming --degraded; with --degraded it is recorded needs-resync', () => {
  const found = [0, 1].map((slot) => legOf(`leg${slot}`, sbOf({ slot, members: [['in-sync', 5], ['in-sync', 5], ['in-sync', 5]], events: 5 })));
  refused(found, opts(), /member 2 of the array \(leg UUID leg-uuid-slot-2, in-sync\) is not given/, /--degraded/);
  const plan = planAssembly(found, opts({ degraded: true }));
  assert.deepEqual(roles(plan), ['in-sync', 'in-sync']);
  assert.deepEqual(plan.members.map((member) => [member.legUuid, member.state, member.events]), [
    [kUuids[0], 'in-sync', 6], [kUuids[1], 'in-sync', 6], [kUuids[2], 'needs-resync', 5],
  ]);
  // A removed member need not be given.
  const withRemoved = [0, 1].map((slot) => legOf(`leg${slot}`, sbOf({ slot, members: [['in-sync', 5], ['in-sync', 5], ['removed', 0]], events: 5 })));
  assert.deepEqual(roles(planAssembly(withRemoved, opts())), ['in-sync', 'in-sync']);
});

test('a blank leg takes the missing member\'s slot with a new UUID and a full resync', () => {
  const a = legOf('a', sbOf({ slot: 0, members: [['in-sync', 5], ['in-sync', 5]], events: 5 }), [7]);
  const plan = planAssembly([a, legOf('fresh', null, [], { legSizeBytes: kLegBytes })], opts());
  assert.deepEqual(roles(plan), ['in-sync', 'full-resync']);
  assert.equal(plan.legs[1]?.slotIndex, 1);
  assert.equal(plan.legs[1]?.legUuid, 'new-uuid-0');
  assert.equal(plan.legs[1]?.fresh, true);
  assert.deepEqual(plan.members.map((member) => [member.legUuid, member.state, member.events]), [[kUuids[0], 'in-sync', 6], ['new-uuid-0', 'needs-full-sync', 0]]);
  assert.ok(plan.notes.some((note) => /no enbd metadata: a new member in slot 1 \(replacing leg-uuid-slot-1\), full resync/.test(note)));
  // No free slot: the new leg gets a new slot.
  const b = legOf('b', sbOf({ slot: 1, members: [['in-sync', 5], ['in-sync', 5]], events: 5 }));
  const third = planAssembly([a, b, legOf('fresh', null)], opts());
  assert.deepEqual(third.legs.map((leg) => [leg.slotIndex, leg.role]), [[0, 'in-sync'], [1, 'in-sync'], [2, 'full-resync']]);
  assert.equal(third.members.length, 3);
  // A blank leg of another size is refused.
  refused([a, legOf('small', null, [], { legSizeBytes: kLegBytes / 2 })], opts(), /leg 1 \(small\) is a new leg of 524288 bytes/, /too small/);
});

test('a leg whose UUID the array does not know for its slot: a new member with a new UUID, full resync', () => {
  const a = legOf('a', sbOf({ slot: 0, members: [['in-sync', 5], ['in-sync', 5]], events: 5 }));
  // A stranger that records itself in sync may have run alone: refused unless --force-source.
  const claimsInSync = legOf('x', sbOf({ slot: 1, members: [['in-sync', 3], ['in-sync', 3]], events: 3, legUuid: 'stranger-uuid' }));
  refused([a, claimsInSync], opts(), /no longer know in its slot, yet it records itself in sync/, /--force-source/);
  const forced = planAssembly([a, claimsInSync], opts({ forceSource: 0 }));
  assert.deepEqual(roles(forced), ['in-sync', 'full-resync']);
  // One that records itself out of sync holds nothing the array lacks: a new member.
  const stranger = legOf('x', sbOf({ slot: 1, members: [['in-sync', 3], ['needs-resync', 2]], events: 3, legUuid: 'stranger-uuid' }));
  const plan = planAssembly([a, stranger], opts());
  assert.deepEqual(roles(plan), ['in-sync', 'full-resync']);
  assert.equal(plan.legs[1]?.legUuid, 'new-uuid-0');
  assert.equal(plan.members[1]?.state, 'needs-full-sync');
  assert.ok(plan.notes.some((note) => /leg UUID stranger-uuid, unknown to the array/.test(note)));
});

test('legs given in another order than their slots keep their slots', () => {
  const found = [2, 0, 1].map((slot) => legOf(`slot${slot}`, sbOf({ slot, members: [['in-sync', 9], ['needs-resync', 4], ['in-sync', 9]], events: slot === 1 ? 4 : 9 }), [slot]));
  const plan = planAssembly(found, opts());
  assert.deepEqual(plan.legs.map((leg) => [leg.uri, leg.slotIndex, leg.legUuid, leg.role]), [
    ['slot2', 2, kUuids[2], 'in-sync'],
    ['slot0', 0, kUuids[0], 'in-sync'],
    ['slot1', 1, kUuids[1], 'bitmap-resync'],
  ]);
  assert.deepEqual(plan.members.map((member) => [member.legUuid, member.state, member.events]), [
    [kUuids[0], 'in-sync', 10], [kUuids[1], 'needs-resync', 4], [kUuids[2], 'in-sync', 10],
  ]);
  // Unclean: the source is the first given in-sync leg (slot 2 here).
  const active = [2, 0].map((slot) => legOf(`slot${slot}`, sbOf({ slot, members: [['in-sync', 9], ['in-sync', 9], ['in-sync', 9]], events: 9, state: 'active' })));
  const unclean = planAssembly(active, opts({ degraded: true }));
  assert.deepEqual(unclean.legs.map((leg) => [leg.slotIndex, leg.role]), [[2, 'in-sync'], [0, 'bitmap-resync']]);
});

test('no given leg is known up to date: refused, naming --force-source', () => {
  // Leg 1 was resyncing when the daemon died; leg 0 (the source) is not given.
  const b = legOf('b', sbOf({ slot: 1, members: [['in-sync', 6], ['needs-resync', 5]], events: 6, state: 'active' }));
  refused([b], opts({ degraded: true }), /no leg is known to be up to date/, /--force-source LEG/);
  const forced = planAssembly([b], opts({ degraded: true, forceSource: 0 }));
  assert.deepEqual(roles(forced), ['in-sync']);
});

/** Runs `body` on fresh MemoryDevices holding `images` (assembleArray closes its devices), then copies the bytes back. */
async function onImages<T>(images: Uint8Array[], body: (devices: MemoryDevice[]) => Promise<T>): Promise<T> {
  const devices = images.map((image) => {
    const device = new MemoryDevice({ sizeBytes: image.length });
    device.bytes.set(image);
    return device;
  });
  try {
    return await body(devices);
  } finally {
    for (const [index, device] of devices.entries()) (images[index] as Uint8Array).set(device.bytes);
  }
}

test('assembleArray over memory devices: create, claim, read the claim back; a second daemon is refused', async () => {
  const images = [0, 1].map(() => new Uint8Array(kLegBytes));
  await onImages(images, async (devices) => {
    await createArray(devices.map((device, index) => ({ uri: `m${index}`, meta: new LegMeta(device) })), { name: 'mem', assumeClean: true, force: false, bitmapChunkBytes: 4096 });
  });
  const claim = (pid: number, nowMs: number, alive: (pid: number) => boolean) => onImages(images, (devices) => assembleArray(['m0', 'm1'], devices, { forceSource: null, degraded: false, host: kHost, pid, nowMs, pidAlive: alive }));
  const first = await claim(100, kNow, () => true);
  assert.deepEqual(first.plan.legs.map((leg) => leg.role), ['in-sync', 'in-sync']);
  assert.equal(first.plan.unclean, false);
  await onImages(images, async (devices) => {
    for (const device of devices) {
      const read = await new LegMeta(device).read();
      assert.equal(read.superblock?.state, 'active');
      assert.deepEqual(read.superblock?.owner, { host: kHost, pid: 100, heartbeatMs: kNow });
      assert.equal(read.superblock?.events, 2, 'create is generation 1, the claim 2');
      assert.deepEqual(read.superblock?.members.map((member) => [member.state, member.events]), [['in-sync', 2], ['in-sync', 2]]);
    }
  });
  await assert.rejects(claim(101, kNow + 1, (pid) => pid === 100), (error: unknown) => error instanceof EnbdError && error.code === 'ENBD_ERR_META' && /in use by enbd pid 100/.test(error.message));
  // pid 100 died: the next daemon takes over and sees an unclean stop.
  const second = await claim(101, kNow + 2, () => false);
  assert.equal(second.plan.unclean, true);
  assert.deepEqual(second.plan.takenOver.map((owner) => owner.pid), [100]);
  assert.deepEqual(second.plan.legs.map((leg) => leg.role), ['in-sync', 'bitmap-resync']);
});

// ---- the history property ----------------------------------------------------------------------

const kLegs = 3;
/** ENBD_ASSEMBLE_NO_WIPE=1 leaves wiped legs out (to look past the replaced-leg split brain for other failures). */
const kNoWipe = process.env['ENBD_ASSEMBLE_NO_WIPE'] === '1';
/** ENBD_ASSEMBLE_SAFETY_ONLY=1 allows needless refusals (S3 off): only unsafe plans fail. */
const kSafetyOnly = process.env['ENBD_ASSEMBLE_SAFETY_ONLY'] === '1';
/** S3 off for the run in progress (the safety property; or ENBD_ASSEMBLE_SAFETY_ONLY=1). */
let safetyOnly = kSafetyOnly;

type HistoryOp =
  | { kind: 'write' }
  | { kind: 'fail'; leg: number; bump: boolean }
  | { kind: 'return'; leg: number }
  | { kind: 'resynced'; leg: number }
  | { kind: 'heartbeat' }
  | { kind: 'crash' }
  | { kind: 'stop' }
  | { kind: 'wipe'; leg: number }
  | { kind: 'start'; order: number[]; degradedAnyway: boolean; force: number };

const legArb = fc.nat({ max: kLegs - 1 });
const inRunOpArb: fc.Arbitrary<HistoryOp> = fc.oneof(
  { weight: 5, arbitrary: fc.constant<HistoryOp>({ kind: 'write' }) },
  { weight: 3, arbitrary: fc.record({ leg: legArb, bump: fc.boolean() }).map((op): HistoryOp => ({ kind: 'fail', ...op })) },
  { weight: 2, arbitrary: legArb.map((leg): HistoryOp => ({ kind: 'return', leg })) },
  { weight: 3, arbitrary: legArb.map((leg): HistoryOp => ({ kind: 'resynced', leg })) },
  { weight: 2, arbitrary: fc.constant<HistoryOp>({ kind: 'heartbeat' }) },
);

/** One run of the daemon: a start on a subset of the legs (in any order), its ops, its end; maybe a wipe after. */
const runArb: fc.Arbitrary<HistoryOp[]> = fc.record({
  order: fc.shuffledSubarray([0, 1, 2], { minLength: 1 }),
  degradedAnyway: fc.boolean(),
  force: fc.nat({ max: 100 }),
  ops: fc.array(inRunOpArb, { maxLength: 8 }),
  end: fc.constantFrom<HistoryOp>({ kind: 'crash' }, { kind: 'stop' }),
  wipe: kNoWipe ? fc.constant(null) : fc.option(legArb, { freq: 8, nil: null }),
}).map(({ order, degradedAnyway, force, ops, end, wipe }) => [
  { kind: 'start', order, degradedAnyway, force } as HistoryOp,
  ...ops,
  end,
  ...(wipe === null ? [] : [{ kind: 'wipe', leg: wipe } as HistoryOp]),
]);

interface ModelLeg {
  /** Its superblock as on the device, null when blank. */
  sb: Superblock | null;
  /** Acknowledged writes it holds. */
  writes: Set<number>;
  /** Those it holds as a source: taken while in sync, or held when a resync to it ended. */
  auth: Set<number>;
  /** Run state while a daemon runs: out (failed or not given), in-sync, resyncing. */
  run: 'out' | 'in-sync' | 'resyncing';
  /** While resyncing (or out after a full-resync role): it needs a full copy. */
  fullSync: boolean;
  /** It left a run or started a resync that did not finish: its metadata rightly says it may be stale. */
  doubt: boolean;
  /** Its slot and UUID in the running array (from the plan). */
  slot: number;
  legUuid: string;
}

function isSubset(a: Set<number>, b: Set<number>): boolean {
  for (const item of a) if (!b.has(item)) return false;
  return true;
}

class History {
  readonly legs: ModelLeg[] = [];
  running: { members: MemberRecord[]; events: number; generations: string[]; owner: OwnerRecord; plan: AssemblyPlan } | null = null;
  /** What the array last served: the acknowledged writes of its in-sync legs. */
  truth = new Set<number>();
  /** Writes given up by an operator's --force-source (no longer data to keep). */
  readonly dead = new Set<number>();
  private nextWrite = 1;
  private nextPid = 1000;
  private nowMs = kNow;
  private uuidCounter = 0;
  private generationCounter = 1;
  readonly log: string[] = [];
  stats = { starts: 0, refusedSplit: 0, refusedStale: 0, refusedBlank: 0, accepted: 0, forced: 0, staleTrustedUnknowable: 0, needless: 0 };

  constructor() {
    const members: MemberRecord[] = kUuids.map((legUuid) => ({ legUuid, state: 'in-sync', events: 1, recoveryOffsetBytes: 0 }));
    for (let slot = 0; slot < kLegs; slot += 1) {
      const sb = superblockFor({ arrayUuid: kArray, arrayName: 'model', createdMs: 1, layout: kLayout }, kLayout, { slotIndex: slot, legUuid: kUuids[slot] as string }, members, 1, 'clean', null, kNow, [], [gen('1')]);
      this.legs.push({ sb, writes: new Set(), auth: new Set(), run: 'out', fullSync: false, doubt: false, slot, legUuid: kUuids[slot] as string });
    }
  }

  private admitted(): ModelLeg[] {
    return this.legs.filter((leg) => leg.run !== 'out');
  }

  /** The keeper's desired table: each run leg's record from its run state. */
  private table(): MemberRecord[] {
    const running = this.running as NonNullable<History['running']>;
    const table = running.members.map((member) => ({ ...member }));
    for (const leg of this.legs) {
      if (!running.plan.legs.some((planned) => planned.legUuid === leg.legUuid)) continue;
      const record = table[leg.slot] as MemberRecord;
      record.legUuid = leg.legUuid;
      record.state = leg.run === 'in-sync' ? 'in-sync' : leg.fullSync ? 'needs-full-sync' : 'needs-resync';
    }
    return table;
  }

  /**
   * A member-table change (MetaKeeper loop), or with 'clean' the clean stop: events + 1, a new
   * generation, superblocks on every admitted leg.
   */
  private tableChange(state: ArrayState = 'active'): void {
    const running = this.running as NonNullable<History['running']>;
    running.events += 1;
    running.generations = nextGenerations(running.generations, this.newGeneration());
    running.members = this.table();
    for (const member of running.members) if (member.state === 'in-sync') member.events = running.events;
    this.writeSuperblocks(state, state === 'active' ? running.owner : null);
  }

  /** The model's generation ids: a counter (the daemon's are random). */
  private newGeneration(): string {
    this.generationCounter += 1;
    return gen(this.generationCounter.toString(16));
  }

  private writeSuperblocks(state: ArrayState, owner: OwnerRecord | null): void {
    const running = this.running as NonNullable<History['running']>;
    this.nowMs += 1000;
    for (const leg of this.admitted()) {
      leg.sb = superblockFor({ ...running.plan, layout: kLayout }, kLayout, { slotIndex: leg.slot, legUuid: leg.legUuid }, running.members, running.events, state, owner === null ? null : { ...owner, heartbeatMs: this.nowMs }, this.nowMs, [], withGenerations ? running.generations : []);
    }
  }

  apply(op: HistoryOp): void {
    this.log.push(JSON.stringify(op));
    if (op.kind === 'start') {
      this.start(op);
      return;
    }
    if (op.kind === 'wipe') {
      const leg = this.legs[op.leg] as ModelLeg;
      if (leg.run !== 'out' && this.running !== null) return; // only a leg the daemon does not hold
      leg.sb = null;
      leg.writes = new Set();
      leg.auth = new Set();
      return;
    }
    const running = this.running;
    if (running === null) return;
    switch (op.kind) {
      case 'write':
        this.write();
        return;
      case 'fail': {
        const leg = this.legs[op.leg] as ModelLeg;
        if (leg.run === 'out') return;
        // Model limit: the last in-sync leg does not fail.
        if (leg.run === 'in-sync' && this.admitted().filter((other) => other.run === 'in-sync').length === 1) return;
        const before = JSON.stringify(this.table().map((member) => [member.legUuid, member.state]));
        leg.run = 'out';
        leg.doubt = true;
        const after = JSON.stringify(this.table().map((member) => [member.legUuid, member.state]));
        if (before !== after || op.bump) this.tableChange();
        this.write(); // a leg fails on a write, which the others take
        return;
      }
      case 'return': {
        const leg = this.legs[op.leg] as ModelLeg;
        // Only a leg of this run that failed (the engine knows only its --leg list).
        if (leg.run !== 'out' || !running.plan.legs.some((planned) => planned.legUuid === leg.legUuid)) return;
        leg.run = 'resyncing';
        leg.doubt = true;
        return;
      }
      case 'resynced': {
        const leg = this.legs[op.leg] as ModelLeg;
        if (leg.run !== 'resyncing') return;
        leg.run = 'in-sync';
        leg.fullSync = false;
        leg.doubt = false;
        const source = this.admitted().find((other) => other.run === 'in-sync' && other !== leg) as ModelLeg;
        leg.writes = new Set(source.writes);
        leg.auth = new Set(leg.writes);
        this.tableChange();
        return;
      }
      case 'heartbeat':
        this.writeSuperblocks('active', running.owner);
        return;
      case 'crash':
        this.endRun();
        return;
      case 'stop':
        this.tableChange('clean');
        this.endRun();
        return;
    }
  }

  /** An acknowledged write: every admitted leg (in sync or resyncing) takes it. */
  private write(): void {
    const id = this.nextWrite++;
    for (const leg of this.admitted()) {
      leg.writes.add(id);
      if (leg.run === 'in-sync') leg.auth.add(id);
    }
    this.truth.add(id);
  }

  private endRun(): void {
    for (const leg of this.legs) leg.run = 'out';
    this.running = null;
  }

  private start(op: Extract<HistoryOp, { kind: 'start' }>): void {
    if (this.running !== null) return;
    this.stats.starts += 1;
    const given = op.order.map((index) => this.legs[index] as ModelLeg);
    const found: FoundLeg[] = given.map((leg, at) => ({ uri: `leg${op.order[at]}`, read: readOf(leg.sb), bitmap: leg.sb === null ? null : new Uint8Array(kLayout.bitmapBytes) }));
    const pid = this.nextPid++;
    this.nowMs += 60_000;
    const options = opts({
      degraded: op.degradedAnyway || given.length < kLegs,
      host: kHost,
      pid,
      nowMs: this.nowMs,
      pidAlive: () => false,
      newUuid: () => `model-uuid-${this.uuidCounter++}`,
      newGeneration: () => this.newGeneration(),
    });
    // Legs whose contents the metadata knows (a blank leg, or one whose full resync never ended, holds nothing to keep).
    const known = given.filter((leg) => leg.sb !== null && !leg.fullSync);
    // A resync target's writes are provisional (its source holds them): only what a leg holds as
    // a source counts (a leg that failed, returned and took writes while resyncing, then is
    // assembled without its source, is the unknowable degraded case, like a stale leg alone).
    const live = (leg: ModelLeg): Set<number> => new Set([...leg.auth].filter((id) => !this.dead.has(id)));
    const union = new Set<number>();
    for (const leg of known) for (const id of live(leg)) union.add(id);
    // Split brain: legs took writes the others lack and no given leg holds them all (two resync
    // targets of one source differ, but their source holds both: no split brain).
    const split = known.length > 0 && !known.some((leg) => isSubset(union, live(leg)));
    const anyCurrent = given.some((leg) => leg.sb !== null && !leg.doubt && isSubset(this.truth, leg.writes));
    const allBlank = given.every((leg) => leg.sb === null);
    const context = (): string => `\nhistory:\n  ${this.log.join('\n  ')}\nlegs: ${this.legs.map((leg, index) => `leg${index}${leg.doubt ? ' (doubt)' : ''} writes {${[...leg.writes].join(',')}} sb ${leg.sb === null ? 'blank' : `events ${leg.sb.events} ${leg.sb.state} self ${leg.sb.legUuid} table ${leg.sb.members.map((member) => `${member.legUuid}:${member.state}@${member.events}`).join(' ')}`}`).join('\n      ')}\ntruth {${[...this.truth].join(',')}}`;
    let plan: AssemblyPlan;
    try {
      plan = planAssembly(found, options);
    } catch (error) {
      assert.ok(error instanceof EnbdError && error.code === 'ENBD_ERR_META', `only ENBD_ERR_META: ${String(error)}`);
      if (split) {
        assert.match(error.message, /split brain|no leg is known to be up to date/, `split brain refused as such${context()}`);
        this.stats.refusedSplit += 1;
        // --force-source: the operator names a survivor that has metadata.
        const candidates = given.map((leg, at) => (known.includes(leg) ? at : -1)).filter((at) => at >= 0);
        if (candidates.length === 0) return;
        const forced = candidates[op.force % candidates.length] as number;
        plan = planAssembly(found, { ...options, forceSource: forced });
        this.stats.forced += 1;
        assert.deepEqual(plan.legs.map((leg, at) => (leg.role === 'in-sync') === (at === forced)), plan.legs.map(() => true), `--force-source ${forced}: only it is in sync${context()}`);
        const survivor = given[forced] as ModelLeg;
        this.truth = new Set(survivor.writes);
        // The operator chose: every write the survivor lacks is given up, on every leg (a resync
        // overwrites them on the given legs now, on the others when they return).
        for (let id = 1; id < this.nextWrite; id += 1) if (!survivor.writes.has(id)) this.dead.add(id);
        this.begin(given, plan, pid);
        return;
      }
      // S3: any other refusal needs a reason the model agrees with.
      assert.ok(!anyCurrent || allBlank || safetyOnly, `refused although leg(s) hold the served data and there is no split brain: ${error.message}${context()}`);
      if (anyCurrent && !allBlank) this.stats.needless += 1;
      if (allBlank) this.stats.refusedBlank += 1;
      else this.stats.refusedStale += 1;
      return;
    }
    // S2: a split brain is never assembled without --force-source.
    assert.ok(!split, `split brain among the given legs was assembled: ${plan.legs.map((leg) => `${leg.uri} ${leg.role} (${leg.why})`).join('; ')}${context()}`);
    // S1: an in-sync leg holds every acknowledged write any given leg holds.
    for (const [at, planned] of plan.legs.entries()) {
      if (planned.role !== 'in-sync') continue;
      const leg = given[at] as ModelLeg;
      const missing = [...union].filter((id) => !leg.writes.has(id));
      // (S1 compares with what the legs hold as sources; the in-sync leg must hold all of it.)
      assert.deepEqual(missing, [], `${planned.uri} trusted as in-sync (${planned.why}) but lacks writes another given leg holds${context()}`);
    }
    // S4.
    if (plan.unclean) assert.equal(plan.legs.filter((leg) => leg.role === 'in-sync').length, 1, `unclean: one source${context()}`);
    const source = given[plan.legs.findIndex((leg) => leg.role === 'in-sync')] as ModelLeg;
    if (!isSubset(this.truth, source.writes)) this.stats.staleTrustedUnknowable += 1;
    this.truth = new Set(source.writes);
    this.stats.accepted += 1;
    this.begin(given, plan, pid);
  }

  /** The claim: every given leg gets the plan's table, events, state active, this owner. */
  private begin(given: ModelLeg[], plan: AssemblyPlan, pid: number): void {
    const owner: OwnerRecord = { host: kHost, pid, heartbeatMs: this.nowMs };
    this.running = { members: plan.members.map((member) => ({ ...member })), events: plan.events, generations: [...plan.generations], owner, plan };
    // A leg not given misses this run (the metadata records it so, writes or not).
    for (const leg of this.legs) if (!given.includes(leg)) leg.doubt = true;
    for (const [at, leg] of given.entries()) {
      const planned = plan.legs[at] as AssemblyPlan['legs'][number];
      leg.slot = planned.slotIndex;
      leg.legUuid = planned.legUuid;
      leg.run = planned.role === 'in-sync' ? 'in-sync' : 'resyncing';
      leg.fullSync = planned.role === 'full-resync';
      leg.doubt = planned.role !== 'in-sync';
      if (planned.role === 'in-sync') leg.auth = new Set(leg.writes);
    }
    // A resynced leg's own extra writes are overwritten by the resync (model: at 'resynced').
    this.writeSuperblocks('active', owner);
    // Worst case: every run takes writes (the metadata cannot know it did not).
    this.write();
  }
}

/** False: the model's legs carry no generation history (metadata written before it existed). */
let withGenerations = true;

function historyProperty(safety: boolean): Record<string, number> {
  safetyOnly = safety || kSafetyOnly;
  const totals = { starts: 0, refusedSplit: 0, refusedStale: 0, refusedBlank: 0, accepted: 0, forced: 0, staleTrustedUnknowable: 0, needless: 0 };
  fc.assert(
    fc.property(fc.array(runArb, { minLength: 1, maxLength: 8 }), (runs) => {
      const history = new History();
      history.apply({ kind: 'start', order: [0, 1, 2], degradedAnyway: false, force: 0 });
      for (const op of runs.flat()) history.apply(op);
      for (const key of Object.keys(totals) as Array<keyof typeof totals>) totals[key] += history.stats[key];
    }),
    { numRuns: kRuns, includeErrorInReport: true, ...(kSeed !== undefined ? { seed: kSeed } : {}) },
  );
  // The generator must reach the interesting cases, else the property proves little.
  assert.ok(totals.refusedSplit > 0, `some split brains were generated: ${JSON.stringify(totals)}`);
  assert.ok(totals.accepted > totals.starts / 4, `most starts assemble: ${JSON.stringify(totals)}`);
  return totals;
}

test('property (safety): random histories never trust a stale leg nor miss a split brain', (t) => {
  const totals = historyProperty(true);
  // needless: refused although a given leg held the served data and no split brain (the exact
  // property below fails on the first); compare with the run without generations.
  t.diagnostic(`with generation history: ${JSON.stringify(totals)}`);
});

test('property (safety), legs without generation history (older metadata): the same rules hold', (t) => {
  withGenerations = false;
  try {
    const totals = historyProperty(true);
    t.diagnostic(`without generation history: ${JSON.stringify(totals)}`);
  } finally {
    withGenerations = true;
  }
});

// Exact: a start is refused as a split brain only when no given leg holds every write the others
// hold. The generation history removed most needless refusals (the safety runs count them:
// "needless", ~9x fewer than without it). What remains involves a given resync target (recorded
// needs-resync or needs-full-sync) whose generation shows it took writes in a run the trusted leg
// never saw. The model counts a target's writes as its source's only; the planner still refuses
// (the target's metadata proves those acknowledged writes exist), and --force-source resolves it.
test('property (exact): random histories refuse exactly the split brains', { todo: 'refusals remain where a given resync target took writes in a run the trusted leg never saw (the model counts them as its source\'s); --force-source resolves them' }, () => {
  historyProperty(false);
});
