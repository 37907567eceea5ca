/**
 * Checkpoints (changed-block tracking, issue 17): named maps of the chunks that data-changing
 * requests (WRITE, WRITE_ZEROES, TRIM) touched since the checkpoint was created. Exported over
 * NBD as the meta context `qemu:dirty-bitmap:NAME` (bit 0 = changed since the checkpoint) and
 * read by `enbd backup --since NAME` to copy only the changed extents.
 *
 * Thread: main thread (the session master marks at dispatch; the control plane creates,
 * freezes and removes; the NBD server reads extents). The maps are DirtyMaps (SABs), so a
 * later reader on another thread could attach.
 *
 * Design notes
 * | state   | marked by writes | meaning                                                   |
 * |---------|------------------|-----------------------------------------------------------|
 * | active  | yes              | changed since `createdMs`                                 |
 * | frozen  | no               | changed between `createdMs` and the freeze (a backup in   |
 * |         |                  | progress copies it; the next checkpoint took over)        |
 *
 * - `mark` is the hot path: one `markRange` per active checkpoint, no allocation (the active
 *   maps are kept in a plain array rebuilt only on create/freeze/remove).
 * - Marks happen when a data-changing request is dispatched (before any leg has it, so before
 *   its ack); a checkpoint created (or a freeze taking effect) while writes are in flight is
 *   marked with their ranges too (`seed`): a write not yet completed at the checkpoint may land
 *   after a backup reads the range, so it belongs to the new checkpoint.
 * - Lean toward changed: the map may report a chunk changed that was not (a whole chunk for a
 *   partial write, a coarse unit after a restart, the write-intent bitmap after a crash), never
 *   the reverse.
 *
 * Persistence (`toRecords` / `fromRecords`, kept in the superblock payload by the keeper): each
 * map as runs of changed units, LEB128 (gap, length) pairs; a map whose runs do not fit its
 * byte budget is coarsened (the unit doubles, OR of neighbours) until it fits, so the encoding
 * is bounded and only ever over-reports.
 *
 * Invariants:
 * - At most kCheckpointsMax checkpoints; names match kCheckpointNamePattern, unique.
 * - The granularity is a power of two in [4 KiB, 64 MiB], the same for every checkpoint.
 */
import { assert } from '../core/assert.js';
import { EnbdError } from '../core/errors.js';
import { DirtyMap } from '../bitmap/dirty-map.js';
import type { CheckpointRecord } from '../meta/superblock.js';

export type { CheckpointRecord };

export const kCheckpointsMax = 8;
export const kCheckpointGranularityDefault = 64 * 1024;
export const kCheckpointGranularityMin = 4096;
export const kCheckpointGranularityMax = 64 * 1024 * 1024;
/** Names: 1..64 characters, letters, digits, '.', '_', '-', '+', '@', not starting with '.' or '-'. */
export const kCheckpointNamePattern = /^[A-Za-z0-9_+@][A-Za-z0-9._+@-]{0,63}$/;
const kPageBytes = 4096;

export type CheckpointState = 'active' | 'frozen';

export interface CheckpointInfo {
  name: string;
  createdMs: number;
  state: CheckpointState;
  granularityBytes: number;
  changedBytes: number;
}

interface Checkpoint {
  name: string;
  createdMs: number;
  state: CheckpointState;
  map: DirtyMap;
}

export function checkGranularity(value: number, what = '--checkpoint-granularity'): number {
  if (!Number.isSafeInteger(value) || value < kCheckpointGranularityMin || value > kCheckpointGranularityMax || (value & (value - 1)) !== 0) {
    throw new EnbdError('ENBD_ERR_CONFIG', `${what} must be a power of two from 4 KiB to 64 MiB, got ${value}`);
  }
  return value;
}

export function checkCheckpointName(name: unknown): string {
  if (typeof name !== 'string' || !kCheckpointNamePattern.test(name)) {
    throw new EnbdError('ENBD_ERR_CHECKPOINT', `checkpoint name must be 1 to 64 characters of letters, digits, '.', '_', '-', '+', '@' (not starting with '.' or '-'), got ${JSON.stringify(name)}`);
  }
  return name;
}

export class CheckpointSet {
  readonly granularityBytes: number;
  readonly deviceBytes: number;
  private readonly all: Checkpoint[] = [];
  /** The maps of the active checkpoints (the hot path's list). */
  private active: DirtyMap[] = [];

  constructor(deviceBytes: number, granularityBytes = kCheckpointGranularityDefault) {
    assert(Number.isSafeInteger(deviceBytes) && deviceBytes > 0, 'device size is a positive integer');
    this.deviceBytes = deviceBytes;
    this.granularityBytes = checkGranularity(granularityBytes);
  }

  get count(): number {
    return this.all.length;
  }

  /** Hot path: marks the range in every active checkpoint. No allocation. */
  mark(offsetBytes: number, lengthBytes: number): void {
    const active = this.active;
    if (active.length === 0 || lengthBytes === 0) return;
    const end = Math.min(this.deviceBytes, offsetBytes + lengthBytes);
    if (end <= offsetBytes) return;
    for (let at = 0; at < active.length; at += 1) (active[at] as DirtyMap).markRange(offsetBytes, end - offsetBytes);
  }

  /**
   * A new active checkpoint. `seed` visits the ranges of writes in flight (they are marked:
   * they may land after a reader of the checkpoint's start state).
   */
  create(name: string, nowMs: number, seed: (visit: (offsetBytes: number, lengthBytes: number) => void) => void): CheckpointInfo {
    checkCheckpointName(name);
    if (this.find(name) !== null) throw new EnbdError('ENBD_ERR_CHECKPOINT', `checkpoint ${name} exists already`);
    if (this.all.length >= kCheckpointsMax) {
      throw new EnbdError('ENBD_ERR_CHECKPOINT', `at most ${kCheckpointsMax} checkpoints; remove one first (enbd checkpoint remove NAME)`);
    }
    const checkpoint: Checkpoint = { name, createdMs: nowMs, state: 'active', map: this.newMap() };
    seed((offsetBytes, lengthBytes) => this.markOne(checkpoint.map, offsetBytes, lengthBytes));
    this.all.push(checkpoint);
    this.rebuild();
    return this.info(checkpoint);
  }

  /**
   * One step for a backup: `since` stops being marked (frozen: its map is what changed from
   * its creation to now) and `next` starts now. No write falls between the two.
   */
  freeze(since: string, next: string, nowMs: number, seed: (visit: (offsetBytes: number, lengthBytes: number) => void) => void): { frozen: CheckpointInfo; created: CheckpointInfo } {
    const old = this.require(since);
    if (old.state === 'frozen') throw new EnbdError('ENBD_ERR_CHECKPOINT', `checkpoint ${since} is frozen already (a backup took it over); back it up again with --since ${since} and no --new-checkpoint, or remove it`);
    checkCheckpointName(next);
    if (this.find(next) !== null) throw new EnbdError('ENBD_ERR_CHECKPOINT', `checkpoint ${next} exists already`);
    if (this.all.length >= kCheckpointsMax) throw new EnbdError('ENBD_ERR_CHECKPOINT', `at most ${kCheckpointsMax} checkpoints; remove one first`);
    old.state = 'frozen';
    const created = this.create(next, nowMs, seed);
    return { frozen: this.info(old), created };
  }

  remove(name: string): CheckpointInfo {
    const checkpoint = this.require(name);
    this.all.splice(this.all.indexOf(checkpoint), 1);
    this.rebuild();
    return this.info(checkpoint);
  }

  list(): CheckpointInfo[] {
    return this.all.map((checkpoint) => this.info(checkpoint));
  }

  names(): string[] {
    return this.all.map((checkpoint) => checkpoint.name);
  }

  /** The map of a checkpoint (read-only use: extents), or null. */
  map(name: string): DirtyMap | null {
    return this.find(name)?.map ?? null;
  }

  /** Changed runs in bytes from `offsetBytes` (at most `runsMax`, within `lengthBytes`). */
  runs(name: string, offsetBytes: number, lengthBytes: number, runsMax: number): Array<{ offsetBytes: number; lengthBytes: number }> {
    const map = this.require(name).map;
    return changedRuns(map, offsetBytes, lengthBytes, runsMax);
  }

  /** After an unclean stop: every chunk the write-intent bitmap marks is changed everywhere. */
  markFromBitmap(bitmap: Uint8Array, chunkBytes: number, chunkCount: number): void {
    for (const checkpoint of this.all) {
      for (let chunk = 0; chunk < chunkCount; chunk += 1) {
        if ((((bitmap[chunk >> 3] as number) >> (chunk & 7)) & 1) === 0) continue;
        this.markOne(checkpoint.map, chunk * chunkBytes, chunkBytes);
      }
    }
  }

  // ---- persistence --------------------------------------------------------------------------

  /** Every checkpoint as a record whose runs take at most `budgetBytes` each. */
  toRecords(budgetBytes: number): CheckpointRecord[] {
    return this.all.map((checkpoint) => {
      const { unitBytes, runs } = encodeMap(checkpoint.map, budgetBytes);
      return { name: checkpoint.name, createdMs: checkpoint.createdMs, frozen: checkpoint.state === 'frozen', granularityBytes: checkpoint.map.chunkBytes, unitBytes, runs };
    });
  }

  /** Restores checkpoints from records (the superblock payload); records that do not fit are skipped with a reason. */
  restore(records: readonly CheckpointRecord[]): string[] {
    const problems: string[] = [];
    for (const record of records) {
      if (this.all.length >= kCheckpointsMax || this.find(record.name) !== null || !kCheckpointNamePattern.test(record.name)) {
        problems.push(`checkpoint ${record.name} skipped (duplicate, bad name or too many)`);
        continue;
      }
      const map = this.newMap();
      if (!decodeRuns(record.runs, record.unitBytes, (offsetBytes, lengthBytes) => this.markOne(map, offsetBytes, lengthBytes))) {
        map.markAll();
        problems.push(`checkpoint ${record.name}: its stored map is damaged; every block counts as changed`);
      }
      if (record.granularityBytes !== this.granularityBytes) problems.push(`checkpoint ${record.name} was kept at ${record.granularityBytes}-byte granularity; it now uses ${this.granularityBytes}`);
      this.all.push({ name: record.name, createdMs: record.createdMs, state: record.frozen ? 'frozen' : 'active', map });
    }
    this.rebuild();
    return problems;
  }

  // ---- helpers ------------------------------------------------------------------------------

  private newMap(): DirtyMap {
    const chunks = Math.ceil(this.deviceBytes / this.granularityBytes);
    const pageChunks = kPageBytes * 8;
    // Every page can be had: the map is exact (no sentinel from pool exhaustion).
    return DirtyMap.create({ deviceBytes: this.deviceBytes, chunkBytes: this.granularityBytes, pageBytes: kPageBytes, poolPages: Math.max(1, Math.ceil(chunks / pageChunks)) });
  }

  private markOne(map: DirtyMap, offsetBytes: number, lengthBytes: number): void {
    const end = Math.min(this.deviceBytes, offsetBytes + lengthBytes);
    if (end > offsetBytes && offsetBytes >= 0) map.markRange(offsetBytes, end - offsetBytes);
  }

  private rebuild(): void {
    this.active = this.all.filter((checkpoint) => checkpoint.state === 'active').map((checkpoint) => checkpoint.map);
  }

  private find(name: string): Checkpoint | null {
    return this.all.find((checkpoint) => checkpoint.name === name) ?? null;
  }

  private require(name: string): Checkpoint {
    const checkpoint = this.find(name);
    if (checkpoint === null) throw new EnbdError('ENBD_ERR_CHECKPOINT', `no checkpoint named ${JSON.stringify(name)} (enbd checkpoint list)`);
    return checkpoint;
  }

  private info(checkpoint: Checkpoint): CheckpointInfo {
    return { name: checkpoint.name, createdMs: checkpoint.createdMs, state: checkpoint.state, granularityBytes: checkpoint.map.chunkBytes, changedBytes: checkpoint.map.dirtyBytes() };
  }
}

/** Changed runs of `map` in bytes within [offsetBytes, offsetBytes + lengthBytes), at most runsMax. */
export function changedRuns(map: DirtyMap, offsetBytes: number, lengthBytes: number, runsMax: number): Array<{ offsetBytes: number; lengthBytes: number }> {
  const out: Array<{ offsetBytes: number; lengthBytes: number }> = [];
  const endBytes = Math.min(map.deviceBytes, offsetBytes + lengthBytes);
  const chunkBytes = map.chunkBytes;
  const run = { firstChunk: 0, chunkCount: 0 };
  let chunk = Math.floor(offsetBytes / chunkBytes);
  const limitChunk = Math.ceil(endBytes / chunkBytes);
  while (out.length < runsMax && chunk < limitChunk && map.nextDirtyRunInto(chunk, limitChunk - chunk, run)) {
    if (run.firstChunk >= limitChunk) break;
    const start = Math.max(offsetBytes, run.firstChunk * chunkBytes);
    const end = Math.min(endBytes, (run.firstChunk + run.chunkCount) * chunkBytes);
    if (end > start) out.push({ offsetBytes: start, lengthBytes: end - start });
    chunk = run.firstChunk + run.chunkCount;
  }
  return out;
}

// ---- run encoding -------------------------------------------------------------------------------

function pushVarint(out: number[], value: number): void {
  let rest = value;
  while (rest >= 0x80) {
    out.push((rest % 0x80) | 0x80);
    rest = Math.floor(rest / 0x80);
  }
  out.push(rest);
}

/** Runs of changed units at `unitBytes` (OR of the chunks in a unit); null when over budget. */
function encodeAt(map: DirtyMap, unitBytes: number, budgetBytes: number): number[] | null {
  const out: number[] = [];
  const unitChunks = unitBytes / map.chunkBytes;
  let emittedEnd = 0;
  let pendingFirst = -1;
  let pendingEnd = -1;
  let over = false;
  const emit = (): void => {
    if (pendingFirst < 0) return;
    pushVarint(out, pendingFirst - emittedEnd);
    pushVarint(out, pendingEnd - pendingFirst);
    emittedEnd = pendingEnd;
    if (out.length > budgetBytes) over = true;
  };
  map.forEachDirtyRun((firstChunk, chunkCount) => {
    if (over) return;
    const first = Math.floor(firstChunk / unitChunks);
    const end = Math.ceil((firstChunk + chunkCount) / unitChunks);
    if (pendingFirst >= 0 && first <= pendingEnd) {
      pendingEnd = Math.max(pendingEnd, end);
      return;
    }
    emit();
    pendingFirst = first;
    pendingEnd = end;
  });
  if (!over) emit();
  return over ? null : out;
}

function encodeMap(map: DirtyMap, budgetBytes: number): { unitBytes: number; runs: Uint8Array } {
  let unitBytes = map.chunkBytes;
  for (;;) {
    const runs = encodeAt(map, unitBytes, budgetBytes);
    if (runs !== null) return { unitBytes, runs: Uint8Array.from(runs) };
    if (unitBytes >= map.deviceBytes) return { unitBytes, runs: Uint8Array.from([0, 1]) };
    unitBytes *= 2;
  }
}

/** Calls `visit(offset, length)` per run; false when the bytes are not a whole list of pairs. */
export function decodeRuns(runs: Uint8Array, unitBytes: number, visit: (offsetBytes: number, lengthBytes: number) => void): boolean {
  if (!Number.isSafeInteger(unitBytes) || unitBytes <= 0) return false;
  let at = 0;
  let unit = 0;
  const read = (): number | null => {
    let value = 0;
    let scale = 1;
    for (let bytes = 0; bytes < 8; bytes += 1) {
      if (at >= runs.length) return null;
      const byte = runs[at] as number;
      at += 1;
      value += (byte & 0x7f) * scale;
      scale *= 0x80;
      if (byte < 0x80) return value;
    }
    return null;
  };
  while (at < runs.length) {
    const gap = read();
    const length = read();
    if (gap === null || length === null) return false;
    unit += gap;
    visit(unit * unitBytes, length * unitBytes);
    unit += length;
  }
  return true;
}

// ---- the operator's face (src/control reaches checkpoints only through this) -------------------

/** What the control plane may do with checkpoints (MirrorOperations.checkpointOperations). */
export interface CheckpointOperations {
  readonly granularityBytes: number;
  /** Kept in the on-leg metadata (false: --metadata none, memory only). */
  readonly persistent: boolean;
  /** Creates `name` (seeded with writes in flight); resolves once the list is durable. */
  create(name: string): Promise<CheckpointInfo>;
  remove(name: string): Promise<CheckpointInfo>;
  /** Freezes `since` and starts `next` in one step; resolves once durable. */
  freeze(since: string, next: string): Promise<{ frozen: CheckpointInfo; created: CheckpointInfo }>;
  list(): CheckpointInfo[];
  runs(name: string, offsetBytes: number, lengthBytes: number, runsMax: number): Array<{ offsetBytes: number; lengthBytes: number }>;
}

/** The face over a set, its seed (writes in flight) and its persistence (the keeper). */
export function checkpointOperations(set: CheckpointSet, seed: (visit: (offsetBytes: number, lengthBytes: number) => void) => void, persist: (() => Promise<void>) | null): CheckpointOperations {
  const durable = async (): Promise<void> => {
    if (persist !== null) await persist();
  };
  return {
    granularityBytes: set.granularityBytes,
    persistent: persist !== null,
    create: async (name) => {
      const info = set.create(name, Date.now(), seed);
      await durable();
      return info;
    },
    remove: async (name) => {
      const info = set.remove(name);
      await durable();
      return info;
    },
    freeze: async (since, next) => {
      const result = set.freeze(since, next, Date.now(), seed);
      await durable();
      return result;
    },
    list: () => set.list(),
    runs: (name, offsetBytes, lengthBytes, runsMax) => set.runs(name, offsetBytes, lengthBytes, runsMax),
  };
}
