/**
 * Local file stub: a BlockDevice over a regular file with positional I/O (libuv thread pool).
 * Serves `enbd serve FILE` and mirror legs given as `file:///path` or a plain path.
 *
 * Thread: whichever thread opened it (main thread for `serve`, a connection actor's worker for
 * a mirror leg).
 *
 * Design notes
 * | command       | implementation                                                    |
 * |---------------|-------------------------------------------------------------------|
 * | READ          | pread loop; bytes past EOF read as zeros                          |
 * | WRITE         | pwrite loop; FUA adds fdatasync                                   |
 * | FLUSH         | fdatasync                                                         |
 * | TRIM          | accepted and ignored (a hint; Node has no fallocate punch-hole)   |
 * | WRITE_ZEROES  | pwrite of a shared zero buffer; FAST_ZERO is never fast: ENOTSUP |
 * | CACHE         | accepted and ignored (a hint)                                     |
 * | block status  | scans data: all-zero 64 KiB blocks report ZERO, others data       |
 *
 * - fence(): new requests fail with EIO, every request in flight completes with EIO at once;
 *   the ops whose pread/pwrite/fdatasync is still on the thread pool are "abandoned": they stay
 *   out of the free list until their I/O returns, then are recycled without a completion. The
 *   fence holds once no thread-pool I/O is pending (`ioPending` 0): from then on nothing ever
 *   submitted can still change the file. Synchronous mode has nothing pending (its I/O ran
 *   inside submit), so it holds at once unless FUA writes or flushes are on the pool.
 *
 * Invariants:
 * - Each submitted token completes exactly once, asynchronously (never inside submit).
 * - No allocation per request on READ/WRITE: operation records come from a free list and carry
 *   a callback bound once.
 * - ioPending = thread-pool calls issued whose callback has not run; the fd is closed only when
 *   it is 0 (or after a bound, for a disk that never answers).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { read, write, fdatasync, fstatSync, openSync, closeSync, readSync, writeSync } from 'node:fs';
import type { BlockDevice, BlockSizes, CompletionHandler, DeviceFeatures, Extent } from '../core/block-device.js';
import { assert } from '../core/assert.js';
import { EnbdError, describeError } from '../core/errors.js';
import * as p from '../nbd/protocol.js';
import { nbdErrnoFromHostCode } from '../nbd/protocol-names.js';

const kZeroBytes = 1024 * 1024;
const kZeroBuffer = Buffer.alloc(kZeroBytes);
const kScanBlockBytes = 64 * 1024;
const kScanBytesMax = 16 * 1024 * 1024;
/** close() waits at most this long for thread-pool I/O before closing the fd anyway. */
const kCloseWaitMs = 10_000;

class FileOp {
  token = 0;
  command = 0;
  flags = 0;
  offsetBytes = 0;
  lengthBytes = 0;
  doneBytes = 0;
  data: Uint8Array | null = null;
  /** Submitted and not yet completed to the handler. */
  active = false;
  /** Completed with EIO by fence() while its I/O was pending: recycle it silently when done. */
  abandoned = false;
  readonly onIo: (error: NodeJS.ErrnoException | null, bytes: number) => void;
  readonly onSync: (error: NodeJS.ErrnoException | null) => void;
  constructor(device: FileDevice) {
    this.onIo = (error, bytes) => device.ioDone(this, error, bytes);
    this.onSync = (error) => device.syncDone(this, error);
  }
}

export interface FileDeviceOptions {
  readOnly?: boolean;
  /** Export size; defaults to the file's size. A larger size is refused. */
  sizeBytes?: number;
  /**
   * 'async' (default): pread/pwrite on libuv's thread pool. 'sync': pread/pwrite on the calling
   * thread, completions delivered in one batch per event-loop turn; much cheaper for files in
   * the page cache or on tmpfs (no thread hand-off per request), but a slow disk then blocks
   * the thread. Mirror file legs run on their own actor thread, where blocking only that leg
   * is acceptable.
   */
  io?: 'sync' | 'async';
}

export class FileDevice implements BlockDevice {
  readonly features: DeviceFeatures;
  readonly blockSizes: BlockSizes = { minimumBytes: 1, preferredBytes: 4096, maximumBytes: 0x7fff_ffff };
  readonly description: string;
  private handler: CompletionHandler = () => undefined;
  private readonly freeOps: FileOp[] = [];
  /** Every op ever made (bounded by the peak of requests in flight), for fence(). */
  private readonly allOps: FileOp[] = [];
  private scanHandle: FileHandle | null = null;
  /** No new I/O: set by close() and fence(). */
  private closed = false;
  private fdClosed = false;
  /** Thread-pool calls (read, write, fdatasync) whose callback has not run yet. */
  private ioPending = 0;
  private idleWaiters: (() => void)[] = [];
  private readonly syncIo: boolean;
  private ready: FileOp[] = [];
  private readyErrno: number[] = [];
  private readyScheduled = false;
  private readonly deliverReadyBound = (): void => this.deliverReady();
  inFlight = 0;

  private constructor(
    readonly path: string,
    private readonly fd: number,
    readonly sizeBytes: number,
    readOnly: boolean,
    io: 'sync' | 'async',
  ) {
    this.syncIo = io === 'sync';
    this.description = `file ${path}`;
    this.features = {
      readOnly,
      flush: true,
      fua: true,
      trim: true,
      writeZeroes: true,
      fastZero: false,
      cache: true,
      multiConn: true,
      rotational: false,
      blockStatus: true,
    };
  }

  static open(path: string, options: FileDeviceOptions = {}): FileDevice {
    const readOnly = options.readOnly === true;
    let fd: number;
    try {
      fd = openSync(path, readOnly ? 'r' : 'r+');
    } catch (error) {
      throw new EnbdError('ENBD_ERR_IO', `cannot open ${path}: ${describeError(error)}`, 0, { cause: error });
    }
    const stats = fstatSync(fd);
    if (!stats.isFile()) {
      closeSync(fd);
      throw new EnbdError('ENBD_ERR_CONFIG', `${path} is not a regular file`);
    }
    const sizeBytes = options.sizeBytes ?? stats.size;
    if (sizeBytes > stats.size) {
      closeSync(fd);
      throw new EnbdError('ENBD_ERR_CONFIG', `${path} holds ${stats.size} bytes, fewer than the ${sizeBytes} asked`);
    }
    return new FileDevice(path, fd, sizeBytes, readOnly, options.io ?? 'async');
  }

  setCompletionHandler(handler: CompletionHandler): void {
    this.handler = handler;
  }

  private takeOp(): FileOp {
    const reused = this.freeOps.pop();
    if (reused !== undefined) return reused;
    const op = new FileOp(this);
    this.allOps.push(op);
    return op;
  }

  private complete(op: FileOp, errno: number): void {
    if (op.abandoned) {
      // fence() already completed it; its I/O is over now.
      op.abandoned = false;
      op.data = null;
      this.freeOps.push(op);
      return;
    }
    assert(op.active, 'completing an op in flight');
    const token = op.token;
    op.active = false;
    op.data = null;
    this.freeOps.push(op);
    this.inFlight -= 1;
    this.handler(token, errno);
  }

  /** Counts one thread-pool call done; wakes idle waiters at 0. */
  private ioReturned(): void {
    this.ioPending -= 1;
    assert(this.ioPending >= 0, 'thread-pool calls balance');
    if (this.ioPending === 0 && this.idleWaiters.length > 0) {
      for (const wake of this.idleWaiters.splice(0)) wake();
    }
  }

  /** True once no thread-pool I/O is pending, false after `timeoutMs`. */
  private async waitIoIdle(timeoutMs: number): Promise<boolean> {
    if (this.ioPending === 0) return true;
    return await new Promise<boolean>((resolve) => {
      const wake = (): void => {
        clearTimeout(timer);
        resolve(true);
      };
      const timer = setTimeout(() => {
        const index = this.idleWaiters.indexOf(wake);
        if (index >= 0) this.idleWaiters.splice(index, 1);
        resolve(false);
      }, timeoutMs);
      this.idleWaiters.push(wake);
    });
  }

  /**
   * BlockDevice.fence: no new I/O; requests in flight complete with EIO now; true once the
   * thread pool holds no I/O of this device (false after `timeoutMs`; a later call waits again).
   */
  async fence(timeoutMs: number): Promise<boolean> {
    this.closed = true;
    for (const op of this.allOps) {
      if (!op.active) continue;
      // Its completion (I/O callback, setImmediate or the sync batch) comes later and recycles it.
      op.active = false;
      op.abandoned = true;
      this.inFlight -= 1;
      this.handler(op.token, p.kEIo);
    }
    assert(this.inFlight >= 0, 'in-flight count stays non-negative');
    return await this.waitIoIdle(timeoutMs);
  }

  submit(command: number, flags: number, offsetBytes: number, lengthBytes: number, data: Uint8Array | null, token: number): void {
    const op = this.takeOp();
    op.token = token;
    op.command = command;
    op.flags = flags;
    op.offsetBytes = offsetBytes;
    op.lengthBytes = lengthBytes;
    op.doneBytes = 0;
    op.data = data;
    op.active = true;
    op.abandoned = false;
    this.inFlight += 1;
    if (this.closed) {
      setImmediate(() => this.complete(op, p.kEIo));
      return;
    }
    switch (command) {
      case p.kCmdRead:
        assert(data !== null && data.length >= lengthBytes, 'READ needs a destination');
        this.continueIo(op);
        return;
      case p.kCmdWrite:
        assert(data !== null && data.length >= lengthBytes, 'WRITE needs a source');
        if (this.features.readOnly) return this.completeLater(op, p.kEPerm);
        this.continueIo(op);
        return;
      case p.kCmdWriteZeroes:
        if (this.features.readOnly) return this.completeLater(op, p.kEPerm);
        if ((flags & p.kCmdFlagFastZero) !== 0) return this.completeLater(op, p.kENotSup);
        this.continueIo(op);
        return;
      case p.kCmdFlush:
        this.ioPending += 1;
        fdatasync(this.fd, op.onSync);
        return;
      case p.kCmdTrim:
        if (this.features.readOnly) return this.completeLater(op, p.kEPerm);
        if ((flags & p.kCmdFlagFua) !== 0) {
          this.ioPending += 1;
          fdatasync(this.fd, op.onSync);
        }
        else this.completeLater(op, 0);
        return;
      case p.kCmdCache:
        this.completeLater(op, 0);
        return;
      default:
        this.completeLater(op, p.kEInval);
    }
  }

  private completeLater(op: FileOp, errno: number): void {
    setImmediate(() => this.complete(op, errno));
  }

  /** Issues the next pread/pwrite for the op's remaining bytes. */
  private continueIo(op: FileOp): void {
    if (this.syncIo && (op.flags & p.kCmdFlagFua) === 0) {
      this.runSync(op);
      return;
    }
    const remaining = op.lengthBytes - op.doneBytes;
    const position = op.offsetBytes + op.doneBytes;
    this.ioPending += 1;
    if (op.command === p.kCmdRead) {
      read(this.fd, op.data as Uint8Array, op.doneBytes, remaining, position, op.onIo);
    } else if (op.command === p.kCmdWrite) {
      write(this.fd, op.data as Uint8Array, op.doneBytes, remaining, position, op.onIo);
    } else {
      write(this.fd, kZeroBuffer, 0, Math.min(remaining, kZeroBytes), position, op.onIo);
    }
  }

  /** Synchronous path: the whole request now, its completion in this turn's batch. */
  private runSync(op: FileOp): void {
    let errno = 0;
    try {
      while (op.doneBytes < op.lengthBytes) {
        const remaining = op.lengthBytes - op.doneBytes;
        const position = op.offsetBytes + op.doneBytes;
        let bytes: number;
        if (op.command === p.kCmdRead) {
          bytes = readSync(this.fd, op.data as Uint8Array, op.doneBytes, remaining, position);
          if (bytes === 0) {
            (op.data as Uint8Array).fill(0, op.doneBytes, op.lengthBytes);
            bytes = remaining;
          }
        } else if (op.command === p.kCmdWrite) {
          bytes = writeSync(this.fd, op.data as Uint8Array, op.doneBytes, remaining, position);
        } else {
          bytes = writeSync(this.fd, kZeroBuffer, 0, Math.min(remaining, kZeroBytes), position);
        }
        if (bytes <= 0) throw Object.assign(new Error('short write'), { code: 'EIO' });
        op.doneBytes += bytes;
      }
    } catch (error) {
      errno = nbdErrnoFromHostCode((error as NodeJS.ErrnoException).code);
    }
    this.ready.push(op);
    this.readyErrno.push(errno);
    if (!this.readyScheduled) {
      this.readyScheduled = true;
      setImmediate(this.deliverReadyBound);
    }
  }

  private deliverReady(): void {
    this.readyScheduled = false;
    // Completions may submit more requests (which join the next batch): take this batch first.
    const ops = this.ready.splice(0);
    const errnos = this.readyErrno.splice(0);
    for (let index = 0; index < ops.length; index += 1) {
      this.complete(ops[index] as FileOp, errnos[index] ?? p.kEIo);
    }
  }

  ioDone(op: FileOp, error: NodeJS.ErrnoException | null, bytes: number): void {
    this.ioReturned();
    if (op.abandoned) {
      this.complete(op, p.kEIo); // recycles it; fence() completed its token
      return;
    }
    if (error !== null) {
      this.complete(op, nbdErrnoFromHostCode(error.code));
      return;
    }
    if (bytes === 0 && op.command === p.kCmdRead) {
      // Past the end of the file: the rest reads as zeros.
      (op.data as Uint8Array).fill(0, op.doneBytes, op.lengthBytes);
      op.doneBytes = op.lengthBytes;
    } else if (bytes === 0) {
      this.complete(op, p.kEIo);
      return;
    }
    op.doneBytes += bytes;
    if (op.doneBytes < op.lengthBytes) {
      this.continueIo(op);
      return;
    }
    if (op.command !== p.kCmdRead && (op.flags & p.kCmdFlagFua) !== 0) {
      this.ioPending += 1;
      fdatasync(this.fd, op.onSync);
      return;
    }
    this.complete(op, 0);
  }

  syncDone(op: FileOp, error: NodeJS.ErrnoException | null): void {
    this.ioReturned();
    this.complete(op, error === null ? 0 : nbdErrnoFromHostCode(error.code));
  }

  async getExtents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    if (this.scanHandle === null) this.scanHandle = await open(this.path, 'r');
    const scanBytes = Math.min(lengthBytes, kScanBytesMax, this.sizeBytes - offsetBytes);
    const buffer = Buffer.allocUnsafe(Math.max(0, scanBytes));
    const { bytesRead } = await this.scanHandle.read(buffer, 0, scanBytes, offsetBytes);
    if (bytesRead < scanBytes) buffer.fill(0, bytesRead);
    const extents: Extent[] = [];
    for (let at = 0; at < scanBytes; at += kScanBlockBytes) {
      const end = Math.min(at + kScanBlockBytes, scanBytes);
      const flags = isZero(buffer, at, end) ? p.kStateZero : 0;
      const last = extents[extents.length - 1];
      if (last !== undefined && last.flags === flags) last.lengthBytes += end - at;
      else extents.push({ lengthBytes: end - at, flags });
    }
    return extents;
  }

  async close(): Promise<void> {
    if (this.fdClosed) return;
    this.fdClosed = true;
    this.closed = true;
    // Let requests already handed to the thread pool finish before the fd goes away.
    for (let turns = 0; this.inFlight > 0 && turns < 100_000; turns += 1) {
      await new Promise((resolve) => setImmediate(resolve));
    }
    await this.waitIoIdle(kCloseWaitMs);
    await this.scanHandle?.close();
    closeSync(this.fd);
  }
}

function isZero(buffer: Buffer, start: number, end: number): boolean {
  for (let index = start; index < end; index += 1) if (buffer[index] !== 0) return false;
  return true;
}
