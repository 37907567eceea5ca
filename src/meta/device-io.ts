/**
 * Promise-per-request I/O over any BlockDevice (NbdClient, FileDevice, the test MemoryDevice),
 * for the metadata path: superblocks and bitmap pages are few and small, so a Promise per
 * request is fine here (never use this on the data path).
 *
 * Threads: the device's thread.
 *
 * Design notes: DeviceIo installs its own completion handler on the device and owns the token
 * space from then on. A caller that also submits data requests on the same device must route
 * completions itself (the engine will); `enbd create` and `enbd examine` use the device only
 * through DeviceIo.
 *
 * Invariants:
 * - Every request resolves or rejects exactly once; an NBD error becomes
 *   EnbdError('ENBD_ERR_IO', ..., errno) naming the operation, offset and length.
 * - Requests are split at the device's maximum block size; offsets and lengths the callers
 *   pass are multiples of 4 KiB (asserted), which every NBD server's minimum block size divides.
 */
import type { BlockDevice } from '../core/block-device.js';
import { assert } from '../core/assert.js';
import { EnbdError } from '../core/errors.js';
import * as p from '../nbd/protocol.js';
import { errnoNames } from '../nbd/protocol-names.js';

const kAlignBytes = 4096;
const kRequestBytesMax = 4 * 1024 * 1024;

interface Waiter {
  resolve: () => void;
  reject: (error: EnbdError) => void;
  what: string;
}

export class DeviceIo {
  private readonly waiters = new Map<number, Waiter>();
  private nextToken = 1;
  private readonly requestBytesMax: number;

  constructor(readonly device: BlockDevice) {
    device.setCompletionHandler((token, errno) => this.completed(token, errno));
    const deviceMax = device.blockSizes.maximumBytes > 0 ? device.blockSizes.maximumBytes : kRequestBytesMax;
    this.requestBytesMax = Math.max(kAlignBytes, Math.floor(Math.min(deviceMax, kRequestBytesMax) / kAlignBytes) * kAlignBytes);
  }

  private completed(token: number, errno: number): void {
    const waiter = this.waiters.get(token);
    assert(waiter !== undefined, `completion for unknown token ${token}`);
    this.waiters.delete(token);
    if (errno === 0) waiter.resolve();
    else waiter.reject(new EnbdError('ENBD_ERR_IO', `${waiter.what} on ${this.device.description} failed: ${errnoNames[errno] ?? `NBD errno ${errno}`}`, errno));
  }

  private submitOne(command: number, flags: number, offsetBytes: number, data: Uint8Array | null, lengthBytes: number, what: string): Promise<void> {
    const token = this.nextToken;
    this.nextToken = this.nextToken >= 0x3fff_ffff ? 1 : this.nextToken + 1;
    assert(!this.waiters.has(token), 'token reused while in flight');
    return new Promise<void>((resolve, reject) => {
      this.waiters.set(token, { resolve, reject, what });
      this.device.submit(command, flags, offsetBytes, lengthBytes, data, token);
    });
  }

  private checkRange(offsetBytes: number, lengthBytes: number): void {
    assert(offsetBytes % kAlignBytes === 0 && lengthBytes % kAlignBytes === 0, 'metadata I/O is 4K-aligned');
    assert(offsetBytes + lengthBytes <= this.device.sizeBytes, 'metadata I/O inside the device');
  }

  /** Reads `target.length` bytes at `offsetBytes` into `target`. */
  async read(offsetBytes: number, target: Uint8Array): Promise<void> {
    this.checkRange(offsetBytes, target.length);
    for (let done = 0; done < target.length; done += this.requestBytesMax) {
      const lengthBytes = Math.min(this.requestBytesMax, target.length - done);
      const at = offsetBytes + done;
      await this.submitOne(p.kCmdRead, 0, at, target.subarray(done, done + lengthBytes), lengthBytes, `READ of ${lengthBytes} bytes at ${at}`);
    }
  }

  /** Writes `data` at `offsetBytes`; with `durable`, FUA when the device has it, else a FLUSH after. */
  async write(offsetBytes: number, data: Uint8Array, durable: boolean): Promise<void> {
    this.checkRange(offsetBytes, data.length);
    const fua = durable && this.device.features.fua;
    for (let done = 0; done < data.length; done += this.requestBytesMax) {
      const lengthBytes = Math.min(this.requestBytesMax, data.length - done);
      const at = offsetBytes + done;
      await this.submitOne(p.kCmdWrite, fua ? p.kCmdFlagFua : 0, at, data.subarray(done, done + lengthBytes), lengthBytes, `WRITE of ${lengthBytes} bytes at ${at}`);
    }
    if (durable && !fua) await this.flush();
  }

  /** FLUSH when the device supports it (a device without it writes through). */
  async flush(): Promise<void> {
    if (!this.device.features.flush) return;
    await this.submitOne(p.kCmdFlush, 0, 0, null, 0, 'FLUSH');
  }

  get inFlight(): number {
    return this.waiters.size;
  }
}
