/**
 * Model test of the mirror's promise under random faults (issue 10): fast-check generates a
 * list of client operations (writes, overlapping concurrent writes, zero/trim, flush, read) mixed
 * with faults on the legs (EIO, drop, crash losing unflushed writes, hang past the leg timeout,
 * late release of held "zombie" writes, slow replies, refused reconnects, an operator replacing
 * a leg by an empty one, resync paused and resumed, a drop/crash/hang while writes are in
 * flight) and waits; a MirrorDevice (inline) over fault legs runs them.
 *
 * The promise, checked after every step:
 *   P1 every acknowledged write reads back through the mirror (a READ may fail with EIO while
 *      faults are on: availability is not the promise, wrong bytes are);
 *   P2 for every 4 KiB chunk, every leg in readableLegs(chunk) holds the model's bytes, and all
 *      of them hold the same bytes.
 * At the end every fault is healed and every held request released; once every leg is in sync,
 *   P3 all stores are byte-identical, equal the model, and a full read equals them.
 *
 * Model: `expected` holds the last acknowledged bytes (data is a hash of (data id, offset), so a
 * byte names the write it came from). A write answered with an error leaves its range
 * "uncertain": such a byte may be the last acknowledged value or that of any failed write that
 * arrived after it (arrival order is taken at submit, so concurrent overlapping writes are
 * ordered exactly as the engine's range lock orders them). P2 still requires the readable legs
 * to agree on uncertain bytes.
 *
 * Runs: ENBD_MODEL_RUNS (default 50; under CI=true from the fixed seed kCiSeed, else a new seed
 * each time), ENBD_MODEL_STEPS (most steps per run, default 24; lengths
 * are spread evenly up to it), seed ENBD_MODEL_SEED, ENBD_MODEL_SHRINK=1 to shrink a failure
 * (slow: each run takes real time), ENBD_MODEL_SKIP=hang,release,... leaves op kinds out
 * (to look past one known bug for the next), ENBD_MODEL_BLANK=1 adds 'blank' (a leg server
 * restarted on an empty file behind the engine's back; needs a leg identity check to pass).
 * The seed is printed on failure (fast-check's report), with the failing run's last steps.
 * Threads: test main thread (the legs run inline).
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import fc from 'fast-check';
import * as p from '../../../src/nbd/protocol.js';
import { commandNames, errnoNames } from '../../../src/nbd/protocol-names.js';
import {
  legStates, makeStores, openFaultMirror, waitFor, type EioMode, type FaultMirror, type FaultStore,
} from '../../helpers/fault-device.js';
import { firstDifference } from '../../helpers/mirror.js';

const kDeviceBytes = 256 * 1024;
const kChunkBytes = 4096;
const kReadPieceBytes = 64 * 1024;
const kLegTimeoutMs = 60;
const kRuns = Number(process.env['ENBD_MODEL_RUNS'] ?? 50);
// Under CI the runs start from one fixed seed (a green CI says the same 50 cases pass each time);
// elsewhere each run draws a new seed, so developers' runs keep exploring. ENBD_MODEL_SEED wins.
const kCiSeed = 20261201;
const kSeed = process.env['ENBD_MODEL_SEED'] !== undefined ? Number(process.env['ENBD_MODEL_SEED']) : process.env['CI'] === 'true' ? kCiSeed : undefined;
const kShrink = process.env['ENBD_MODEL_SHRINK'] === '1';
const kStepsMax = Number(process.env['ENBD_MODEL_STEPS'] ?? 24);
/** Comma-separated op kinds to leave out (e.g. `hang,release` to look past zombie writes). */
const kLeftOut = new Set((process.env['ENBD_MODEL_SKIP'] ?? '').split(',').filter((kind) => kind !== ''));
// A leg server restarted on an empty file without the operator (op 'blank') is beyond what the
// engine can see without on-leg metadata (no identity to check at reconnect): the plain runs
// leave it out unless ENBD_MODEL_BLANK=1; the metadata runs always include it.
const kBlankInPlainRuns = process.env['ENBD_MODEL_BLANK'] === '1';
/** Runs with on-leg metadata (keeper, write intent, identity checks): ENBD_MODEL_META_RUNS. */
const kMetaRuns = Number(process.env['ENBD_MODEL_META_RUNS'] ?? 25);
/** Runs with a write-mostly last leg and write-behind (issue 14): ENBD_MODEL_WB_RUNS. */
const kWriteBehindRuns = Number(process.env['ENBD_MODEL_WB_RUNS'] ?? 25);
/**
 * Write-behind regressions, [seed, runs]: 303407100 (a fast leg's server crash losing unflushed
 * writes while a failed write's shadow was cancelled: the write-mostly leg kept its marks and was
 * copied over from the crashed leg); 1044934363 (the first fix left the write-mostly leg marked
 * but in sync when another leg became the failed write's reference: it never resynced);
 * 148356139 (with metadata: a shadow queued behind later overlapping writes that were already
 * waiting, and one of them, sent synchronously to the write-mostly leg at the bound, overtook it:
 * the legs diverged; shadows are now queued at the head, RangeLock.acquireNext).
 */
const kWriteBehindRegressions: ReadonlyArray<readonly [number, number]> = [[303407100, 1], [1044934363, 3], [148356139, 5]];
/** With metadata each store holds the data area plus 12 KiB of metadata (4 KiB bitmap, 2 superblocks). */
const kMetaLegBytes = kDeviceBytes + 12 * 1024;

type Op =
  | { kind: 'write'; offset: number; length: number; fua: boolean }
  | { kind: 'writes'; items: Array<{ offset: number; length: number }> }
  | { kind: 'zero'; offset: number; length: number; trim: boolean }
  | { kind: 'flush' }
  | { kind: 'read'; offset: number; length: number }
  | { kind: 'eio'; leg: number; mode: EioMode; budget: number }
  | { kind: 'drop'; leg: number }
  | { kind: 'crash'; leg: number }
  | { kind: 'hang'; leg: number }
  | { kind: 'release'; leg: number }
  | { kind: 'heal'; leg: number }
  | { kind: 'slow'; leg: number; ms: number }
  | { kind: 'replace'; leg: number }
  | { kind: 'refuse'; leg: number }
  | { kind: 'blank'; leg: number }
  | { kind: 'zombie'; leg: number; offset: number; length: number }
  | { kind: 'pause'; paused: boolean }
  | { kind: 'inflight'; items: Array<{ offset: number; length: number }>; leg: number; fault: 'drop' | 'crash' | 'hang'; turns: number }
  | { kind: 'sleep'; ms: number };

const rangeArb = fc.integer({ min: 0, max: kDeviceBytes - 1 }).chain((offset) =>
  fc.integer({ min: 1, max: Math.min(20_000, kDeviceBytes - offset) }).map((length) => ({ offset, length })));
const legArb = fc.integer({ min: 0, max: 2 });

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ r: rangeArb, fua: fc.boolean() }).map(({ r, fua }): Op => ({ kind: 'write', ...r, fua })) },
  { weight: 2, arbitrary: fc.array(rangeArb, { minLength: 2, maxLength: 4 }).map((items): Op => ({ kind: 'writes', items })) },
  { weight: 1, arbitrary: fc.record({ r: rangeArb, trim: fc.boolean() }).map(({ r, trim }): Op => ({ kind: 'zero', ...r, trim })) },
  { weight: 2, arbitrary: fc.constant<Op>({ kind: 'flush' }) },
  { weight: 2, arbitrary: rangeArb.map((r): Op => ({ kind: 'read', ...r })) },
  {
    weight: 3,
    arbitrary: fc.record({
      leg: legArb,
      mode: fc.constantFrom<EioMode>('writes', 'reads', 'flushes', 'all'),
      budget: fc.oneof(fc.integer({ min: 1, max: 3 }), fc.constant(Number.POSITIVE_INFINITY)),
    }).map((fault): Op => ({ kind: 'eio', ...fault })),
  },
  { weight: 2, arbitrary: legArb.map((leg): Op => ({ kind: 'drop', leg })) },
  { weight: 1, arbitrary: legArb.map((leg): Op => ({ kind: 'crash', leg })) },
  { weight: 2, arbitrary: legArb.map((leg): Op => ({ kind: 'hang', leg })) },
  { weight: 2, arbitrary: legArb.map((leg): Op => ({ kind: 'release', leg })) },
  { weight: 3, arbitrary: legArb.map((leg): Op => ({ kind: 'heal', leg })) },
  { weight: 1, arbitrary: fc.record({ leg: legArb, ms: fc.integer({ min: 1, max: 25 }) }).map((fault): Op => ({ kind: 'slow', ...fault })) },
  { weight: 1, arbitrary: legArb.map((leg): Op => ({ kind: 'replace', leg })) },
  { weight: 1, arbitrary: legArb.map((leg): Op => ({ kind: 'refuse', leg })) },
  { weight: 1, arbitrary: legArb.map((leg): Op => ({ kind: 'blank', leg })) },
  { weight: 2, arbitrary: fc.record({ leg: legArb, r: rangeArb }).map(({ leg, r }): Op => ({ kind: 'zombie', leg, ...r })) },
  { weight: 1, arbitrary: fc.boolean().map((paused): Op => ({ kind: 'pause', paused })) },
  {
    weight: 2,
    arbitrary: fc.record({
      items: fc.array(rangeArb, { minLength: 1, maxLength: 4 }),
      leg: legArb,
      fault: fc.constantFrom<'drop' | 'crash' | 'hang'>('drop', 'crash', 'hang'),
      turns: fc.integer({ min: 0, max: 3 }),
    }).map((fields): Op => ({ kind: 'inflight', ...fields })),
  },
  { weight: 3, arbitrary: fc.integer({ min: 0, max: 120 }).map((ms): Op => ({ kind: 'sleep', ms })) },
);

/** The byte data id `id` has at device offset `offset` (id 0: zeros, the initial content). */
function patternByte(id: number, offset: number): number {
  if (id === 0) return 0;
  let hash = Math.imul(id, 0x9e3779b1) ^ Math.imul(offset + 1, 0x85ebca6b);
  hash ^= hash >>> 13;
  hash = Math.imul(hash, 0xc2b2ae35);
  hash ^= hash >>> 16;
  return hash & 0xff;
}

function patternData(id: number, offset: number, length: number): Uint8Array {
  const data = new Uint8Array(length);
  for (let index = 0; index < length; index += 1) data[index] = patternByte(id, offset + index);
  return data;
}

interface FailedWrite {
  arrival: number;
  dataId: number;
  offset: number;
  length: number;
}

interface Stats {
  acked: number;
  failedWrites: number;
  readsOk: number;
  readsEio: number;
  zombies: number;
  lateApplied: number;
  crashes: number;
  replaced: number;
  parked: number;
}

class Model {
  /** Last acknowledged bytes. */
  readonly expected = new Uint8Array(kDeviceBytes);
  /** Arrival number of the write `expected` holds, per byte (0: initial zeros). */
  readonly arrivalOf = new Int32Array(kDeviceBytes);
  /** 1 where some write that failed arrived after the last acknowledged one. */
  readonly uncertain = new Uint8Array(kDeviceBytes);
  readonly failed: FailedWrite[] = [];
  private arrivals = 0;
  private dataIds = 0;

  nextDataId(): number {
    this.dataIds += 1;
    return this.dataIds;
  }

  arrive(): number {
    this.arrivals += 1;
    return this.arrivals;
  }

  /** Results must be applied in arrival order. */
  settle(arrival: number, dataId: number, offset: number, length: number, errno: number): void {
    if (errno === 0) {
      this.expected.set(dataId === 0 ? new Uint8Array(length) : patternData(dataId, offset, length), offset);
      this.arrivalOf.fill(arrival, offset, offset + length);
      this.uncertain.fill(0, offset, offset + length);
      return;
    }
    this.uncertain.fill(1, offset, offset + length);
    this.failed.push({ arrival, dataId, offset, length });
  }

  /** A byte that may legitimately be at `offset`. */
  allows(offset: number, value: number): boolean {
    if (value === this.expected[offset]) return true;
    if (this.uncertain[offset] !== 1) return false;
    const since = this.arrivalOf[offset] ?? 0;
    for (const write of this.failed) {
      if (write.arrival <= since || offset < write.offset || offset >= write.offset + write.length) continue;
      if (patternByte(write.dataId, offset) === value) return true;
    }
    return false;
  }

  /** First offset in [offset, offset+data.length) where `data` is not allowed, or -1. */
  firstViolation(offset: number, data: Uint8Array): number {
    const want = this.expected.subarray(offset, offset + data.length);
    const at = firstDifference(data, want);
    if (at < 0) return -1;
    for (let index = at; index < data.length; index += 1) {
      if (!this.allows(offset + index, data[index] as number)) return offset + index;
    }
    return -1;
  }
}

/** Lets the event loop run a few turns (the engine's doorbell wake, completions). */
async function turns(count: number): Promise<void> {
  for (let index = 0; index < count; index += 1) await new Promise((resolve) => setImmediate(resolve));
}

function describe(op: Op): string {
  return JSON.stringify(op, (_key, value: unknown) => (value === Number.POSITIVE_INFINITY ? 'inf' : value));
}

class Run {
  readonly model = new Model();
  readonly log: string[] = [];

  constructor(readonly open: FaultMirror, readonly stats: Stats) {}

  get stores(): FaultStore[] {
    return this.open.stores;
  }

  fail(message: string): never {
    assert.fail(`${message}\nlegs: ${legStates(this.open.mirror).join(', ')}\nsteps:\n  ${this.log.slice(-40).join('\n  ')}`);
  }

  async write(offset: number, length: number, flags: number): Promise<void> {
    const dataId = this.model.nextDataId();
    let arrival = 0;
    const errno = await this.open.driver.write(offset, patternData(dataId, offset, length), flags, () => (arrival = this.model.arrive()));
    this.settle(arrival, dataId, offset, length, errno, 'WRITE');
  }

  private settle(arrival: number, dataId: number, offset: number, length: number, errno: number, what: string): void {
    if (errno !== 0 && errno !== p.kEIo) this.fail(`${what} ${offset}+${length} answered ${errnoNames[errno] ?? errno}, not 0 or EIO`);
    this.model.settle(arrival, dataId, offset, length, errno);
    if (errno === 0) this.stats.acked += 1;
    else this.stats.failedWrites += 1;
  }

  async writes(items: Array<{ offset: number; length: number }>): Promise<void> {
    const done = items.map(async ({ offset, length }) => {
      const dataId = this.model.nextDataId();
      let arrival = 0;
      const errno = await this.open.driver.write(offset, patternData(dataId, offset, length), 0, () => (arrival = this.model.arrive()));
      return { arrival, dataId, offset, length, errno };
    });
    const results = await Promise.all(done);
    results.sort((left, right) => left.arrival - right.arrival);
    for (const result of results) this.settle(result.arrival, result.dataId, result.offset, result.length, result.errno, 'WRITE (concurrent)');
  }

  /** Writes in flight when a fault hits a leg (after `turnCount` event-loop turns). */
  async inflight(items: Array<{ offset: number; length: number }>, leg: number, fault: 'drop' | 'crash' | 'hang', turnCount: number): Promise<void> {
    const store = this.stores[leg] as FaultStore;
    const crashOk = fault !== 'crash' || this.othersHealthyInSync(leg);
    const writes = this.writes(items);
    await turns(turnCount);
    if (fault === 'drop') store.drop();
    else if (fault === 'crash' && crashOk) {
      this.stats.crashes += 1;
      store.crash();
    } else if (fault === 'hang') store.hang = true;
    await writes;
    if (fault === 'hang') store.hang = false;
    await turns(3);
  }

  async zero(offset: number, length: number, trim: boolean): Promise<void> {
    let arrival = 0;
    const onSubmit = (): void => void (arrival = this.model.arrive());
    const errno = trim ? await this.open.driver.trim(offset, length, 0, onSubmit) : await this.open.driver.zero(offset, length, 0, onSubmit);
    this.settle(arrival, 0, offset, length, errno, trim ? 'TRIM' : 'WRITE_ZEROES');
  }

  async read(offset: number, length: number, what: string, mustSucceed = false): Promise<Uint8Array | null> {
    const { errno, data } = await this.open.driver.read(offset, length);
    if (errno !== 0) {
      if (errno !== p.kEIo || mustSucceed) this.fail(`${what}: READ ${offset}+${length} answered ${errnoNames[errno] ?? errno}`);
      this.stats.readsEio += 1;
      return null;
    }
    this.stats.readsOk += 1;
    const bad = this.model.firstViolation(offset, data as Uint8Array);
    if (bad >= 0) {
      this.fail(`${what}: READ ${offset}+${length} returned ${(data as Uint8Array)[bad - offset]} at ${bad}; model expects ${this.model.expected[bad]}${this.model.uncertain[bad] === 1 ? ' (or a failed write)' : ''}`);
    }
    return data;
  }

  /** P1: the whole device reads back as the model allows (EIO allowed unless mustSucceed). */
  async readAll(what: string, mustSucceed = false): Promise<void> {
    const pieces: Promise<Uint8Array | null>[] = [];
    for (let offset = 0; offset < kDeviceBytes; offset += kReadPieceBytes) pieces.push(this.read(offset, kReadPieceBytes, what, mustSucceed));
    await Promise.all(pieces);
  }

  /** P2: every readable leg holds the model's bytes, and they agree. */
  checkReadable(what: string): void {
    const mirror = this.open.mirror;
    for (let chunk = 0; chunk < kDeviceBytes; chunk += kChunkBytes) {
      const legs = mirror.readableLegs(chunk, kChunkBytes);
      let first: Uint8Array | null = null;
      for (const leg of legs) {
        const bytes = (this.stores[leg] as FaultStore).bytes.subarray(chunk, chunk + kChunkBytes);
        if (first === null) {
          first = bytes;
          const bad = this.model.firstViolation(chunk, bytes);
          if (bad >= 0) this.fail(`${what}: leg ${leg} is readable at chunk ${chunk} but holds ${bytes[bad - chunk]} at ${bad}; model expects ${this.model.expected[bad]}${this.model.uncertain[bad] === 1 ? ' (or a failed write)' : ''}\n${this.explain(bad)}`);
        } else {
          const at = firstDifference(bytes, first);
          if (at >= 0) this.fail(`${what}: readable legs ${legs.join(', ')} disagree at ${chunk + at}\n${this.explain(chunk + at)}`);
        }
      }
    }
  }

  /** For a failure report: each store's byte at `offset` and the last writes it applied there. */
  explain(offset: number): string {
    const lines = [`model: ${this.model.expected[offset]}${this.model.uncertain[offset] === 1 ? ' (uncertain)' : ''}`];
    for (const [index, store] of this.stores.entries()) {
      const writes = store.applied.filter((write) => offset >= write.offsetBytes && offset < write.offsetBytes + write.lengthBytes).slice(-4)
        .map((write) => `#${write.sequence} ${commandNames[write.command] ?? write.command} ${write.offsetBytes}+${write.lengthBytes} conn ${write.connection}${write.late ? ' LATE' : ''}`);
      const received = store.received.filter((request) => offset >= request.offsetBytes && offset < request.offsetBytes + request.lengthBytes).slice(-6)
        .map((request) => `#${request.sequence} ${commandNames[request.command] ?? request.command} ${request.offsetBytes}+${request.lengthBytes} conn ${request.connection}`);
      lines.push(`store ${index}: ${store.bytes[offset]}; last writes applied there: ${writes.join('; ') || 'none'}; last requests received there: ${received.join('; ') || 'none'}`);
    }
    return lines.join('\n');
  }

  /** Crash (lose unflushed writes) only where every acknowledged write survives elsewhere. */
  private othersHealthyInSync(leg: number): boolean {
    const states = legStates(this.open.mirror);
    // With write-behind an in-sync write-mostly leg may still be behind: it holds the writes
    // only once caught up (a crash now and its shadow failing later would be a double fault).
    const behind = this.open.mirror.legStatus().map((status) => status.behindBytes ?? 0);
    return this.stores.every((store, index) => index === leg || (states[index] === 'in-sync' && store.eio === 'none' && !store.hang && store.heldCount === 0 && behind[index] === 0));
  }

  async step(op: Op): Promise<void> {
    const stores = this.stores;
    const leg = 'leg' in op ? op.leg % stores.length : 0;
    const store = stores[leg] as FaultStore;
    switch (op.kind) {
      case 'write': return await this.write(op.offset, op.length, op.fua ? p.kCmdFlagFua : 0);
      case 'writes': return await this.writes(op.items);
      case 'zero': return await this.zero(op.offset, op.length, op.trim);
      case 'flush': {
        const errno = await this.open.driver.flush();
        if (errno !== 0 && errno !== p.kEIo) this.fail(`FLUSH answered ${errnoNames[errno] ?? errno}`);
        return;
      }
      case 'read': {
        await this.read(op.offset, op.length, 'client read');
        return;
      }
      case 'eio':
        store.eio = op.mode;
        store.eioBudget = op.budget;
        return;
      case 'drop':
        store.drop();
        return await turns(3);
      case 'crash':
        if (!this.othersHealthyInSync(leg)) return;
        this.stats.crashes += 1;
        store.crash();
        // The mirror learns of a lost connection only from the leg's onClose (doorbell, next
        // turns); until then a READ sent to it fails and is retried, so the check waits for it.
        return await turns(3);
      case 'hang':
        store.hang = true;
        return;
      case 'release': {
        // The chosen leg, or else one that holds something (so late writes do land mid-run).
        const holder = store.heldCount > 0 ? store : stores.find((other) => other.heldCount > 0) ?? store;
        const lateBefore = holder.applied.filter((write) => write.late).length;
        holder.release();
        this.stats.lateApplied += holder.applied.filter((write) => write.late).length - lateBefore;
        return await turns(3);
      }
      case 'heal': return store.heal();
      case 'slow':
        store.slowMs = op.ms;
        return;
      case 'replace': return await this.replace(leg);
      case 'refuse':
        store.refuseOpen = true;
        return;
      case 'blank':
        if (!this.othersHealthyInSync(leg)) return;
        store.blank();
        return await turns(3);
      case 'zombie': {
        // A write the leg holds past the leg timeout, then the leg answers again: the held
        // write stays on its old connection until a 'release' (or the final heal).
        store.hang = true;
        await this.write(op.offset, op.length, 0);
        store.hang = false;
        if (store.heldCount > 0) this.stats.zombies += 1;
        return;
      }
      case 'pause':
        this.open.mirror.pauseResync(op.paused);
        return;
      case 'inflight': return await this.inflight(op.items, leg, op.fault, op.turns);
      case 'sleep':
        await sleep(op.ms);
        return;
    }
  }

  /** The operator swaps a leg's disk for an empty one: fail it, blank it, mark it, reconnect. */
  private async replace(leg: number): Promise<void> {
    const mirror = this.open.mirror;
    const states = legStates(mirror);
    if (!states.some((state, index) => index !== leg && state === 'in-sync')) return;
    try {
      mirror.failLegByHand(leg, 'replaced by the test');
    } catch (error) {
      // The engine refuses to take the only holder of some range (with write-behind the other
      // legs may be in sync but still behind): the operator cannot replace it now.
      if (error instanceof Error && error.message.includes('alone holds')) return;
      throw error;
    }
    (this.stores[leg] as FaultStore).blank();
    mirror.markLegDirty(leg);
    this.stats.replaced += 1;
    await mirror.reconnectLegNow(leg);
  }

  /** Heals everything and waits until every leg is in sync (reconnecting parked legs by hand). */
  async healAll(): Promise<void> {
    const mirror = this.open.mirror;
    mirror.pauseResync(false);
    for (const store of this.stores) {
      store.heal();
      store.release();
    }
    const deadline = Date.now() + 15_000;
    for (;;) {
      const states = legStates(mirror);
      // In sync and, with write-behind, caught up (a write-mostly leg may lag while in sync).
      if (states.every((state) => state === 'in-sync') && mirror.legStatus().every((leg) => (leg.behindBytes ?? 0) === 0)) return;
      if (Date.now() > deadline) this.fail(`after healing every leg, not every leg got in sync (and caught up) within 15 s; behind: ${mirror.legStatus().map((leg) => leg.behindBytes ?? 0).join(', ')}`);
      for (const [index, state] of states.entries()) {
        if (state === 'faulty' || state === 'failed') {
          this.stats.parked += 1;
          await mirror.reconnectLegNow(index);
        }
      }
      for (const store of this.stores) store.release();
      await waitFor(() => legStates(mirror).every((state) => state === 'in-sync') && mirror.legStatus().every((leg) => (leg.behindBytes ?? 0) === 0), 100);
    }
  }

  /** P3: stores identical, equal to the model, and to a full read. */
  async checkConverged(): Promise<void> {
    const stores = this.stores;
    const first = stores[0] as FaultStore;
    for (const [index, store] of stores.entries()) {
      const at = firstDifference(store.bytes.subarray(0, kDeviceBytes), first.bytes.subarray(0, kDeviceBytes));
      if (at >= 0) this.fail(`after resync, store ${index} differs from store 0 at ${at}`);
    }
    const bad = this.model.firstViolation(0, first.bytes.subarray(0, kDeviceBytes));
    if (bad >= 0) this.fail(`after resync, the stores hold ${first.bytes[bad]} at ${bad}; model expects ${this.model.expected[bad]}`);
    await this.finalRead();
  }

  /**
   * The whole device must read back once every leg is healed and in sync. A stall of this loaded
   * process longer than kLegTimeoutMs (60 ms) can still time out a healthy in-memory leg between
   * healAll() and the read (a soak at load 10 saw both legs go degraded so, seed -1082842617,
   * path 274; the replay passes). Such a drop is the fault leg's own request timeout (its store
   * records it in `timeouts`), not the mirror's doing: heal and read again, at most twice more.
   * An EIO without such a timeout, and every wrong byte, still fails.
   */
  private async finalRead(): Promise<void> {
    for (let attempt = 1; ; attempt += 1) {
      const timeoutsBefore = this.stores.map((store) => store.timeouts.length);
      const pieces: Promise<Uint8Array | null>[] = [];
      for (let offset = 0; offset < kDeviceBytes; offset += kReadPieceBytes) pieces.push(this.read(offset, kReadPieceBytes, 'final read'));
      const results = await Promise.all(pieces);
      if (results.every((data) => data !== null)) return;
      const timedOut = this.stores.filter((store, index) => store.timeouts.length > (timeoutsBefore[index] as number)).length;
      const why = `${timedOut} leg(s) timed a request out; ${this.open.mirror.legStatus().map((leg) => `${leg.index} ${leg.state}: ${leg.failureReason ?? '-'}`).join('; ')}`;
      if (timedOut === 0 || attempt >= 3) this.fail(`final read (attempt ${attempt}): a READ answered EIO after every leg was healed (${why})`);
      this.log.push(`final read attempt ${attempt}: EIO after a leg timeout (${why}); heal all again`);
      await this.healAll();
      this.checkReadable(`all in sync again (final read attempt ${attempt + 1})`);
    }
  }
}

for (const [withMetadata, writeBehind] of [[false, false], [true, false], [false, true], [true, true]] as const) {
test(`mirror model${withMetadata ? ' with on-leg metadata' : ''}${writeBehind ? ', a write-mostly leg with write-behind' : ''}: acknowledged writes survive random leg faults; readable legs agree; legs converge`, async (t) => {
  let lastFailure = '';
  const leftOut = new Set(kLeftOut);
  if (!withMetadata && !kBlankInPlainRuns) leftOut.add('blank');
  const stats: Stats = { acked: 0, failedWrites: 0, readsOk: 0, readsEio: 0, zombies: 0, lateApplied: 0, crashes: 0, replaced: 0, parked: 0 };
  const property = fc.asyncProperty(
    fc.integer({ min: 2, max: 3 }),
    fc.array(opArb, { minLength: 4, maxLength: Math.max(4, kStepsMax), size: 'max' }),
    async (legCount, ops) => {
      const stores = makeStores(legCount, withMetadata ? kMetaLegBytes : kDeviceBytes);
      const open = await openFaultMirror(stores, {
        metadata: withMetadata,
        legTimeoutMs: kLegTimeoutMs,
        probeTimeoutMs: kLegTimeoutMs,
        fenceTimeoutMs: 100,
        reconnectMinMs: 10,
        reconnectMaxMs: 40,
        legMaxFailures: 8,
        legFailureWindowMs: 60_000,
        legStableMs: 50,
      }, writeBehind ? { writeMostly: [legCount - 1], writeBehindBytes: 48 * 1024, readPolicy: 'latency' } : {});
      const run = new Run(open, stats);
      try {
        assert.equal(open.mirror.sizeBytes, kDeviceBytes, 'the export is the model device');
        await runOps(run, open, ops, leftOut);
      } catch (error) {
        lastFailure = error instanceof Error ? error.message : String(error);
        throw error;
      } finally {
        await open.close();
      }
    },
  );
  try {
    await fc.assert(property, {
      numRuns: writeBehind ? Math.max(1, Math.round(kWriteBehindRuns / (withMetadata ? 2 : 1))) : withMetadata ? kMetaRuns : kRuns,
      ...(kSeed !== undefined ? { seed: kSeed } : {}),
      endOnFailure: !kShrink,
      verbose: 1,
    });
    // Seeds that once found a write-behind bug, replayed every time (the runs to reach it).
    for (const [seed, numRuns] of writeBehind ? kWriteBehindRegressions : []) {
      await fc.assert(property, { seed, numRuns, endOnFailure: true, verbose: 1 });
    }
  } catch (error) {
    // fast-check's report names the seed and the counterexample; add what the run saw.
    const report = error instanceof Error ? error.message : String(error);
    assert.fail(`${report}\n\nlast failure:\n${lastFailure}`);
  }
  t.diagnostic(`model coverage: ${JSON.stringify(stats)}`);
  assert.ok(stats.acked > 0 && stats.failedWrites > 0, 'runs had both acknowledged and failed writes');
});
}

async function runOps(run: Run, open: FaultMirror, ops: Op[], leftOut: Set<string>): Promise<void> {
  for (const [index, op] of ops.entries()) {
    if (leftOut.has(op.kind)) continue;
    run.log.push(`${index}: ${describe(op)}`);
    await run.step(op);
    run.log.push(`   -> legs ${legStates(open.mirror).join(', ')}`);
    run.checkReadable(`after step ${index}`);
    await run.readAll(`after step ${index}`);
    run.checkReadable(`after step ${index}'s read-back`);
  }
  run.log.push('heal all');
  await run.healAll();
  run.checkReadable('all in sync');
  await run.checkConverged();
}

// Guard: in about 1 of 10 files of 100 runs something (not found yet) stays referenced after
// every mirror closed, and the file's process would never exit, stalling the whole suite. The
// results are reported by then; name what is left and exit with the file's own status.
after(() => {
  setTimeout(() => {
    const active = (process as unknown as { _getActiveHandles?: () => unknown[] })._getActiveHandles?.() ?? [];
    process.stderr.write(`mirror-model: still referenced 5 s after the tests: ${active.map((handle) => (handle as object).constructor.name).join(', ')}\n`);
    process.exit(process.exitCode ?? 0);
  }, 5000).unref();
});
