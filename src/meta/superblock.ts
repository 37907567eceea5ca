/**
 * Superblock codec: one 4 KiB block per copy, a fixed little-endian header, a msgpackr-encoded
 * variable part (plain maps and arrays, no records), zero padding, and a CRC-32C over the rest.
 * Pure bytes <-> values: no I/O here (src/meta/leg-meta.ts reads and writes the copies).
 *
 * Threads: any.
 *
 * Design notes: block layout (all integers little-endian)
 * | offset | bytes | field              | meaning                                             |
 * |--------|-------|--------------------|-----------------------------------------------------|
 * | 0      | 8     | magic              | ASCII "ENBDMETA"                                     |
 * | 8      | 4     | formatVersion      | 1; a reader refuses a newer version                  |
 * | 12     | 4     | incompatFeatures   | bits a reader must understand; 0 today (else refuse) |
 * | 16     | 4     | compatFeatures     | bits a reader may ignore; 0 today                    |
 * | 20     | 4     | blockBytes         | 4096 (the copy size)                                 |
 * | 24     | 8     | sequence           | bumped on every superblock write (< 2^53)            |
 * | 32     | 4     | copyIndex          | 0 or 1: the slot this copy was written to            |
 * | 36     | 4     | payloadBytes       | length of the msgpack part                           |
 * | 40     | 24    | reserved           | zero (room for header fields)                        |
 * | 64     | n     | payload            | msgpack map, see `Superblock` (unknown keys ignored) |
 * | 64 + n | ...   | reserved           | zero up to byte 4092                                 |
 * | 4092   | 4     | crc32c             | CRC-32C of bytes 0..4091                             |
 *
 * Growth: new optional payload keys need no version change (readers ignore unknown keys); a
 * change old readers must not misread sets an incompatFeatures bit or bumps formatVersion.
 *
 * `sequence` orders the two copies (the newest valid one wins; a write goes to the other, so a
 * torn write leaves the previous superblock intact). `events` is different: the array's
 * generation, bumped on every change of membership or state, compared ACROSS legs.
 *
 * Invariants:
 * - decodeSuperblock throws nothing but EnbdError('ENBD_ERR_META') for any input bytes.
 * - encode(decode(x)) round-trips every field (tested with fast-check).
 */
import { randomBytes } from 'node:crypto';
import { Packr } from 'msgpackr';
import { assert } from '../core/assert.js';
import { kTwoPow32 } from '../core/u64.js';
import type { MemberRecord, MemberState } from '../core/status-types.js';
import { EnbdError, describeError } from '../core/errors.js';
import { crc32c } from './crc32c.js';
import { kSuperblockBytes, kSuperblockCopies } from './layout.js';

export const kSuperblockMagic = 'ENBDMETA';
export const kFormatVersion = 1;
export const kHeaderBytes = 64;
export const kChecksumOffset = kSuperblockBytes - 4;
export const kPayloadBytesMax = kChecksumOffset - kHeaderBytes;
export const kMembersMax = 32;
export const kNameBytesMax = 255;
export const kHostBytesMax = 255;

const kOffsetMagic = 0;
const kOffsetVersion = 8;
const kOffsetIncompat = 12;
const kOffsetCompat = 16;
const kOffsetBlockBytes = 20;
const kOffsetSequence = 24;
const kOffsetCopyIndex = 32;
const kOffsetPayloadBytes = 36;
const kMagicBytes = Buffer.from(kSuperblockMagic, 'ascii');

assert(kMagicBytes.length === 8, 'magic is 8 bytes');
assert(kOffsetPayloadBytes + 4 <= kHeaderBytes, 'header fields fit the header');

const packr = new Packr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number', moreTypes: false });

/** A member's role as this leg last saw it (in-sync, needs-resync, ...: core/status-types.ts). */
export type { MemberState, MemberRecord };
const kMemberStates: readonly MemberState[] = ['in-sync', 'needs-resync', 'needs-full-sync', 'removed'];

export interface OwnerRecord {
  host: string;
  pid: number;
  /** Wall-clock ms (Date.now()) of the owner's last heartbeat write. */
  heartbeatMs: number;
}

export type ArrayState = 'clean' | 'active';

export interface Superblock {
  arrayUuid: string;
  arrayName: string;
  legUuid: string;
  /** This leg's slot: its index in `members`. */
  slotIndex: number;
  /** One record per slot, index = slot. */
  members: MemberRecord[];
  /** The leg size the layout was computed for (a changed size means the metadata is gone). */
  legSizeBytes: number;
  dataSizeBytes: number;
  bitmapChunkBytes: number;
  bitmapOffsetBytes: number;
  bitmapAreaBytes: number;
  /** The array's generation: bumped on every change of membership or state. */
  events: number;
  /** clean: no write in flight when last written; active: writes may be in flight. */
  state: ArrayState;
  /** The daemon holding the legs, or null when none. */
  owner: OwnerRecord | null;
  createdMs: number;
  updatedMs: number;
  /** Checkpoints (changed-block tracking, src/engine/checkpoints.ts); absent in older metadata. */
  checkpoints?: CheckpointRecord[];
  /**
   * Generation history, newest first: [0] is the generation this table belongs to, the rest the
   * ones before it on this leg's line (at most kGenerationsMax; 16 hex digits each, random). A new
   * generation begins at every assembly and every member-table change, so two legs that ran apart
   * never share one; a leg whose history holds another leg's current generation descends from it
   * (src/meta/assemble.ts uses that to tell a stale leg from a split brain). Absent in older metadata.
   */
  generations?: string[];
}

/** Generations kept in a superblock (older ones are dropped: an ancestor that old is judged without them). */
export const kGenerationsMax = 32;
/** A generation id: 16 lowercase hex digits (8 random bytes). */
export const kGenerationPattern = /^[0-9a-f]{16}$/;

/** A new generation id: 8 random bytes as 16 hex digits. */
export function newGenerationId(): string {
  return randomBytes(8).toString('hex');
}

/** A new generation `id` in front of `history` (newest first), bounded to kGenerationsMax. */
export function nextGenerations(history: readonly string[], id: string = newGenerationId()): string[] {
  return [id, ...history].slice(0, kGenerationsMax);
}

/**
 * A checkpoint as kept in the payload (wire: [name, createdMs, frozen 0/1, granularityBytes,
 * unitBytes, runs bin]); `runs` are LEB128 (gap, length) pairs of changed units of unitBytes.
 */
export interface CheckpointRecord {
  name: string;
  createdMs: number;
  frozen: boolean;
  granularityBytes: number;
  unitBytes: number;
  runs: Uint8Array;
}

/** compatFeatures bit: the payload lists checkpoints (older readers ignore them). */
export const kCompatCheckpoints = 1;
/** compatFeatures bit: the payload carries the generation history (older readers ignore it). */
export const kCompatGenerations = 2;

export interface DecodedCopy {
  superblock: Superblock;
  sequence: number;
  copyIndex: number;
  formatVersion: number;
}

function fail(reason: string): never {
  throw new EnbdError('ENBD_ERR_META', reason);
}

// ---- encode -----------------------------------------------------------------------------------

function checkText(what: string, value: string, bytesMax: number): void {
  if (Buffer.byteLength(value, 'utf8') > bytesMax) fail(`${what} is longer than ${bytesMax} bytes`);
}

/** Encodes `superblock` as copy `copyIndex` with `sequence`: a fresh 4 KiB block. */
export function encodeSuperblock(superblock: Superblock, copyIndex: number, sequence: number): Uint8Array {
  assert(copyIndex >= 0 && copyIndex < kSuperblockCopies && Number.isInteger(copyIndex), 'copy index 0 or 1');
  assert(Number.isSafeInteger(sequence) && sequence >= 1, 'sequence is a positive safe integer');
  checkSuperblock(superblock);
  // The reader takes only safe non-negative integers: writing anything else would leave a copy it refuses.
  if (!isCount(superblock.events)) fail(`events ${superblock.events} is not a safe non-negative integer`);
  for (const member of superblock.members) {
    if (!isCount(member.events) || !isCount(member.recoveryOffsetBytes)) fail(`member ${member.legUuid} has events or recovery offset that is not a safe non-negative integer`);
  }
  const generations = superblock.generations ?? [];
  if (generations.length > kGenerationsMax || !generations.every((id) => kGenerationPattern.test(id))) {
    fail(`generations must be at most ${kGenerationsMax} ids of 16 hex digits`);
  }
  checkText('array name', superblock.arrayName, kNameBytesMax);
  if (superblock.owner !== null) checkText('owner host', superblock.owner.host, kHostBytesMax);
  const payload = packr.pack(toWire(superblock));
  if (payload.length > kPayloadBytesMax) fail(`superblock payload of ${payload.length} bytes exceeds ${kPayloadBytesMax}`);
  const block = new Uint8Array(kSuperblockBytes);
  const view = new DataView(block.buffer);
  block.set(kMagicBytes, kOffsetMagic);
  view.setUint32(kOffsetVersion, kFormatVersion, true);
  view.setUint32(kOffsetIncompat, 0, true);
  view.setUint32(kOffsetCompat, ((superblock.checkpoints?.length ?? 0) > 0 ? kCompatCheckpoints : 0) | ((superblock.generations?.length ?? 0) > 0 ? kCompatGenerations : 0), true);
  view.setUint32(kOffsetBlockBytes, kSuperblockBytes, true);
  view.setUint32(kOffsetSequence, sequence % kTwoPow32, true);
  view.setUint32(kOffsetSequence + 4, Math.floor(sequence / kTwoPow32), true);
  view.setUint32(kOffsetCopyIndex, copyIndex, true);
  view.setUint32(kOffsetPayloadBytes, payload.length, true);
  block.set(payload, kHeaderBytes);
  view.setUint32(kChecksumOffset, crc32c(block, 0, kChecksumOffset), true);
  return block;
}

/**
 * The wire form: members as compact tuples [legUuid, stateIndex, events, recoveryOffset] plus
 * the leg's name as a fifth element when it has one (older metadata has four; a reader takes
 * tuples of four or more, so older readers skip the name).
 */
function toWire(superblock: Superblock): Record<string, unknown> {
  return {
    arrayUuid: superblock.arrayUuid,
    arrayName: superblock.arrayName,
    legUuid: superblock.legUuid,
    slotIndex: superblock.slotIndex,
    members: superblock.members.map((member) => [member.legUuid, kMemberStates.indexOf(member.state), member.events, member.recoveryOffsetBytes, ...(member.name !== undefined ? [member.name] : [])]),
    legSizeBytes: superblock.legSizeBytes,
    dataSizeBytes: superblock.dataSizeBytes,
    bitmapChunkBytes: superblock.bitmapChunkBytes,
    bitmapOffsetBytes: superblock.bitmapOffsetBytes,
    bitmapAreaBytes: superblock.bitmapAreaBytes,
    events: superblock.events,
    state: superblock.state,
    owner: superblock.owner === null ? null : [superblock.owner.host, superblock.owner.pid, superblock.owner.heartbeatMs],
    createdMs: superblock.createdMs,
    updatedMs: superblock.updatedMs,
    ...((superblock.generations?.length ?? 0) > 0 ? { generations: Buffer.from((superblock.generations ?? []).join(''), 'hex') } : {}),
    ...((superblock.checkpoints?.length ?? 0) > 0 ? { checkpoints: (superblock.checkpoints ?? []).map((record) => [record.name, record.createdMs, record.frozen ? 1 : 0, record.granularityBytes, record.unitBytes, record.runs]) } : {}),
  };
}

/** Bytes of the msgpack payload `superblock` encodes to (the keeper sizes checkpoint maps with it). */
export function superblockPayloadBytes(superblock: Superblock): number {
  return packr.pack(toWire(superblock)).length;
}

// ---- decode -----------------------------------------------------------------------------------

/** True when the block starts with the enbd magic (a torn or damaged copy still has it). */
export function hasMagic(block: Uint8Array): boolean {
  if (block.length < kMagicBytes.length) return false;
  for (let at = 0; at < kMagicBytes.length; at += 1) if (block[at] !== kMagicBytes[at]) return false;
  return true;
}

/** True when every byte is zero (a copy never written). */
export function isBlank(block: Uint8Array): boolean {
  for (let at = 0; at < block.length; at += 1) if (block[at] !== 0) return false;
  return true;
}

/**
 * Decodes one copy. Throws EnbdError('ENBD_ERR_META') naming the first problem (wrong size, no
 * magic, checksum mismatch, unknown version or feature, bad payload) and nothing else.
 */
export function decodeSuperblock(block: Uint8Array): DecodedCopy {
  if (block.length !== kSuperblockBytes) fail(`superblock copy is ${block.length} bytes, not ${kSuperblockBytes}`);
  if (!hasMagic(block)) fail(isBlank(block) ? 'blank (all zeros: never written)' : 'no enbd magic');
  const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
  const stored = view.getUint32(kChecksumOffset, true);
  const computed = crc32c(block, 0, kChecksumOffset);
  if (stored !== computed) fail(`checksum mismatch (stored 0x${stored.toString(16)}, computed 0x${computed.toString(16)}): torn or damaged`);
  const formatVersion = view.getUint32(kOffsetVersion, true);
  if (formatVersion === 0 || formatVersion > kFormatVersion) fail(`format version ${formatVersion} is not supported (this enbd reads 1 to ${kFormatVersion})`);
  const incompat = view.getUint32(kOffsetIncompat, true);
  if (incompat !== 0) fail(`unknown incompatible features 0x${incompat.toString(16)}`);
  const blockBytes = view.getUint32(kOffsetBlockBytes, true);
  if (blockBytes !== kSuperblockBytes) fail(`header says ${blockBytes}-byte blocks, not ${kSuperblockBytes}`);
  const sequenceHigh = view.getUint32(kOffsetSequence + 4, true);
  if (sequenceHigh >= 2 ** 21) fail('sequence is beyond 2^53');
  const sequence = sequenceHigh * kTwoPow32 + view.getUint32(kOffsetSequence, true);
  if (sequence === 0) fail('sequence 0 (never valid)');
  const copyIndex = view.getUint32(kOffsetCopyIndex, true);
  if (copyIndex >= kSuperblockCopies) fail(`copy index ${copyIndex} is not 0 or 1`);
  const payloadBytes = view.getUint32(kOffsetPayloadBytes, true);
  if (payloadBytes === 0 || payloadBytes > kPayloadBytesMax) fail(`payload length ${payloadBytes} out of range`);
  let wire: unknown;
  try {
    wire = packr.unpack(Buffer.from(block.buffer, block.byteOffset + kHeaderBytes, payloadBytes));
  } catch (error) {
    fail(`payload is not valid msgpack: ${describeError(error)}`);
  }
  return { superblock: fromWire(wire), sequence, copyIndex, formatVersion };
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function field<T>(wire: Record<string, unknown>, key: string, check: (value: unknown) => value is T, what: string): T {
  const value = wire[key];
  if (!check(value)) fail(`payload field ${key} is missing or not ${what}`);
  return value;
}

const isString = (value: unknown): value is string => typeof value === 'string';
const isCount = (value: unknown): value is number => typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;
const isState = (value: unknown): value is ArrayState => value === 'clean' || value === 'active';

function fromWire(wire: unknown): Superblock {
  if (!isRecord(wire)) fail('payload is not a map');
  const superblock: Superblock = {
    arrayUuid: field(wire, 'arrayUuid', isString, 'a string'),
    arrayName: field(wire, 'arrayName', isString, 'a string'),
    legUuid: field(wire, 'legUuid', isString, 'a string'),
    slotIndex: field(wire, 'slotIndex', isCount, 'a count'),
    members: membersFromWire(wire['members']),
    legSizeBytes: field(wire, 'legSizeBytes', isCount, 'a count'),
    dataSizeBytes: field(wire, 'dataSizeBytes', isCount, 'a count'),
    bitmapChunkBytes: field(wire, 'bitmapChunkBytes', isCount, 'a count'),
    bitmapOffsetBytes: field(wire, 'bitmapOffsetBytes', isCount, 'a count'),
    bitmapAreaBytes: field(wire, 'bitmapAreaBytes', isCount, 'a count'),
    events: field(wire, 'events', isCount, 'a count'),
    state: field(wire, 'state', isState, '"clean" or "active"'),
    owner: ownerFromWire(wire['owner']),
    createdMs: field(wire, 'createdMs', isCount, 'a count'),
    updatedMs: field(wire, 'updatedMs', isCount, 'a count'),
  };
  const checkpoints = checkpointsFromWire(wire['checkpoints']);
  if (checkpoints.length > 0) superblock.checkpoints = checkpoints;
  const generations = generationsFromWire(wire['generations']);
  if (generations.length > 0) superblock.generations = generations;
  checkSuperblock(superblock);
  return superblock;
}

/** A recorded leg name: what src/engine/leg-names.ts accepts (1 to 32 of [a-zA-Z0-9_-]). */
const kMemberNamePattern = /^[a-zA-Z0-9_-]{1,32}$/;

function membersFromWire(value: unknown): MemberRecord[] {
  if (!Array.isArray(value)) fail('payload field members is missing or not an array');
  if (value.length === 0 || value.length > kMembersMax) fail(`members has ${value.length} entries (1 to ${kMembersMax})`);
  return value.map((entry: unknown, slot) => {
    if (!Array.isArray(entry) || entry.length < 4) fail(`member ${slot} is not [legUuid, state, events, recoveryOffset]`);
    const [legUuid, stateIndex, events, recoveryOffsetBytes, name] = entry as unknown[];
    const state = typeof stateIndex === 'number' ? kMemberStates[stateIndex] : undefined;
    if (!isString(legUuid) || state === undefined || !isCount(events) || !isCount(recoveryOffsetBytes)) {
      fail(`member ${slot} has a bad field`);
    }
    if (name !== undefined && name !== null && !(isString(name) && kMemberNamePattern.test(name))) fail(`member ${slot} has a bad name`);
    return { legUuid, state, events, recoveryOffsetBytes, ...(isString(name) ? { name } : {}) };
  });
}

function generationsFromWire(value: unknown): string[] {
  if (value === undefined || value === null) return [];
  if (!(value instanceof Uint8Array) || value.length % 8 !== 0 || value.length > 8 * kGenerationsMax) {
    fail(`generations is not a byte string of at most ${kGenerationsMax} 8-byte ids`);
  }
  const hex = Buffer.from(value.buffer, value.byteOffset, value.length).toString('hex');
  const ids: string[] = [];
  for (let at = 0; at < hex.length; at += 16) ids.push(hex.slice(at, at + 16));
  return ids;
}

function checkpointsFromWire(value: unknown): CheckpointRecord[] {
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value) || value.length > 64) fail('checkpoints is not a list of at most 64 entries');
  return value.map((entry: unknown, at) => {
    if (!Array.isArray(entry) || entry.length < 6) fail(`checkpoint ${at} is not [name, createdMs, frozen, granularity, unit, runs]`);
    const [name, createdMs, frozen, granularityBytes, unitBytes, runs] = entry as unknown[];
    if (!isString(name) || !isCount(createdMs) || (frozen !== 0 && frozen !== 1) || !isCount(granularityBytes) || !isCount(unitBytes) || !(runs instanceof Uint8Array)) {
      fail(`checkpoint ${at} has a bad field`);
    }
    return { name, createdMs, frozen: frozen === 1, granularityBytes, unitBytes, runs: Uint8Array.from(runs) };
  });
}

function ownerFromWire(value: unknown): OwnerRecord | null {
  if (value === null || value === undefined) return null;
  if (!Array.isArray(value) || value.length < 3) fail('owner is not null or [host, pid, heartbeatMs]');
  const [host, pid, heartbeatMs] = value as unknown[];
  if (!isString(host) || !isCount(pid) || !isCount(heartbeatMs)) fail('owner has a bad field');
  return { host, pid, heartbeatMs };
}

/** Cross-field rules, on encode (a programmer error there) and decode (bad bytes). */
function checkSuperblock(superblock: Superblock): void {
  const { members, slotIndex } = superblock;
  if (members.length === 0 || members.length > kMembersMax) fail(`members has ${members.length} entries (1 to ${kMembersMax})`);
  if (slotIndex >= members.length) fail(`slot ${slotIndex} is outside the ${members.length} members`);
  if (members[slotIndex]?.legUuid !== superblock.legUuid) fail(`member ${slotIndex} is not this leg (${superblock.legUuid})`);
  if (superblock.dataSizeBytes > superblock.bitmapOffsetBytes) fail('data size overlaps the bitmap');
  if (superblock.bitmapOffsetBytes + superblock.bitmapAreaBytes > superblock.legSizeBytes) fail('bitmap lies outside the leg');
  if (superblock.bitmapChunkBytes === 0 || superblock.dataSizeBytes % superblock.bitmapChunkBytes !== 0) {
    fail(`data size ${superblock.dataSizeBytes} is not a multiple of the bitmap chunk ${superblock.bitmapChunkBytes}`);
  }
}
