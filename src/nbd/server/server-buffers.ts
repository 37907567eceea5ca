/**
 * NBD server, the payload buffers of one connection's requests: a device buffer (a ring slot,
 * charged to the connection's fair share, buffer-share.ts) when the device provides them,
 * else the connection's own memory (a per-record buffer up to kRecordBufferKeepBytes, larger
 * ones from a small per-connection pool).
 *
 * Thread: main thread (session master).
 *
 * Design notes
 * `acquire` either gives the record an exact-length view for READ or WRITE data or says no
 * (over the fair share, or the device has none free): the connection then stalls. `release`
 * gives back exactly what `acquire` took, in this order: the device buffer, the share charge
 * (and a wake for connections waiting on their share), the pooled large buffer. Own buffers
 * are reused, so a steady workload allocates nothing per request; the pool keeps at most
 * kLargeBuffersKept buffers and kLargeBufferBytesKept bytes.
 *
 * A device with `writeBuffersReturnAtCompletion` takes a submitted WRITE's buffer back itself
 * when the WRITE completes (`submitting` marks the record), so only READ buffers and WRITE
 * buffers that were never submitted (the connection closed mid-payload) are released here.
 *
 * Invariants:
 * - A device buffer is released exactly once (release clears `fromDevice`): by
 *   `releaseBuffer(handle)`, or by the device itself for a submitted WRITE (`deviceTakesBack`).
 * - A share charge is released exactly as acquired (release clears `chargeBytes`).
 */
import type { BlockDevice } from '../../core/block-device.js';
import { assert } from '../../core/assert.js';
import * as p from '../protocol.js';
import type { BufferShare, ShareUser } from './buffer-share.js';
import type { RequestRecord } from './server-records.js';

/** Own receive/read buffers up to this size are kept per record and reused. */
const kRecordBufferKeepBytes = 256 * 1024;
/** Larger own buffers go back to a per-connection pool: at most this many, this many bytes. */
const kLargeBuffersKept = 16;
const kLargeBufferBytesKept = 64 * 1024 * 1024;

/** What the buffers need from the server: the device, its share, and a wake-up. */
export interface BufferHost {
  readonly device: BlockDevice;
  readonly bufferShare: BufferShare | null;
  wake(): void;
}

export class RecordBuffers {
  private readonly largeBuffers: Buffer[] = [];
  private largeBufferBytes = 0;

  /** The device takes submitted WRITE buffers back itself (fixed for the device's life). */
  private readonly deviceTakesWrites: boolean;

  constructor(
    private readonly host: BufferHost,
    private readonly user: ShareUser,
  ) {
    this.deviceTakesWrites = host.device.writeBuffersReturnAtCompletion === true;
  }

  /**
   * Gets a buffer for READ or WRITE data; false when this connection is over its fair share of
   * the device's buffers (buffer-share.ts) or the device has none free right now.
   */
  acquire(record: RequestRecord): boolean {
    const device = this.host.device;
    if (device.acquireBuffer !== undefined) {
      const share = this.host.bufferShare;
      const charge = share === null ? 0 : share.chargeFor(record.lengthBytes);
      if (share !== null && !share.mayAcquire(this.user, charge)) return false;
      const lease = device.acquireBuffer(record.command, record.lengthBytes, record.token);
      if (lease === null) return false;
      assert(lease.view.length === record.lengthBytes && lease.handle >= 0, 'device buffer has the asked length');
      record.data = lease.view;
      record.deviceHandle = lease.handle;
      record.fromDevice = true;
      record.deviceTakesBack = false;
      record.chargeBytes = charge;
      if (share !== null) share.acquired(this.user, charge);
      return true;
    }
    const length = record.lengthBytes;
    if (length <= kRecordBufferKeepBytes) {
      if (record.ownBuffer === null || record.ownBuffer.length < length) {
        record.ownBuffer = Buffer.allocUnsafeSlow(Math.max(length, 4096));
      }
      record.data = record.ownBuffer.length === length ? record.ownBuffer : record.ownBuffer.subarray(0, length);
    } else {
      const large = this.takeLargeBuffer(length);
      record.largeBuffer = large;
      record.data = large.length === length ? large : large.subarray(0, length);
    }
    return true;
  }

  /**
   * `record` (holding a device buffer) is being submitted: a WRITE's buffer goes back to a
   * device with writeBuffersReturnAtCompletion by itself, so release must not return it.
   */
  submitting(record: RequestRecord): void {
    if (record.fromDevice && record.command === p.kCmdWrite && this.deviceTakesWrites) {
      record.deviceTakesBack = true;
    }
  }

  /** Gives back what `acquire` took for `record` (it keeps `data`; the caller clears it). */
  release(record: RequestRecord): void {
    if (record.fromDevice) {
      if (!record.deviceTakesBack) this.host.device.releaseBuffer?.(record.deviceHandle);
      record.fromDevice = false;
      record.deviceTakesBack = false;
      record.deviceHandle = -1;
      if (record.chargeBytes > 0) {
        this.host.bufferShare?.released(this.user, record.chargeBytes);
        record.chargeBytes = 0;
        // Shares grew: connections waiting on theirs may go on.
        this.host.wake();
      }
    }
    if (record.largeBuffer !== null) {
      this.giveLargeBuffer(record.largeBuffer);
      record.largeBuffer = null;
    }
  }

  /** A pooled buffer of at least `length` bytes (power-of-two capacity when new). */
  private takeLargeBuffer(length: number): Buffer {
    const pool = this.largeBuffers;
    for (let index = 0; index < pool.length; index += 1) {
      const candidate = pool[index] as Buffer;
      if (candidate.length >= length) {
        pool[index] = pool[pool.length - 1] as Buffer;
        pool.pop();
        this.largeBufferBytes -= candidate.length;
        return candidate;
      }
    }
    let capacity = kRecordBufferKeepBytes * 2;
    while (capacity < length) capacity *= 2;
    return Buffer.allocUnsafeSlow(capacity);
  }

  private giveLargeBuffer(buffer: Buffer): void {
    if (this.largeBuffers.length >= kLargeBuffersKept) return;
    if (this.largeBufferBytes + buffer.length > kLargeBufferBytesKept) return;
    this.largeBuffers.push(buffer);
    this.largeBufferBytes += buffer.length;
  }
}
