/**
 * In-memory BlockDevice for in-process server tests (the fuzz test): real tools cannot send
 * arbitrary bytes, so the fuzzer talks to createNbdServer directly and needs a device that is
 * fast and has no side effects outside the process.
 *
 * Threads: the thread that created it (test main thread).
 *
 * Invariants:
 * - Each submitted token completes exactly once, asynchronously (never inside submit), in
 *   submission order or, with `completion: 'shuffled'`, in a scrambled order.
 * - READ fills `data` (exactly lengthBytes) before completion; WRITE copies from `data` at
 *   submit time and never keeps a reference.
 * - Out-of-range requests (which a correct server never submits) complete with EINVAL/ENOSPC
 *   and are counted in `rejectedCount` so a test can assert the server validated first.
 */
import type { BlockDevice, BlockSizes, BufferLease, CompletionHandler, DeviceFeatures, Extent } from '../../src/core/block-device.js';
import {
  kCmdCache,
  kCmdFlush,
  kCmdRead,
  kCmdTrim,
  kCmdWrite,
  kCmdWriteZeroes,
  kEInval,
  kENoSpc,
  kEPerm,
} from '../../src/nbd/protocol.js';

export interface MemoryDeviceOptions {
  sizeBytes: number;
  readOnly?: boolean;
  /** 'ordered' (default): completions in submit order; 'shuffled': a seeded random order. */
  completion?: 'ordered' | 'shuffled';
  /** Optional fault hook: return an NBD errno (non-zero) to fail that request. */
  errnoFor?: (command: number, offsetBytes: number, lengthBytes: number) => number;
}

interface Pending {
  token: number;
  errno: number;
}

export class MemoryDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly features: DeviceFeatures;
  readonly blockSizes: BlockSizes = { minimumBytes: 1, preferredBytes: 4096, maximumBytes: 0x7fff_ffff };
  readonly description = 'memory device (test)';
  readonly bytes: Uint8Array;
  /** Requests the device refused because they were out of range or not allowed. */
  rejectedCount = 0;
  /** The first few rejected requests, described, for failure messages. */
  readonly rejections: string[] = [];
  submittedCount = 0;
  private handler: CompletionHandler | null = null;
  private readonly pending: Pending[] = [];
  private flushScheduled = false;
  private shuffleSeed = 0x9e3779b9;
  private closed = false;

  constructor(private readonly options: MemoryDeviceOptions) {
    if (!Number.isSafeInteger(options.sizeBytes) || options.sizeBytes <= 0) {
      throw new RangeError('options.sizeBytes must be a positive safe integer');
    }
    this.sizeBytes = options.sizeBytes;
    this.bytes = new Uint8Array(options.sizeBytes);
    const writable = options.readOnly !== true;
    this.features = {
      readOnly: !writable,
      flush: true,
      fua: writable,
      trim: writable,
      writeZeroes: writable,
      fastZero: writable,
      cache: true,
      multiConn: true,
      rotational: false,
      blockStatus: true,
    };
  }

  get inFlight(): number {
    return this.pending.length;
  }

  setCompletionHandler(handler: CompletionHandler): void {
    this.handler = handler;
  }

  submit(command: number, flags: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | null, token: number): void {
    if (this.closed) throw new Error('submit after close');
    this.submittedCount += 1;
    let errno = this.options.errnoFor?.(command, offsetBytes, lengthBytes) ?? 0;
    const inRange = offsetBytes >= 0 && lengthBytes >= 0 && offsetBytes + lengthBytes <= this.sizeBytes;
    const isWrite = command === kCmdWrite || command === kCmdTrim || command === kCmdWriteZeroes;
    if (errno === 0 && command !== kCmdFlush && !inRange) {
      errno = isWrite ? kENoSpc : kEInval;
      this.noteRejection('out of range', command, flags, offsetBytes, lengthBytes, data);
    } else if (errno === 0 && isWrite && this.features.readOnly) {
      errno = kEPerm;
      this.noteRejection('write on read-only device', command, flags, offsetBytes, lengthBytes, data);
    }
    if (errno === 0) {
      errno = this.execute(command, offsetBytes, lengthBytes, data);
      if (errno !== 0) this.noteRejection('malformed', command, flags, offsetBytes, lengthBytes, data);
    }
    this.pending.push({ token, errno });
    this.scheduleCompletions();
  }

  private noteRejection(
    why: string,
    command: number,
    flags: number,
    offsetBytes: number,
    lengthBytes: number,
    data: Uint8Array | null,
  ): void {
    this.rejectedCount += 1;
    if (this.rejections.length < 10) {
      const dataLength = data === null ? 'null' : String(data.length);
      this.rejections.push(`${why}: command ${command} flags 0x${flags.toString(16)} offset ${offsetBytes} length ${lengthBytes} data ${dataLength}`);
    }
  }

  private execute(command: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | null): number {
    switch (command) {
      case kCmdRead:
        if (lengthBytes === 0) return 0;
        if (data === null || data.length !== lengthBytes) return kEInval;
        data.set(this.bytes.subarray(offsetBytes, offsetBytes + lengthBytes));
        return 0;
      case kCmdWrite:
        if (lengthBytes === 0) return 0;
        if (data === null || data.length !== lengthBytes) return kEInval;
        this.bytes.set(data, offsetBytes);
        return 0;
      case kCmdWriteZeroes:
      case kCmdTrim:
        // TRIM may leave anything; zeroing keeps reads deterministic.
        this.bytes.fill(0, offsetBytes, offsetBytes + lengthBytes);
        return 0;
      case kCmdFlush:
      case kCmdCache:
        return 0;
      default:
        return kEInval;
    }
  }

  private scheduleCompletions(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      const batch = this.pending.splice(0);
      if (this.options.completion === 'shuffled') this.shuffle(batch);
      const handler = this.handler;
      if (handler === null) throw new Error('MemoryDevice: no completion handler installed');
      for (const entry of batch) handler(entry.token, entry.errno);
    });
  }

  private shuffle(batch: Pending[]): void {
    for (let index = batch.length - 1; index > 0; index -= 1) {
      this.shuffleSeed = (Math.imul(this.shuffleSeed, 1103515245) + 12345) >>> 0;
      const other = this.shuffleSeed % (index + 1);
      const swap = batch[index];
      const with_ = batch[other];
      if (swap === undefined || with_ === undefined) continue;
      batch[index] = with_;
      batch[other] = swap;
    }
  }

  async getExtents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    await new Promise((resolveLater) => setImmediate(resolveLater));
    const end = Math.min(this.sizeBytes, offsetBytes + Math.max(lengthBytes, 1));
    const extents: Extent[] = [];
    const blockBytes = 4096;
    let start = offsetBytes;
    while (start < end && extents.length < 64) {
      const zero = this.isZero(start, Math.min(end, start + blockBytes));
      let stop = Math.min(end, start + blockBytes);
      while (stop < end && this.isZero(stop, Math.min(end, stop + blockBytes)) === zero) {
        stop = Math.min(end, stop + blockBytes);
      }
      extents.push({ lengthBytes: stop - start, flags: zero ? 2 : 0 });
      start = stop;
    }
    return extents;
  }

  private isZero(start: number, end: number): boolean {
    for (let index = start; index < end; index += 1) if (this.bytes[index] !== 0) return false;
    return true;
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.resolve();
  }
}

export interface PooledMemoryDeviceOptions extends MemoryDeviceOptions {
  /** Bytes of buffers the device can lend at once (bufferCapacityBytes). */
  poolBytes: number;
  /** Lending unit (bufferUnitBytes); a request is charged whole units. */
  unitBytes: number;
  /** Refuse every Nth acquire although a buffer is free (then wake the server later); 0 = never. */
  refuseEvery?: number;
  /** A submitted WRITE's buffer returns at its completion (writeBuffersReturnAtCompletion; default true). */
  returnWritesAtCompletion?: boolean;
}

/**
 * A MemoryDevice that also lends request buffers, like the mirror's ring (acquireBuffer /
 * releaseBuffer / onBufferAvailable): a fixed pool, so under load it has none free and the
 * server must wait for onBufferAvailable. Leases have handles of their own (never the token).
 * With `returnWritesAtCompletion` (default true, as the mirror) a submitted WRITE's buffer
 * comes back when the WRITE completes. Counts misuse in `bufferErrors`: a release of a handle
 * it did not lend or that it takes back itself, a second acquire for a token it holds, a
 * submit whose handle was lent for another token; `lentCount` is what is out now.
 */
export class PooledMemoryDevice extends MemoryDevice {
  readonly bufferCapacityBytes: number;
  readonly bufferUnitBytes: number;
  readonly writeBuffersReturnAtCompletion: boolean;
  onBufferAvailable: (() => void) | null = null;
  acquiredCount = 0;
  refusedCount = 0;
  /** WRITE buffers the device took back at completion. */
  returnedAtCompletion = 0;
  readonly bufferErrors: string[] = [];
  private freeBytes: number;
  private nextHandle = 1000;
  private readonly lent = new Map<number, { charge: number; token: number; takenBack: boolean }>();
  private readonly tokensLent = new Set<number>();
  /** Submitted WRITEs whose buffer returns at completion: token -> handle. */
  private readonly returnOnComplete = new Map<number, number>();
  private wakeScheduled = false;

  constructor(private readonly pool: PooledMemoryDeviceOptions) {
    super(pool);
    this.bufferCapacityBytes = pool.poolBytes;
    this.bufferUnitBytes = pool.unitBytes;
    this.freeBytes = pool.poolBytes;
    this.writeBuffersReturnAtCompletion = pool.returnWritesAtCompletion ?? true;
  }

  get lentCount(): number {
    return this.lent.size;
  }

  override setCompletionHandler(handler: CompletionHandler): void {
    super.setCompletionHandler((token, errno) => {
      const handle = this.returnOnComplete.get(token);
      if (handle !== undefined) {
        this.returnOnComplete.delete(token);
        this.returnedAtCompletion += 1;
        this.giveBack(handle);
      }
      handler(token, errno);
    });
  }

  acquireBuffer(_command: number, lengthBytes: number, token: number): BufferLease | null {
    if (this.tokensLent.has(token)) this.bufferErrors.push(`token ${token} acquired twice`);
    const charge = Math.max(1, Math.ceil(lengthBytes / this.pool.unitBytes)) * this.pool.unitBytes;
    const refuse = this.pool.refuseEvery !== undefined && this.pool.refuseEvery > 0 && (this.acquiredCount + this.refusedCount) % this.pool.refuseEvery === this.pool.refuseEvery - 1;
    if (charge > this.freeBytes || refuse) {
      this.refusedCount += 1;
      if (refuse) this.scheduleWake();
      return null;
    }
    this.acquiredCount += 1;
    this.freeBytes -= charge;
    const handle = this.nextHandle;
    this.nextHandle += 1;
    this.lent.set(handle, { charge, token, takenBack: false });
    this.tokensLent.add(token);
    return { handle, view: new Uint8Array(lengthBytes) };
  }

  override submit(command: number, flags: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | null, token: number, handle = -1): void {
    if (handle >= 0) {
      const entry = this.lent.get(handle);
      if (entry === undefined || entry.token !== token) this.bufferErrors.push(`submit of token ${token} with handle ${handle} not lent for it`);
      else if (command === kCmdWrite && this.writeBuffersReturnAtCompletion) {
        entry.takenBack = true;
        this.returnOnComplete.set(token, handle);
      }
    }
    super.submit(command, flags, offsetBytes, lengthBytes, data, token);
  }

  releaseBuffer(handle: number): void {
    const entry = this.lent.get(handle);
    if (entry === undefined) {
      this.bufferErrors.push(`handle ${handle} released but not lent`);
      return;
    }
    if (entry.takenBack) {
      this.bufferErrors.push(`handle ${handle} released, but the device takes that WRITE buffer back itself`);
      return;
    }
    this.giveBack(handle);
  }

  private giveBack(handle: number): void {
    const entry = this.lent.get(handle);
    if (entry === undefined) return;
    this.lent.delete(handle);
    this.tokensLent.delete(entry.token);
    this.freeBytes += entry.charge;
    this.scheduleWake();
  }

  private scheduleWake(): void {
    if (this.wakeScheduled) return;
    this.wakeScheduled = true;
    setImmediate(() => {
      this.wakeScheduled = false;
      this.onBufferAvailable?.();
    });
  }
}
