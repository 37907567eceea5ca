/**
 * Reads and writes one leg's metadata (both superblock copies and the write-intent bitmap)
 * through the BlockDevice interface, so it works the same for an NbdClient, a FileDevice or the
 * test MemoryDevice. Used by `enbd create` and `enbd examine`; the engine will use it to
 * assemble and to keep the superblock and bitmap current.
 *
 * Threads: the device's thread (main thread for the CLI commands).
 *
 * Design notes: copy selection
 * | copy 0  | copy 1  | used                     | reported                                  |
 * |---------|---------|--------------------------|-------------------------------------------|
 * | valid   | valid   | higher sequence          | both valid                                |
 * | valid   | invalid | copy 0                   | copy 1 torn/invalid, with the reason      |
 * | invalid | valid   | copy 1                   | copy 0 torn/invalid, with the reason      |
 * | blank   | blank   | none: no metadata        | "no enbd metadata"                        |
 * | invalid | invalid | none: metadata destroyed | both reasons (magic seen: not a blank leg)|
 * A write goes to the copy NOT used (the older or the invalid one) with sequence = newest + 1,
 * then is made durable (FUA, or FLUSH) before the write resolves; a torn write therefore leaves
 * the previous superblock readable. Two valid copies with equal sequences (never written so by
 * enbd) pick copy 0.
 *
 * Invariants:
 * - `writeSuperblock` needs a prior `read` (or `writeFresh`) so it knows the newest sequence.
 * - Bitmap bytes outside `bitmapBytes` are written as zero and ignored on read.
 */
import type { BlockDevice } from '../core/block-device.js';
import { assert } from '../core/assert.js';
import { isOperatingError } from '../core/errors.js';
import { DeviceIo } from './device-io.js';
import { kMetaBlockBytes, kSuperblockBytes, superblockOffsets, type LegLayout } from './layout.js';
import { decodeSuperblock, encodeSuperblock, hasMagic, isBlank, type Superblock } from './superblock.js';

export type CopyStatus = 'valid' | 'blank' | 'invalid';

export interface CopyReport {
  copyIndex: number;
  offsetBytes: number;
  status: CopyStatus;
  /** Why the copy is not valid (null when valid). */
  reason: string | null;
  /** True when the copy starts with the enbd magic (valid, or torn/damaged). */
  magic: boolean;
  sequence: number | null;
  events: number | null;
  superblock: Superblock | null;
}

export interface LegMetaRead {
  legSizeBytes: number;
  copies: [CopyReport, CopyReport];
  /** The copy in use, or null when neither is valid. */
  usedCopy: number | null;
  superblock: Superblock | null;
  /** True when either copy carries the enbd magic (the leg has, or had, enbd metadata). */
  hasMetadata: boolean;
}

export class LegMeta {
  private readonly io: DeviceIo;
  /** Sequence of the newest valid copy; null until read or written. */
  private newestSequence: number | null = null;
  private newestCopy = 1;

  constructor(readonly device: BlockDevice) {
    this.io = new DeviceIo(device);
  }

  get sizeBytes(): number {
    return this.device.sizeBytes;
  }

  /** Reads and decodes both superblock copies; never throws for bad bytes (I/O errors do). */
  async read(): Promise<LegMetaRead> {
    const offsets = superblockOffsets(this.device.sizeBytes);
    const bytes = new Uint8Array(2 * kSuperblockBytes);
    await this.io.read(offsets[0], bytes);
    assert(offsets[1] === offsets[0] + kSuperblockBytes, 'the two copies are adjacent');
    const copies: [CopyReport, CopyReport] = [
      inspectCopy(0, offsets[0], bytes.subarray(0, kSuperblockBytes)),
      inspectCopy(1, offsets[1], bytes.subarray(kSuperblockBytes)),
    ];
    const [first, second] = copies;
    let usedCopy: number | null = null;
    if (first.status === 'valid' && second.status === 'valid') {
      usedCopy = (second.sequence as number) > (first.sequence as number) ? 1 : 0;
    } else if (first.status === 'valid') usedCopy = 0;
    else if (second.status === 'valid') usedCopy = 1;
    const used = usedCopy === null ? null : copies[usedCopy];
    this.newestSequence = used?.sequence ?? 0;
    this.newestCopy = usedCopy ?? 1;
    return {
      legSizeBytes: this.device.sizeBytes,
      copies,
      usedCopy,
      superblock: used?.superblock ?? null,
      hasMetadata: first.magic || second.magic,
    };
  }

  /**
   * Writes `superblock` to the copy not in use, with the next sequence, durably.
   * Returns the copy index and sequence written.
   */
  async writeSuperblock(superblock: Superblock): Promise<{ copyIndex: number; sequence: number }> {
    assert(this.newestSequence !== null, 'writeSuperblock needs a read() first');
    const copyIndex = 1 - this.newestCopy;
    const sequence = this.newestSequence + 1;
    const offsets = superblockOffsets(this.device.sizeBytes);
    await this.io.write(offsets[copyIndex] as number, encodeSuperblock(superblock, copyIndex, sequence), true);
    this.newestSequence = sequence;
    this.newestCopy = copyIndex;
    return { copyIndex, sequence };
  }

  /** A fresh leg: both copies written (copy 0 sequence 1, then copy 1 sequence 2), durably. */
  async writeFresh(superblock: Superblock): Promise<void> {
    const offsets = superblockOffsets(this.device.sizeBytes);
    const bytes = new Uint8Array(2 * kSuperblockBytes);
    bytes.set(encodeSuperblock(superblock, 0, 1), 0);
    bytes.set(encodeSuperblock(superblock, 1, 2), kSuperblockBytes);
    await this.io.write(offsets[0], bytes, true);
    this.newestSequence = 2;
    this.newestCopy = 1;
  }

  /** Reads the bitmap: `layout.bitmapBytes` bytes, bit i = chunk i (byte floor(i/8), bit i%8). */
  async readBitmap(layout: LegLayout): Promise<Uint8Array> {
    const area = new Uint8Array(layout.bitmapAreaBytes);
    await this.io.read(layout.bitmapOffsetBytes, area);
    return area.subarray(0, layout.bitmapBytes);
  }

  /**
   * Writes 4 KiB pages `[firstPage, firstPage + pageCount)` of `bitmap` (layout.bitmapBytes
   * long) to the leg, durably. Bytes past bitmapBytes go out as zero.
   */
  async writeBitmapPages(layout: LegLayout, bitmap: Uint8Array, firstPage: number, pageCount: number): Promise<void> {
    assert(bitmap.length === layout.bitmapBytes, 'bitmap has layout.bitmapBytes bytes');
    assert(firstPage >= 0 && pageCount >= 1 && (firstPage + pageCount) * kMetaBlockBytes <= layout.bitmapAreaBytes, 'pages inside the bitmap area');
    const start = firstPage * kMetaBlockBytes;
    const pages = new Uint8Array(pageCount * kMetaBlockBytes);
    pages.set(bitmap.subarray(start, Math.min(bitmap.length, start + pages.length)));
    await this.io.write(layout.bitmapOffsetBytes + start, pages, true);
  }

  /** Zeroes the whole bitmap area, durably (every chunk clean). */
  async clearBitmap(layout: LegLayout): Promise<void> {
    await this.io.write(layout.bitmapOffsetBytes, new Uint8Array(layout.bitmapAreaBytes), true);
  }

  async close(): Promise<void> {
    await this.device.close();
  }
}

/** Decodes one copy into a report (never throws). */
export function inspectCopy(copyIndex: number, offsetBytes: number, block: Uint8Array): CopyReport {
  const report: CopyReport = { copyIndex, offsetBytes, status: 'invalid', reason: null, magic: hasMagic(block), sequence: null, events: null, superblock: null };
  if (isBlank(block)) return { ...report, status: 'blank', reason: 'blank (all zeros: never written)' };
  try {
    const decoded = decodeSuperblock(block);
    if (decoded.copyIndex !== copyIndex) return { ...report, reason: `holds copy ${decoded.copyIndex}, misplaced at copy ${copyIndex}` };
    return { ...report, status: 'valid', sequence: decoded.sequence, events: decoded.superblock.events, superblock: decoded.superblock };
  } catch (error) {
    if (!isOperatingError(error)) throw error;
    return { ...report, reason: error.message };
  }
}

/** Bit `chunkIndex` of a bitmap. */
export function bitmapTest(bitmap: Uint8Array, chunkIndex: number): boolean {
  return (((bitmap[Math.floor(chunkIndex / 8)] as number) >> (chunkIndex % 8)) & 1) === 1;
}

/** Sets bit `chunkIndex` of a bitmap. */
export function bitmapSet(bitmap: Uint8Array, chunkIndex: number): void {
  const byteIndex = Math.floor(chunkIndex / 8);
  assert(byteIndex < bitmap.length, 'chunk inside the bitmap');
  bitmap[byteIndex] = (bitmap[byteIndex] as number) | (1 << (chunkIndex % 8));
}

/** Number of set bits among the first `chunkCount` bits. */
export function bitmapCount(bitmap: Uint8Array, chunkCount: number): number {
  let count = 0;
  for (let chunkIndex = 0; chunkIndex < chunkCount; chunkIndex += 1) if (bitmapTest(bitmap, chunkIndex)) count += 1;
  return count;
}
