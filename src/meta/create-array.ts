/**
 * Creating an array: fresh metadata (both superblock copies, a clean bitmap) on every leg.
 * Shared by `enbd create` (src/cli/create.ts) and, later, the embedded default's first start.
 *
 * Threads: the legs' thread (main thread for the CLI).
 *
 * Design notes: every check runs before the first write, so a refused create leaves every leg
 * untouched. What a fresh superblock holds:
 * | field             | value                                                              |
 * |-------------------|--------------------------------------------------------------------|
 * | arrayUuid         | random UUID, the same on every leg                                 |
 * | legUuid, slot     | random UUID per leg; slot = position of its --leg                  |
 * | members[i].state  | --assume-clean: all in-sync; else leg 0 in-sync, the others        |
 * |                   | needs-full-sync (the first assembly copies leg 0 to them)          |
 * | members[i].events | 1 (the creation is generation 1)                                   |
 * | events            | 1                                                                  |
 * | generations       | one random id, the same on every leg (the array's first generation) |
 * | state             | clean (nothing in flight)                                          |
 * | owner             | null (no daemon holds the legs)                                    |
 *
 * After writing, every leg is read back: a leg holding another slot's UUID means two --leg
 * values reach the same device, and the create fails (its metadata is then not usable).
 *
 * Invariants:
 * - Legs of different sizes are refused (the data size must be the same on every leg).
 * - A leg with enbd magic in either copy is refused unless `force`.
 */
import { randomUUID } from 'node:crypto';
import { assert } from '../core/assert.js';
import { EnbdError } from '../core/errors.js';
import { computeLayout, defaultBitmapChunkBytes, type LegLayout } from './layout.js';
import type { LegMeta } from './leg-meta.js';
import { kMembersMax, newGenerationId, type MemberRecord, type Superblock } from './superblock.js';

export interface CreateLeg {
  uri: string;
  meta: LegMeta;
}

export interface CreateArrayOptions {
  name: string;
  /** Bitmap chunk; default from the leg size (see defaultBitmapChunkBytes). */
  bitmapChunkBytes?: number;
  assumeClean: boolean;
  force: boolean;
  nowMs?: number;
  newUuid?: () => string;
}

export interface CreatedLeg {
  uri: string;
  slotIndex: number;
  legUuid: string;
  state: MemberRecord['state'];
  /** The array this leg belonged to before --force overwrote it (null when none was readable). */
  overwroteArrayUuid: string | null;
}

export interface CreateArrayResult {
  arrayUuid: string;
  arrayName: string;
  layout: LegLayout;
  legs: CreatedLeg[];
}

function checkSizes(legs: CreateLeg[]): number {
  const sizeBytes = legs[0]?.meta.sizeBytes ?? 0;
  if (legs.some((leg) => leg.meta.sizeBytes !== sizeBytes)) {
    const list = legs.map((leg) => `${leg.uri} is ${leg.meta.sizeBytes} bytes`).join(', ');
    throw new EnbdError('ENBD_ERR_META', `legs differ in size (${list}); every leg of an array must have the same size`);
  }
  return sizeBytes;
}

/**
 * Reads every leg's superblock back: two --leg values that reach the same device (a path and
 * its file:// URI, two NBD exports of one file) show up as a leg holding another slot's UUID.
 */
async function checkReadBack(legs: CreateLeg[], members: MemberRecord[]): Promise<void> {
  for (const [slotIndex, leg] of legs.entries()) {
    const found = await leg.meta.read();
    const legUuid = found.superblock?.legUuid;
    if (legUuid === members[slotIndex]?.legUuid) continue;
    const other = members.findIndex((member) => member.legUuid === legUuid);
    const what = other >= 0 ? `slot ${other}'s metadata (${legs[other]?.uri ?? '?'}): both --leg values reach the same device` : 'no metadata written by this create';
    throw new EnbdError('ENBD_ERR_META', `leg ${leg.uri} reads back ${what}; the metadata written is not usable, run enbd create again with distinct legs (--force)`);
  }
}

/**
 * Writes fresh metadata on every leg; throws ENBD_ERR_META when refused (legs untouched) or when
 * the read-back shows two legs are one device (metadata written, data untouched).
 */
export async function createArray(legs: CreateLeg[], options: CreateArrayOptions): Promise<CreateArrayResult> {
  if (legs.length === 0) throw new EnbdError('ENBD_ERR_META', 'enbd create needs at least one --leg');
  if (legs.length > kMembersMax) throw new EnbdError('ENBD_ERR_META', `at most ${kMembersMax} legs per array (got ${legs.length})`);
  const seen = new Set<string>();
  for (const leg of legs) {
    if (seen.has(leg.uri)) throw new EnbdError('ENBD_ERR_META', `leg ${leg.uri} is given twice`);
    seen.add(leg.uri);
  }
  const legSizeBytes = checkSizes(legs);
  const layout = computeLayout(legSizeBytes, options.bitmapChunkBytes ?? defaultBitmapChunkBytes(legSizeBytes));
  const previous: (string | null)[] = [];
  for (const leg of legs) {
    const found = await leg.meta.read();
    previous.push(found.superblock?.arrayUuid ?? null);
    if (found.hasMetadata && !options.force) {
      const what = found.superblock === null ? 'damaged enbd metadata' : `enbd metadata of array ${found.superblock.arrayUuid} ("${found.superblock.arrayName}", slot ${found.superblock.slotIndex})`;
      throw new EnbdError('ENBD_ERR_META', `leg ${leg.uri} already carries ${what}; pass --force to overwrite it (its data is kept, its metadata is lost)`);
    }
  }
  const newUuid = options.newUuid ?? randomUUID;
  const nowMs = options.nowMs ?? Date.now();
  const arrayUuid = newUuid();
  const generation = newGenerationId();
  const members: MemberRecord[] = legs.map((_leg, slot) => ({
    legUuid: newUuid(),
    state: options.assumeClean || slot === 0 ? 'in-sync' : 'needs-full-sync',
    events: 1,
    recoveryOffsetBytes: 0,
  }));
  for (const [slotIndex, leg] of legs.entries()) {
    const member = members[slotIndex];
    assert(member !== undefined, 'a member per leg');
    const superblock: Superblock = {
      arrayUuid,
      arrayName: options.name,
      legUuid: member.legUuid,
      slotIndex,
      members,
      legSizeBytes,
      dataSizeBytes: layout.dataSizeBytes,
      bitmapChunkBytes: layout.bitmapChunkBytes,
      bitmapOffsetBytes: layout.bitmapOffsetBytes,
      bitmapAreaBytes: layout.bitmapAreaBytes,
      events: 1,
      state: 'clean',
      owner: null,
      createdMs: nowMs,
      updatedMs: nowMs,
      generations: [generation],
    };
    // Bitmap first: a crash between the two leaves a leg without a valid superblock (blank
    // or the old one), never a new superblock over a stale bitmap.
    await leg.meta.clearBitmap(layout);
    await leg.meta.writeFresh(superblock);
  }
  await checkReadBack(legs, members);
  const created = legs.map((leg, slotIndex) => {
    const member = members[slotIndex] as MemberRecord;
    return { uri: leg.uri, slotIndex, legUuid: member.legUuid, state: member.state, overwroteArrayUuid: previous[slotIndex] ?? null };
  });
  return { arrayUuid, arrayName: options.name, layout, legs: created };
}
