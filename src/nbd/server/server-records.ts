/**
 * NBD server, the per-request record of one connection: the fixed table of records, their
 * states, and the decoding of a 28-byte request header into a record.
 *
 * Thread: main thread (session master).
 *
 * Design notes
 * A connection owns kRequestsPerConnection records, made once at accept; a request takes one
 * from the connection's free stack when its header is parsed and gives it back when its reply
 * left (or the connection is gone). The record's device token is (connection index <<
 * kRequestIndexBits) | record index, so a completion finds its connection and record with two
 * integer operations. `onWritten` is bound once per record (a large READ payload's write
 * callback), so the reply path makes no closure per request.
 *
 * Request record states
 * | state     | meaning                                        | next                   |
 * |-----------|------------------------------------------------|------------------------|
 * | free      | on the free stack                              | payload, device        |
 * | payload   | WRITE header parsed, payload arriving          | device, free (on close)|
 * | device    | submitted to the device (or awaiting extents)  | free, writing          |
 * | writing   | large READ payload handed to the socket        | free                   |
 *
 * Invariants:
 * - A record is on the free stack exactly when its state is free.
 * - `data` is null for a free record; `fromDevice`/`chargeBytes` say who must get it back;
 *   `deviceHandle` names a lent device buffer until it went back (`deviceTakesBack`: the
 *   device took it back itself at the WRITE's completion).
 */
import { kTwoPow32 } from '../../core/u64.js';

export const kRequestsPerConnection = 256;
export const kRequestIndexBits = 8;
/** 2^32: splits a u64 wire field into u32 halves (also used by the reply path). */
export { kTwoPow32 };

export const enum RecordState {
  Free = 0,
  Payload = 1,
  Device = 2,
  Writing = 3,
}

/** Who is told when a large READ payload handed to the socket has been written. */
export interface RecordOwner {
  afterLargeWrite(record: RequestRecord): void;
}

export class RequestRecord {
  state = RecordState.Free;
  command = 0;
  flags = 0;
  offsetBytes = 0;
  lengthBytes = 0;
  cookieHigh = 0;
  cookieLow = 0;
  data: Uint8Array | null = null;
  fromDevice = false;
  /** The device's lease handle for `data` when fromDevice (BlockDevice.acquireBuffer), else -1. */
  deviceHandle = -1;
  /** The device takes `data` back itself (a submitted WRITE, writeBuffersReturnAtCompletion). */
  deviceTakesBack = false;
  ownBuffer: Buffer | null = null;
  /** A buffer from the connection's large-buffer pool, returned on release. */
  largeBuffer: Buffer | null = null;
  /** Bytes charged to the connection's buffer share for `data` (0: not a shared buffer). */
  chargeBytes = 0;
  filledBytes = 0;
  readonly onWritten: () => void;
  constructor(
    readonly index: number,
    readonly token: number,
    owner: RecordOwner,
  ) {
    this.onWritten = () => owner.afterLargeWrite(this);
  }
}

/**
 * Fills `record` from the request header at `bytes[position]` (magic already checked) and
 * clears what the previous request left in it.
 */
export function decodeRequestHeader(bytes: Buffer, position: number, record: RequestRecord): void {
  record.flags = bytes.readUInt16BE(position + 4);
  record.command = bytes.readUInt16BE(position + 6);
  record.cookieHigh = bytes.readUInt32BE(position + 8);
  record.cookieLow = bytes.readUInt32BE(position + 12);
  const offsetHigh = bytes.readUInt32BE(position + 16);
  const offsetLow = bytes.readUInt32BE(position + 20);
  // Offsets at or above 2^53 cannot be exact numbers; any such offset is out of range anyway.
  record.offsetBytes = offsetHigh >= 0x20_0000 ? Number.MAX_SAFE_INTEGER : offsetHigh * kTwoPow32 + offsetLow;
  record.lengthBytes = bytes.readUInt32BE(position + 24);
  record.data = null;
  record.fromDevice = false;
  record.deviceHandle = -1;
  record.deviceTakesBack = false;
  record.filledBytes = 0;
}
