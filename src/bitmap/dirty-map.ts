/**
 * DirtyMap — one leg's "not up to date" map: one bit per chunk, two levels, in shared memory.
 *
 * Purpose: when a leg of a mirror cannot complete a write, the chunks it missed are marked
 * here; the resync actor later copies only those chunks to the leg and clears them. Design
 * from the 2003 enbd raid1 note: a top-level table of page references, pages taken on first
 * mark, and a sentinel in place of a page reference when no page can be had, meaning "every
 * chunk of this page is dirty" (conservative: a chunk may be reported dirty when it is clean,
 * never the reverse).
 *
 * Threads: the master (main thread) creates the map (`DirtyMap.create`) and hands `sab` to
 * connection actors and the resync actor, which `DirtyMap.attach(sab)`. Every thread may call
 * every method. Each instance is used by one thread (its `lockHeld` flag is thread-local).
 *
 * Shared memory layout (one SharedArrayBuffer per map, all Int32 words, in this order):
 *
 *   header      kHeaderWords words (fields below)
 *   table       tableEntries words: one entry per page of the device (encoding below)
 *   changed     ceil(tableEntries / 32) words: bit p = "page p changed since last flush"
 *   pageCounts  poolPages words: set-bit count of each pool page (emptiness in O(1))
 *   pageOwners  poolPages words: table index owning each pool page, -1 when free
 *   freeStack   poolPages words: free pool page indices, [0, freePages) valid
 *   bits        poolPages * pageWords words: the pool pages (bit b of page = chunk
 *               pageIndex * pageChunks + b; bit b lives in word b >>> 5, mask 1 << (b & 31))
 *
 * Table entry encoding (md-bitmap / nbdkit-cow style):
 *
 *   value        state     meaning                               transitions (all under lock)
 *   ----------   --------  ------------------------------------  -----------------------------
 *   0            clean     no page: every chunk of it is clean   -> k+1 on a partial mark (pool
 *                                                                   page k taken, bits set first)
 *                                                                -> -1 on a mark covering the
 *                                                                   whole page, or pool empty
 *   k+1 (>= 1)   paged     pool page k holds the bits; its       -> 0 when its last bit clears
 *                          pageCounts[k] > 0 always                 (page k back to the pool)
 *                                                                stays k+1 on any mark, even a
 *                                                                   whole-page one (bits filled)
 *   -1           sentinel  every chunk of the page counts dirty  -> 0 on a clear covering it
 *                          (no page could be had, or it was      -> k+1 on a partial clear when
 *                          marked whole)                            a pool page is free: page k
 *                                                                   filled with ones, the range
 *                                                                   cleared, then published
 *                                                                stays -1 when the pool is empty
 *
 * Marking a sentinel page is a no-op. markAll() turns clean entries into sentinels and fills
 * paged ones; it never takes pool pages (a resync materialises them while it clears). Note
 * that a materialised page keeps the sentinel's over-report: its ones outside the cleared
 * range were never necessarily marked, so "no sentinel now" does not mean "exact"; only a
 * map that never held a sentinel since its last clearAll is exact.
 *
 * Header fields (Int32 words at the start of the SAB):
 *
 *   index  field            writer                          Atomics op
 *   -----  ---------------  ------------------------------  ---------------------------------
 *   0      magic 'ENBM'     create()                        store; attach() loads
 *   1      version          create()                        store; attach() loads
 *   2      lock             every thread (futex protocol)   compareExchange/exchange/sub/wait
 *   3      chunkBytesLog2   create()                        store; immutable
 *   4      pageBitsLog2     create() (chunks per page)      store; immutable
 *   5      tableEntries     create()                        store; immutable
 *   6      poolPages        create()                        store; immutable
 *   7      pagesInUse       lock holder                     store; lock-free load ok
 *   8      sentinelPages    lock holder                     store; lock-free load ok
 *   9      freePages        lock holder (free stack top)    store; loaded under lock
 *   10/11  dirtyChunks      lock holder, low/high 32 bits   store; loaded under lock (2 words)
 *   12     generation       lock holder, +1 per change      add; lock-free load (flusher)
 *   13/14  deviceBytes      create(), low/high 32 bits      store; immutable
 *   15-23  reserved         nobody (zero)                   -
 *
 * dirtyChunks is exact for paged entries; a sentinel page counts as all of its chunks inside
 * the device (pageChunks, or fewer for the last page). So dirtyChunkCount() always equals the
 * number of chunks for which isChunkDirty() answers true; it over-counts the truly missed
 * chunks only where sentinels stand for pool exhaustion.
 *
 * Lock protocol (one lock per map; never a lock over all maps): word 2 holds 0 = free,
 * 1 = held, 2 = held with possible waiters. Take: compareExchange(0 -> 1); on failure spin
 * kLockSpins times, then exchange(2) and Atomics.wait(2) until exchange returns 0. Release:
 * sub(1); if the old value was 2, store 0 and notify one waiter. Node allows Atomics.wait on
 * the main thread (a browser main thread would not); critical sections are bounded (one page:
 * at most pageWords word operations), so the master never waits long. A wait that times out
 * kLockTimeoutsMax times in a row asserts (a thread died holding the lock).
 * Mark, clear, page take/release and counters change only under the lock. Whole-range
 * operations take the lock once per page, so a 1 TiB markRange never blocks others long.
 *
 * Lock-free readers (testRange, isChunkDirty, nextDirtyRun, takeChangedPage) load the table
 * entry with Atomics.load (0 -> clean, -1 -> dirty, k+1 -> load the bit words of page k).
 * Why a racy read is safe for the callers:
 * - Writers finish a page's bits before they publish the entry that points to it (Atomics
 *   are sequentially consistent), so an entry read as k+1 shows final bits.
 * - A page goes back to the pool only once all of its bits are clear (a full-page mark fills
 *   a paged entry rather than swapping it for a sentinel), so a reader that loaded k+1 just
 *   before the release sees zeros — true at the release — or the next owner's bits, which
 *   can only over-report (dirty: the conservative direction).
 * - A bit of the tested range changes only through a mark or clear of an overlapping range,
 *   and the engine serialises overlapping writes and resync copies with its range lock, so
 *   the answer for the caller's own range is exact; nextDirtyRun may miss a chunk marked
 *   during the scan, which the resync actor finds on its next pass.
 *
 * clearRange clears only chunks FULLY covered by the byte range (the resync copies whole
 * chunks); the last, partial chunk of the device counts as covered when the range reaches
 * the device end. markRange marks every chunk the range touches.
 *
 * Memory (4 KiB chunks, 4 KiB pages = 32768 chunks = 128 MiB of device per page): a clean
 * 1 TiB map costs header 96 B + table 8192 * 4 = 32768 B + changed flags 1024 B = 33888 B,
 * plus the pool: poolPages * (4096 + 12) B (default 64 pages: 262912 B).
 *
 * Invariants (checked by verify()):
 * - pagesInUse + freePages = poolPages; pageOwners[k] = p iff table[p] = k + 1.
 * - pageCounts[k] = popcount(page k) > 0 for a page in use; a free page is all zeros.
 * - no bit at or beyond the device's last chunk is ever set.
 * - dirtyChunks = sum of pageCounts over paged entries + chunks of sentinel pages.
 * Hot path (mark/clear/test/next): no allocation, no closures, no BigInt.
 */

import { assert, AssertionError, isPowerOfTwo } from '../core/assert.js';
import { OptionError } from '../core/errors.js';

// ---- Header word indices ------------------------------------------------------------------
export const kHeaderMagic = 0;
export const kHeaderVersion = 1;
export const kHeaderLock = 2;
export const kHeaderChunkBytesLog2 = 3;
export const kHeaderPageBitsLog2 = 4;
export const kHeaderTableEntries = 5;
export const kHeaderPoolPages = 6;
export const kHeaderPagesInUse = 7;
export const kHeaderSentinelPages = 8;
export const kHeaderFreePages = 9;
export const kHeaderDirtyChunksLow = 10;
export const kHeaderDirtyChunksHigh = 11;
export const kHeaderGeneration = 12;
export const kHeaderDeviceBytesLow = 13;
export const kHeaderDeviceBytesHigh = 14;
export const kHeaderReservedFirst = 15;
export const kHeaderWords = 24;

// ---- Encodings ----------------------------------------------------------------------------
export const kMagic = 0x454e424d; // 'ENBM'
export const kVersion = 1;
export const kEntryClean = 0;
export const kEntrySentinel = -1;
const kLockFree = 0;
const kLockHeld = 1;
const kLockContended = 2;

// ---- Limits and defaults ------------------------------------------------------------------
export const kChunkBytesMin = 512;
export const kChunkBytesMax = 64 * 1024 * 1024;
export const kChunkBytesDefault = 4096;
export const kPageBytesMin = 4;
export const kPageBytesMax = 1024 * 1024;
export const kPageBytesDefault = 4096;
export const kPoolPagesDefault = 64;
export const kTableEntriesMax = 1 << 24;
export const kPoolBytesMax = 1024 * 1024 * 1024;
const kLockSpins = 64;
const kLockWaitMs = 50;
const kLockTimeoutsMax = 200; // 10 s with no progress: the holder died.
const kTwo32 = 4294967296;

assert(isPowerOfTwo(kChunkBytesMin) && isPowerOfTwo(kChunkBytesMax));
assert(isPowerOfTwo(kPageBytesMin) && isPowerOfTwo(kPageBytesMax));
assert(kPageBytesMin % 4 === 0, 'a page is at least one Int32 word');
assert(kPageBytesMax * 8 < 2 ** 31, 'a page set-bit count fits an Int32');
assert(kHeaderReservedFirst < kHeaderWords);

export interface DirtyMapOptions {
  /** Size of the mirrored device in bytes (integer, 1 .. 2^53 - 1). */
  deviceBytes: number;
  /** Bytes per bit; power of two in [512, 64 MiB]. Default 4096. */
  chunkBytes?: number;
  /** Bytes of bits per page; power of two in [4, 1 MiB]. Default 4096 (32768 chunks). */
  pageBytes?: number;
  /** Pages preallocated in the pool; clamped to the table size. Default 64. */
  poolPages?: number;
}

/** Out parameter of nextDirtyRunInto (preallocate one per resync actor). */
export interface DirtyRun {
  firstChunk: number;
  chunkCount: number;
}

export interface DirtyMapStats {
  deviceBytes: number;
  chunkBytes: number;
  chunkCount: number;
  pageBytes: number;
  pageChunks: number;
  tableEntries: number;
  poolPages: number;
  pagesInUse: number;
  freePages: number;
  sentinelPages: number;
  dirtyChunks: number;
  dirtyBytes: number;
  generation: number;
  /** Whole SAB: header + table + changed flags + pool (pages and their bookkeeping). */
  memoryBytes: number;
  /** Header + table + changed flags: what a clean map costs beyond the pool. */
  tableBytes: number;
  /** Pool pages plus their per-page words (count, owner, free-stack slot). */
  poolBytes: number;
}

interface Geometry {
  deviceBytes: number;
  chunkBytesLog2: number;
  pageBitsLog2: number;
  tableEntries: number;
  poolPages: number;
}

interface Layout {
  tableWord: number;
  changedWord: number;
  changedWords: number;
  pageCountsWord: number;
  pageOwnersWord: number;
  freeStackWord: number;
  bitsWord: number;
  pageWords: number;
  totalBytes: number;
}

function checkPowerOfTwo(value: unknown, name: string, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value)) {
    throw new OptionError('ENBD_ERR_BITMAP_OPTION', `options.${name} must be an integer, got ${String(value)}`);
  }
  if (!isPowerOfTwo(value) || value < min || value > max) {
    throw new OptionError('ENBD_ERR_BITMAP_OPTION', 
      `options.${name} must be a power of two in [${min}, ${max}], got ${value}`);
  }
  return value;
}

function geometryFromOptions(options: DirtyMapOptions): Geometry {
  if (typeof options !== 'object' || options === null) {
    throw new OptionError('ENBD_ERR_BITMAP_OPTION', 'options must be an object');
  }
  const deviceBytes = options.deviceBytes;
  if (typeof deviceBytes !== 'number' || !Number.isSafeInteger(deviceBytes)) {
    throw new OptionError('ENBD_ERR_BITMAP_OPTION', `options.deviceBytes must be a safe integer, got ${String(deviceBytes)}`);
  }
  if (deviceBytes < 1) throw new OptionError('ENBD_ERR_BITMAP_OPTION', `options.deviceBytes must be >= 1, got ${deviceBytes}`);
  const chunkBytes = checkPowerOfTwo(
    options.chunkBytes ?? kChunkBytesDefault, 'chunkBytes', kChunkBytesMin, kChunkBytesMax);
  const pageBytes = checkPowerOfTwo(
    options.pageBytes ?? kPageBytesDefault, 'pageBytes', kPageBytesMin, kPageBytesMax);
  const pageChunks = pageBytes * 8;
  const chunkCount = Math.ceil(deviceBytes / chunkBytes);
  const tableEntries = Math.ceil(chunkCount / pageChunks);
  if (tableEntries > kTableEntriesMax) {
    throw new OptionError('ENBD_ERR_BITMAP_OPTION', `options.deviceBytes needs ${tableEntries} table entries (max ` +
      `${kTableEntriesMax}); raise options.chunkBytes or options.pageBytes`);
  }
  const poolOption = options.poolPages ?? kPoolPagesDefault;
  if (typeof poolOption !== 'number' || !Number.isSafeInteger(poolOption)) {
    throw new OptionError('ENBD_ERR_BITMAP_OPTION', `options.poolPages must be an integer, got ${String(poolOption)}`);
  }
  if (poolOption < 0) throw new OptionError('ENBD_ERR_BITMAP_OPTION', `options.poolPages must be >= 0, got ${poolOption}`);
  const poolPages = Math.min(poolOption, tableEntries);
  if (poolPages * pageBytes > kPoolBytesMax) {
    throw new OptionError('ENBD_ERR_BITMAP_OPTION', `options.poolPages * options.pageBytes must be <= ${kPoolBytesMax}`);
  }
  return {
    deviceBytes,
    chunkBytesLog2: Math.log2(chunkBytes),
    pageBitsLog2: Math.log2(pageChunks),
    tableEntries,
    poolPages,
  };
}

function computeLayout(geometry: Geometry): Layout {
  const pageWords = 2 ** geometry.pageBitsLog2 / 32;
  assert(Number.isInteger(pageWords) && pageWords >= 1);
  const changedWords = Math.ceil(geometry.tableEntries / 32);
  const tableWord = kHeaderWords;
  const changedWord = tableWord + geometry.tableEntries;
  const pageCountsWord = changedWord + changedWords;
  const pageOwnersWord = pageCountsWord + geometry.poolPages;
  const freeStackWord = pageOwnersWord + geometry.poolPages;
  const bitsWord = freeStackWord + geometry.poolPages;
  const totalWords = bitsWord + geometry.poolPages * pageWords;
  return {
    tableWord, changedWord, changedWords, pageCountsWord, pageOwnersWord, freeStackWord,
    bitsWord, pageWords, totalBytes: totalWords * 4,
  };
}

/** Number of set bits in a 32-bit word. */
function popcount32(word: number): number {
  let v = word - ((word >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24;
}

/** Mask of bits [lowBit, highBit) of one word; 0 <= lowBit < highBit <= 32. */
function wordMask(lowBit: number, highBit: number): number {
  const width = highBit - lowBit;
  return width >= 32 ? -1 : ((1 << width) - 1) << lowBit;
}

export class DirtyMap {
  readonly deviceBytes: number;
  readonly chunkBytes: number;
  /** Chunks in the device; the last one is partial when deviceBytes % chunkBytes !== 0. */
  readonly chunkCount: number;
  readonly pageBytes: number;
  /** Chunks (bits) per page. */
  readonly pageChunks: number;
  readonly tableEntries: number;
  readonly poolPages: number;
  private readonly buffer: SharedArrayBuffer;
  private readonly pageWords: number;
  private readonly lastChunkBytes: number;
  private readonly header: Int32Array;
  private readonly table: Int32Array;
  private readonly changed: Int32Array;
  private readonly pageCounts: Int32Array;
  private readonly pageOwners: Int32Array;
  private readonly freeStack: Int32Array;
  private readonly bits: Int32Array;
  private lockHeld = false;

  private constructor(buffer: SharedArrayBuffer, geometry: Geometry, layout: Layout) {
    assert(buffer.byteLength === layout.totalBytes, 'dirty map buffer size mismatch');
    this.buffer = buffer;
    this.deviceBytes = geometry.deviceBytes;
    this.chunkBytes = 2 ** geometry.chunkBytesLog2;
    this.chunkCount = Math.ceil(geometry.deviceBytes / this.chunkBytes);
    this.pageChunks = 2 ** geometry.pageBitsLog2;
    this.pageBytes = this.pageChunks / 8;
    this.tableEntries = geometry.tableEntries;
    this.poolPages = geometry.poolPages;
    this.pageWords = layout.pageWords;
    this.lastChunkBytes = geometry.deviceBytes - (this.chunkCount - 1) * this.chunkBytes;
    const pool = geometry.poolPages;
    this.header = new Int32Array(buffer, 0, kHeaderWords);
    this.table = new Int32Array(buffer, layout.tableWord * 4, geometry.tableEntries);
    this.changed = new Int32Array(buffer, layout.changedWord * 4, layout.changedWords);
    this.pageCounts = new Int32Array(buffer, layout.pageCountsWord * 4, pool);
    this.pageOwners = new Int32Array(buffer, layout.pageOwnersWord * 4, pool);
    this.freeStack = new Int32Array(buffer, layout.freeStackWord * 4, pool);
    this.bits = new Int32Array(buffer, layout.bitsWord * 4, pool * layout.pageWords);
    assert(this.tableEntries === Math.ceil(this.chunkCount / this.pageChunks));
    assert(this.lastChunkBytes >= 1 && this.lastChunkBytes <= this.chunkBytes);
  }

  /** A new map owning a new SharedArrayBuffer, every chunk clean. Throws on bad options. */
  static create(options: DirtyMapOptions): DirtyMap {
    const geometry = geometryFromOptions(options);
    const layout = computeLayout(geometry);
    const map = new DirtyMap(new SharedArrayBuffer(layout.totalBytes), geometry, layout);
    const header = map.header;
    Atomics.store(header, kHeaderChunkBytesLog2, geometry.chunkBytesLog2);
    Atomics.store(header, kHeaderPageBitsLog2, geometry.pageBitsLog2);
    Atomics.store(header, kHeaderTableEntries, geometry.tableEntries);
    Atomics.store(header, kHeaderPoolPages, geometry.poolPages);
    Atomics.store(header, kHeaderDeviceBytesLow, geometry.deviceBytes % kTwo32 | 0);
    Atomics.store(header, kHeaderDeviceBytesHigh, Math.floor(geometry.deviceBytes / kTwo32));
    for (let poolIndex = 0; poolIndex < geometry.poolPages; poolIndex += 1) {
      // Pop order 0, 1, 2, ...: the stack holds the highest index at the bottom.
      map.freeStack[poolIndex] = geometry.poolPages - 1 - poolIndex;
      map.pageOwners[poolIndex] = -1;
    }
    Atomics.store(header, kHeaderFreePages, geometry.poolPages);
    Atomics.store(header, kHeaderVersion, kVersion);
    Atomics.store(header, kHeaderMagic, kMagic); // Last: the map is complete.
    return map;
  }

  /** The same map seen from another thread (the SAB came through postMessage). */
  static attach(sab: SharedArrayBuffer): DirtyMap {
    if (!(sab instanceof SharedArrayBuffer)) throw new OptionError('ENBD_ERR_BITMAP_OPTION', 'sab must be a SharedArrayBuffer');
    if (sab.byteLength < kHeaderWords * 4) throw new OptionError('ENBD_ERR_BITMAP_OPTION', 'sab is too small for a dirty map');
    const header = new Int32Array(sab, 0, kHeaderWords);
    if (Atomics.load(header, kHeaderMagic) !== kMagic) {
      throw new OptionError('ENBD_ERR_BITMAP_OPTION', 'sab is not a dirty map');
    }
    const version = Atomics.load(header, kHeaderVersion);
    if (version !== kVersion) throw new OptionError('ENBD_ERR_BITMAP_OPTION', `dirty map version ${version} unsupported`);
    const high = Atomics.load(header, kHeaderDeviceBytesHigh);
    const geometry = geometryFromOptions({
      deviceBytes: high * kTwo32 + (Atomics.load(header, kHeaderDeviceBytesLow) >>> 0),
      chunkBytes: 2 ** Atomics.load(header, kHeaderChunkBytesLog2),
      pageBytes: 2 ** Atomics.load(header, kHeaderPageBitsLog2) / 8,
      poolPages: Atomics.load(header, kHeaderPoolPages),
    });
    assert(geometry.tableEntries === Atomics.load(header, kHeaderTableEntries));
    assert(geometry.poolPages === Atomics.load(header, kHeaderPoolPages));
    const layout = computeLayout(geometry);
    if (layout.totalBytes !== sab.byteLength) {
      throw new OptionError('ENBD_ERR_BITMAP_OPTION', 'sab size does not match its header');
    }
    return new DirtyMap(sab, geometry, layout);
  }

  get sab(): SharedArrayBuffer {
    return this.buffer;
  }

  // ---- Lock-free readers ---------------------------------------------------------------

  /** True if any chunk touched by the byte range is dirty (false for an empty range). */
  testRange(offsetBytes: number, lengthBytes: number): boolean {
    this.assertByteRange(offsetBytes, lengthBytes);
    if (lengthBytes === 0) return false;
    const firstChunk = Math.floor(offsetBytes / this.chunkBytes);
    const endChunk = Math.ceil((offsetBytes + lengthBytes) / this.chunkBytes);
    assert(firstChunk < endChunk && endChunk <= this.chunkCount);
    return this.findChunk(firstChunk, endChunk, true) < endChunk;
  }

  isChunkDirty(chunkIndex: number): boolean {
    assert(Number.isSafeInteger(chunkIndex), 'chunkIndex must be an integer');
    assert(chunkIndex >= 0 && chunkIndex < this.chunkCount, 'chunkIndex out of range');
    const page = Math.floor(chunkIndex / this.pageChunks);
    const entry = Atomics.load(this.table, page);
    if (entry === kEntryClean) return false;
    if (entry === kEntrySentinel) return true;
    const bit = chunkIndex - page * this.pageChunks;
    const word = Atomics.load(this.bits, (entry - 1) * this.pageWords + (bit >>> 5));
    return (word & (1 << (bit & 31))) !== 0;
  }

  /**
   * Calls `visit` for every run of dirty chunks, in order (runs of at most 2^20 chunks). `visit`
   * may change the map (clear or mark chunks); the scan goes on after the run it was given. For
   * the cold paths (a leg leaving or returning, metadata scans); the resync uses
   * nextDirtyRunInto with its own cursor.
   */
  forEachDirtyRun(visit: (firstChunk: number, chunkCount: number) => void): void {
    const run: DirtyRun = { firstChunk: 0, chunkCount: 0 };
    let chunk = 0;
    while (this.nextDirtyRunInto(chunk, 1 << 20, run)) {
      const { firstChunk, chunkCount } = run;
      visit(firstChunk, chunkCount);
      chunk = firstChunk + chunkCount;
    }
  }

  /**
   * The first run of dirty chunks at or after fromChunk, at most maxChunks long, written into
   * `out` (no allocation). Returns false (out untouched) when no chunk from fromChunk on is
   * dirty. A run may include a chunk marked clean meanwhile (copying it again is harmless).
   */
  nextDirtyRunInto(fromChunk: number, maxChunks: number, out: DirtyRun): boolean {
    assert(Number.isSafeInteger(fromChunk), 'fromChunk must be an integer');
    assert(fromChunk >= 0 && fromChunk <= this.chunkCount, 'fromChunk out of range');
    assert(Number.isSafeInteger(maxChunks) && maxChunks >= 1, 'maxChunks must be >= 1');
    const firstChunk = this.findChunk(fromChunk, this.chunkCount, true);
    if (firstChunk >= this.chunkCount) return false;
    const limitChunk = Math.min(this.chunkCount, firstChunk + maxChunks);
    const endChunk = this.findChunk(firstChunk, limitChunk, false);
    assert(endChunk > firstChunk && endChunk <= limitChunk);
    out.firstChunk = firstChunk;
    out.chunkCount = endChunk - firstChunk;
    return true;
  }

  /** The first dirty chunk in [fromChunk, limitChunk), or limitChunk when there is none. */
  firstDirtyChunk(fromChunk: number, limitChunk: number): number {
    assert(Number.isSafeInteger(fromChunk) && Number.isSafeInteger(limitChunk), 'chunks must be integers');
    assert(fromChunk >= 0 && fromChunk <= limitChunk && limitChunk <= this.chunkCount, 'chunk range out of range');
    return fromChunk === limitChunk ? limitChunk : this.findChunk(fromChunk, limitChunk, true);
  }

  /** The first clean chunk in [fromChunk, limitChunk), or limitChunk when there is none. */
  firstCleanChunk(fromChunk: number, limitChunk: number): number {
    assert(Number.isSafeInteger(fromChunk) && Number.isSafeInteger(limitChunk), 'chunks must be integers');
    assert(fromChunk >= 0 && fromChunk <= limitChunk && limitChunk <= this.chunkCount, 'chunk range out of range');
    return fromChunk === limitChunk ? limitChunk : this.findChunk(fromChunk, limitChunk, false);
  }

  /** Allocating convenience form of nextDirtyRunInto (not for the resync hot loop). */
  nextDirtyRun(fromChunk: number, maxChunks: number): DirtyRun | null {
    const out: DirtyRun = { firstChunk: 0, chunkCount: 0 };
    return this.nextDirtyRunInto(fromChunk, maxChunks, out) ? out : null;
  }

  /** Bumped once per change; a flusher compares it with the value it last saw. */
  generation(): number {
    return Atomics.load(this.header, kHeaderGeneration) >>> 0;
  }

  /**
   * For the future on-disk flusher: the first page index >= fromPage whose "changed since
   * last flush" flag is set, clearing that flag (Atomics.and), or -1. Take the flag, then
   * write the page: a change after the take sets the flag again, so it is not lost.
   */
  takeChangedPage(fromPage: number): number {
    assert(Number.isSafeInteger(fromPage) && fromPage >= 0 && fromPage <= this.tableEntries);
    for (let word = fromPage >>> 5; word < this.changed.length; word += 1) {
      const lowBit = word === fromPage >>> 5 ? fromPage & 31 : 0;
      let flags = Atomics.load(this.changed, word) & wordMask(lowBit, 32);
      while (flags !== 0) {
        const bit = 31 - Math.clz32(flags & -flags);
        const mask = 1 << bit;
        if ((Atomics.and(this.changed, word, ~mask) & mask) !== 0) return word * 32 + bit;
        flags &= ~mask; // Another flusher took it.
      }
    }
    return -1;
  }

  // ---- Writers (under the lock, one page at a time) ---------------------------------------

  /** Marks every chunk the byte range touches (partial chunks count as dirty). */
  markRange(offsetBytes: number, lengthBytes: number): void {
    this.assertByteRange(offsetBytes, lengthBytes);
    if (lengthBytes === 0) return;
    const firstChunk = Math.floor(offsetBytes / this.chunkBytes);
    const endChunk = Math.ceil((offsetBytes + lengthBytes) / this.chunkBytes);
    this.markSpan(firstChunk, endChunk);
  }

  /**
   * Clears the chunks FULLY covered by the byte range (the resync copies whole chunks); a
   * range reaching the device end covers the last, partial chunk.
   */
  clearRange(offsetBytes: number, lengthBytes: number): void {
    this.assertByteRange(offsetBytes, lengthBytes);
    if (lengthBytes === 0) return;
    const endBytes = offsetBytes + lengthBytes;
    const firstChunk = Math.ceil(offsetBytes / this.chunkBytes);
    const endChunk = endBytes === this.deviceBytes
      ? this.chunkCount
      : Math.floor(endBytes / this.chunkBytes);
    if (firstChunk < endChunk) this.clearSpan(firstChunk, endChunk);
  }

  markChunks(firstChunk: number, chunkCount: number): void {
    this.assertChunkRange(firstChunk, chunkCount);
    if (chunkCount > 0) this.markSpan(firstChunk, firstChunk + chunkCount);
  }

  clearChunks(firstChunk: number, chunkCount: number): void {
    this.assertChunkRange(firstChunk, chunkCount);
    if (chunkCount > 0) this.clearSpan(firstChunk, firstChunk + chunkCount);
  }

  /** Every chunk dirty (a new or unknown leg): clean pages become sentinels, paged ones fill. */
  markAll(): void {
    this.markSpan(0, this.chunkCount);
  }

  /** Every chunk clean, every pool page back in the pool. */
  clearAll(): void {
    this.clearSpan(0, this.chunkCount);
  }

  // ---- Counters (under the lock: the count spans two words) --------------------------------

  dirtyChunkCount(): number {
    this.lock();
    const dirtyChunks = this.loadDirtyChunks();
    this.unlock();
    return dirtyChunks;
  }

  /** Dirty chunks in bytes; the last chunk counts only its bytes inside the device. */
  dirtyBytes(): number {
    this.lock();
    const dirtyBytes = this.dirtyBytesLocked();
    this.unlock();
    return dirtyBytes;
  }

  stats(): DirtyMapStats {
    this.lock();
    const pagesInUse = Atomics.load(this.header, kHeaderPagesInUse);
    const freePages = Atomics.load(this.header, kHeaderFreePages);
    const sentinelPages = Atomics.load(this.header, kHeaderSentinelPages);
    const dirtyChunks = this.loadDirtyChunks();
    const dirtyBytes = this.dirtyBytesLocked();
    this.unlock();
    const poolBytes = this.poolPages * (this.pageBytes + 12);
    return {
      deviceBytes: this.deviceBytes, chunkBytes: this.chunkBytes, chunkCount: this.chunkCount,
      pageBytes: this.pageBytes, pageChunks: this.pageChunks, tableEntries: this.tableEntries,
      poolPages: this.poolPages, pagesInUse, freePages, sentinelPages, dirtyChunks, dirtyBytes,
      generation: this.generation(), memoryBytes: this.buffer.byteLength,
      tableBytes: this.buffer.byteLength - poolBytes, poolBytes,
    };
  }

  /** Checks every invariant of the file header under the lock (tests, debugging). O(map). */
  verify(): void {
    this.lock();
    try {
      this.verifyLocked();
    } finally {
      this.unlock();
    }
  }

  // ---- Internals -------------------------------------------------------------------------

  private assertByteRange(offsetBytes: number, lengthBytes: number): void {
    assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0, 'offsetBytes must be >= 0');
    assert(Number.isSafeInteger(lengthBytes) && lengthBytes >= 0, 'lengthBytes must be >= 0');
    assert(offsetBytes + lengthBytes <= this.deviceBytes, 'byte range beyond the device end');
  }

  private assertChunkRange(firstChunk: number, chunkCount: number): void {
    assert(Number.isSafeInteger(firstChunk) && firstChunk >= 0, 'firstChunk must be >= 0');
    assert(Number.isSafeInteger(chunkCount) && chunkCount >= 0, 'chunkCount must be >= 0');
    assert(firstChunk + chunkCount <= this.chunkCount, 'chunk range beyond the device end');
  }

  /** Chunks of `page` inside the device (pageChunks except for a short last page). */
  private chunksInPage(page: number): number {
    return Math.min(this.pageChunks, this.chunkCount - page * this.pageChunks);
  }

  /**
   * First chunk in [fromChunk, limitChunk) whose state is `wantDirty`, or limitChunk.
   * Lock-free (see the header for why a racy read is safe). Bounded by the table size.
   */
  private findChunk(fromChunk: number, limitChunk: number, wantDirty: boolean): number {
    let chunk = fromChunk;
    let page = Math.floor(fromChunk / this.pageChunks);
    while (chunk < limitChunk) {
      const pageFirst = page * this.pageChunks;
      const pageEnd = Math.min(pageFirst + this.pageChunks, limitChunk);
      const entry = Atomics.load(this.table, page);
      if (entry === kEntryClean) {
        if (!wantDirty) return chunk;
      } else if (entry === kEntrySentinel) {
        if (wantDirty) return chunk;
      } else {
        const bitEnd = pageEnd - pageFirst;
        const bit = this.findBit(entry - 1, chunk - pageFirst, bitEnd, wantDirty);
        if (bit < bitEnd) return pageFirst + bit;
      }
      chunk = pageEnd;
      page += 1;
    }
    return limitChunk;
  }

  /** First bit in [bitFrom, bitEnd) of pool page poolIndex equal to wantSet, or bitEnd. */
  private findBit(poolIndex: number, bitFrom: number, bitEnd: number, wantSet: boolean): number {
    const base = poolIndex * this.pageWords;
    const lastWord = (bitEnd - 1) >>> 5;
    for (let word = bitFrom >>> 5; word <= lastWord; word += 1) {
      let value = Atomics.load(this.bits, base + word);
      if (!wantSet) value = ~value;
      if (word === bitFrom >>> 5) value &= wordMask(bitFrom & 31, 32);
      if (value !== 0) {
        const bit = word * 32 + 31 - Math.clz32(value & -value);
        return bit < bitEnd ? bit : bitEnd;
      }
    }
    return bitEnd;
  }

  private markSpan(firstChunk: number, endChunk: number): void {
    this.eachPageSpan(firstChunk, endChunk, true);
  }

  private clearSpan(firstChunk: number, endChunk: number): void {
    this.eachPageSpan(firstChunk, endChunk, false);
  }

  /** Splits [firstChunk, endChunk) at page borders and marks (or clears) each piece: no closure, nothing allocated. */
  private eachPageSpan(firstChunk: number, endChunk: number, mark: boolean): void {
    let chunk = firstChunk;
    let page = Math.floor(firstChunk / this.pageChunks);
    while (chunk < endChunk) {
      const pageFirst = page * this.pageChunks;
      const pageEnd = pageFirst + this.chunksInPage(page);
      const spanEnd = Math.min(endChunk, pageEnd);
      if (mark) this.markInPage(page, chunk - pageFirst, spanEnd - pageFirst, pageEnd - pageFirst);
      else this.clearInPage(page, chunk - pageFirst, spanEnd - pageFirst, pageEnd - pageFirst);
      chunk = spanEnd;
      page += 1;
    }
  }

  /** Marks bits [bitFrom, bitEnd) of table page `page` (bitsInPage = its chunks). */
  private markInPage(page: number, bitFrom: number, bitEnd: number, bitsInPage: number): void {
    assert(bitFrom >= 0 && bitFrom < bitEnd && bitEnd <= bitsInPage);
    this.lock();
    const entry = Atomics.load(this.table, page);
    let added = 0;
    if (entry === kEntrySentinel) {
      // Already all dirty.
    } else if (entry !== kEntryClean) {
      assert(entry > 0 && entry <= this.poolPages, 'corrupt table entry');
      added = this.setBits(entry - 1, bitFrom, bitEnd);
      Atomics.add(this.pageCounts, entry - 1, added);
    } else if (bitFrom === 0 && bitEnd === bitsInPage) {
      this.becomeSentinel(page); // Whole page marked: exact, and saves a pool page.
      added = bitsInPage;
    } else {
      const poolIndex = this.takePage(page);
      if (poolIndex < 0) {
        this.becomeSentinel(page); // Pool exhausted: conservative.
        added = bitsInPage;
      } else {
        added = this.setBits(poolIndex, bitFrom, bitEnd);
        Atomics.store(this.pageCounts, poolIndex, added);
        Atomics.store(this.table, page, poolIndex + 1); // Publish after the bits.
      }
    }
    if (added > 0) this.noteChange(page, added);
    this.unlock();
  }

  /** Clears bits [bitFrom, bitEnd) of table page `page` (bitsInPage = its chunks). */
  private clearInPage(page: number, bitFrom: number, bitEnd: number, bitsInPage: number): void {
    assert(bitFrom >= 0 && bitFrom < bitEnd && bitEnd <= bitsInPage);
    this.lock();
    const entry = Atomics.load(this.table, page);
    let removed = 0;
    if (entry === kEntryClean) {
      // Already all clean.
    } else if (entry === kEntrySentinel) {
      if (bitFrom === 0 && bitEnd === bitsInPage) {
        Atomics.store(this.table, page, kEntryClean);
        Atomics.sub(this.header, kHeaderSentinelPages, 1);
        removed = bitsInPage;
      } else {
        removed = this.materialise(page, bitFrom, bitEnd, bitsInPage);
      }
    } else {
      assert(entry > 0 && entry <= this.poolPages, 'corrupt table entry');
      const poolIndex = entry - 1;
      removed = this.clearBits(poolIndex, bitFrom, bitEnd);
      const remaining = Atomics.sub(this.pageCounts, poolIndex, removed) - removed;
      assert(remaining >= 0, 'page count underflow');
      if (remaining === 0) this.releasePage(page, poolIndex);
    }
    if (removed > 0) this.noteChange(page, -removed);
    this.unlock();
  }

  /**
   * Sentinel page, partial clear: take a pool page, fill it with ones, clear the range, then
   * publish it. Without a free page the entry stays a sentinel (nothing cleared).
   */
  private materialise(page: number, bitFrom: number, bitEnd: number, bitsInPage: number): number {
    const poolIndex = this.takePage(page);
    if (poolIndex < 0) return 0;
    const filled = this.setBits(poolIndex, 0, bitsInPage);
    assert(filled === bitsInPage, 'a free pool page must be all zeros');
    const removed = this.clearBits(poolIndex, bitFrom, bitEnd);
    assert(removed === bitEnd - bitFrom && removed < bitsInPage);
    Atomics.store(this.pageCounts, poolIndex, bitsInPage - removed);
    Atomics.store(this.table, page, poolIndex + 1); // Publish after the bits.
    Atomics.sub(this.header, kHeaderSentinelPages, 1);
    return removed;
  }

  private becomeSentinel(page: number): void {
    Atomics.store(this.table, page, kEntrySentinel);
    Atomics.add(this.header, kHeaderSentinelPages, 1);
  }

  /** Pops a free pool page for table page `page`, or returns -1 when the pool is empty. */
  private takePage(page: number): number {
    assert(this.lockHeld);
    const freePages = Atomics.load(this.header, kHeaderFreePages);
    if (freePages === 0) return -1;
    const poolIndex = Atomics.load(this.freeStack, freePages - 1);
    assert(poolIndex >= 0 && poolIndex < this.poolPages, 'corrupt free stack');
    assert(Atomics.load(this.pageOwners, poolIndex) === -1, 'free page has an owner');
    Atomics.store(this.pageOwners, poolIndex, page);
    Atomics.store(this.header, kHeaderFreePages, freePages - 1);
    Atomics.add(this.header, kHeaderPagesInUse, 1);
    return poolIndex;
  }

  /** Returns an all-clear pool page to the pool; the table entry becomes clean. */
  private releasePage(page: number, poolIndex: number): void {
    assert(this.lockHeld);
    assert(Atomics.load(this.pageCounts, poolIndex) === 0, 'releasing a page with set bits');
    assert(Atomics.load(this.pageOwners, poolIndex) === page, 'releasing a page not owned');
    Atomics.store(this.table, page, kEntryClean);
    Atomics.store(this.pageOwners, poolIndex, -1);
    const freePages = Atomics.load(this.header, kHeaderFreePages);
    assert(freePages < this.poolPages, 'free stack overflow');
    Atomics.store(this.freeStack, freePages, poolIndex);
    Atomics.store(this.header, kHeaderFreePages, freePages + 1);
    Atomics.sub(this.header, kHeaderPagesInUse, 1);
  }

  /** Sets bits [bitFrom, bitEnd) of a pool page; returns how many were clear before. */
  private setBits(poolIndex: number, bitFrom: number, bitEnd: number): number {
    const base = poolIndex * this.pageWords;
    const firstWord = bitFrom >>> 5;
    const lastWord = (bitEnd - 1) >>> 5;
    let added = 0;
    for (let word = firstWord; word <= lastWord; word += 1) {
      const lowBit = word === firstWord ? bitFrom & 31 : 0;
      const highBit = word === lastWord ? ((bitEnd - 1) & 31) + 1 : 32;
      const mask = wordMask(lowBit, highBit);
      const old = Atomics.or(this.bits, base + word, mask);
      added += popcount32(mask & ~old);
    }
    return added;
  }

  /** Clears bits [bitFrom, bitEnd) of a pool page; returns how many were set before. */
  private clearBits(poolIndex: number, bitFrom: number, bitEnd: number): number {
    const base = poolIndex * this.pageWords;
    const firstWord = bitFrom >>> 5;
    const lastWord = (bitEnd - 1) >>> 5;
    let removed = 0;
    for (let word = firstWord; word <= lastWord; word += 1) {
      const lowBit = word === firstWord ? bitFrom & 31 : 0;
      const highBit = word === lastWord ? ((bitEnd - 1) & 31) + 1 : 32;
      const mask = wordMask(lowBit, highBit);
      const old = Atomics.and(this.bits, base + word, ~mask);
      removed += popcount32(mask & old);
    }
    return removed;
  }

  /** Under the lock: dirty count, "changed since flush" flag, generation. */
  private noteChange(page: number, deltaChunks: number): void {
    const dirtyChunks = this.loadDirtyChunks() + deltaChunks;
    assert(dirtyChunks >= 0 && dirtyChunks <= this.chunkCount, 'dirty count out of range');
    Atomics.store(this.header, kHeaderDirtyChunksLow, dirtyChunks % kTwo32 | 0);
    Atomics.store(this.header, kHeaderDirtyChunksHigh, Math.floor(dirtyChunks / kTwo32));
    Atomics.or(this.changed, page >>> 5, 1 << (page & 31));
    Atomics.add(this.header, kHeaderGeneration, 1);
  }

  private loadDirtyChunks(): number {
    assert(this.lockHeld);
    const low = Atomics.load(this.header, kHeaderDirtyChunksLow) >>> 0;
    return Atomics.load(this.header, kHeaderDirtyChunksHigh) * kTwo32 + low;
  }

  private dirtyBytesLocked(): number {
    const dirtyChunks = this.loadDirtyChunks();
    if (dirtyChunks === 0) return 0;
    const lastDirty = this.isChunkDirty(this.chunkCount - 1);
    return dirtyChunks * this.chunkBytes - (lastDirty ? this.chunkBytes - this.lastChunkBytes : 0);
  }

  private lock(): void {
    assert(!this.lockHeld, 'dirty map lock is not re-entrant');
    if (Atomics.compareExchange(this.header, kHeaderLock, kLockFree, kLockHeld) !== kLockFree) {
      this.lockSlow();
    }
    this.lockHeld = true;
  }

  private lockSlow(): void {
    for (let spin = 0; spin < kLockSpins; spin += 1) {
      if (Atomics.load(this.header, kHeaderLock) === kLockFree &&
          Atomics.compareExchange(this.header, kHeaderLock, kLockFree, kLockHeld) === kLockFree) {
        return;
      }
    }
    let timeouts = 0;
    // Bounded: every pass either takes the lock, is woken by a release, or times out.
    while (Atomics.exchange(this.header, kHeaderLock, kLockContended) !== kLockFree) {
      const result = Atomics.wait(this.header, kHeaderLock, kLockContended, kLockWaitMs);
      timeouts = result === 'timed-out' ? timeouts + 1 : 0;
      if (timeouts >= kLockTimeoutsMax) {
        throw new AssertionError('dirty map lock held too long: did its holder die?');
      }
    }
  }

  private unlock(): void {
    assert(this.lockHeld, 'unlock without lock');
    this.lockHeld = false;
    if (Atomics.sub(this.header, kHeaderLock, 1) !== kLockHeld) {
      Atomics.store(this.header, kHeaderLock, kLockFree);
      Atomics.notify(this.header, kHeaderLock, 1);
    }
  }

  private verifyLocked(): void {
    const owner = new Int32Array(this.poolPages).fill(-1);
    let pagesInUse = 0;
    let sentinelPages = 0;
    let dirtyChunks = 0;
    for (let page = 0; page < this.tableEntries; page += 1) {
      const entry = Atomics.load(this.table, page);
      if (entry === kEntrySentinel) {
        sentinelPages += 1;
        dirtyChunks += this.chunksInPage(page);
      } else if (entry !== kEntryClean) {
        const poolIndex = entry - 1;
        assert(entry > 0 && poolIndex < this.poolPages, `table[${page}] = ${entry} invalid`);
        assert(owner[poolIndex] === -1, `pool page ${poolIndex} used twice`);
        owner[poolIndex] = page;
        assert(Atomics.load(this.pageOwners, poolIndex) === page, `pool page ${poolIndex} owner`);
        const count = this.countBits(poolIndex, 0, this.pageChunks);
        assert(count > 0, `empty page ${page} not returned to the pool`);
        assert(count === Atomics.load(this.pageCounts, poolIndex), `page ${page} count`);
        const tail = this.countBits(poolIndex, this.chunksInPage(page), this.pageChunks);
        assert(tail === 0, `page ${page} has bits beyond the device end`);
        pagesInUse += 1;
        dirtyChunks += count;
      }
    }
    const freePages = Atomics.load(this.header, kHeaderFreePages);
    assert(pagesInUse === Atomics.load(this.header, kHeaderPagesInUse), 'pagesInUse');
    assert(sentinelPages === Atomics.load(this.header, kHeaderSentinelPages), 'sentinelPages');
    assert(dirtyChunks === this.loadDirtyChunks(), 'dirtyChunks');
    assert(freePages + pagesInUse === this.poolPages, 'free + in use = pool');
    for (let slot = 0; slot < freePages; slot += 1) {
      const poolIndex = Atomics.load(this.freeStack, slot);
      assert(poolIndex >= 0 && poolIndex < this.poolPages, 'free stack entry');
      assert(owner[poolIndex] === -1, `free pool page ${poolIndex} in use or listed twice`);
      owner[poolIndex] = -2;
      assert(Atomics.load(this.pageOwners, poolIndex) === -1, 'free page owner');
      assert(Atomics.load(this.pageCounts, poolIndex) === 0, 'free page count');
      assert(this.countBits(poolIndex, 0, this.pageChunks) === 0, 'free page not zero');
    }
  }

  private countBits(poolIndex: number, bitFrom: number, bitEnd: number): number {
    let count = 0;
    for (let bit = bitFrom; bit < bitEnd; bit += 1) {
      const word = Atomics.load(this.bits, poolIndex * this.pageWords + (bit >>> 5));
      if ((word & (1 << (bit & 31))) !== 0) count += 1;
    }
    return count;
  }
}
