/**
 * The seam between an NBD export and whatever stores the bytes ("server stub" in the seed
 * design). The NBD server serves any BlockDevice; the mirror engine is a BlockDevice whose
 * legs are BlockDevices too (an NBD client, a local file). Neither side knows the other's kind.
 *
 * Completion model: no Promise per request. The owner installs one completion handler and
 * tags each submitted request with an integer token it chooses (unique among its requests in
 * flight). The device calls the handler exactly once per submitted token, with 0 or an NBD
 * error value (protocol numbers from src/nbd/protocol.ts, e.g. 5 = EIO).
 *
 * Threads: a device is used from one thread only (the thread that created it).
 *
 * Invariants:
 * - `submit` never throws for an operating error; it completes the token with an errno.
 * - For READ, `data` is the destination (exactly `lengthBytes` long) and is filled before
 *   completion. For WRITE it is the source and is not retained after completion.
 * - Requests are validated by the caller (range, alignment, flags) before submit; a device may
 *   still answer EINVAL/ENOSPC for what it cannot do.
 */

import type { EnbdError } from './errors.js';

export interface DeviceFeatures {
  readOnly: boolean;
  flush: boolean;
  fua: boolean;
  trim: boolean;
  writeZeroes: boolean;
  fastZero: boolean;
  cache: boolean;
  multiConn: boolean;
  rotational: boolean;
  /** base:allocation block status is meaningful (otherwise the server reports all data). */
  blockStatus: boolean;
}

export interface BlockSizes {
  minimumBytes: number;
  preferredBytes: number;
  maximumBytes: number;
}

export interface Extent {
  lengthBytes: number;
  /** base:allocation flags: 1 = hole, 2 = reads as zero. */
  flags: number;
}

export type CompletionHandler = (token: number, errno: number) => void;

/** A device buffer lent for one request (BlockDevice.acquireBuffer). */
export interface BufferLease {
  /** Names the buffer to submit and releaseBuffer; >= 0. */
  readonly handle: number;
  /** Exactly the asked length. */
  readonly view: Uint8Array;
}

export interface BlockDevice {
  readonly sizeBytes: number;
  readonly features: DeviceFeatures;
  readonly blockSizes: BlockSizes;
  /** Human description (shown as NBD_INFO_DESCRIPTION and in logs). */
  readonly description: string;
  setCompletionHandler(handler: CompletionHandler): void;
  /**
   * Start one command (kCmdRead, kCmdWrite, kCmdFlush, kCmdTrim, kCmdWriteZeroes, kCmdCache)
   * with NBD command flags (FUA, NO_HOLE, FAST_ZERO). Completes through the handler.
   */
  submit(
    command: number,
    flags: number,
    offsetBytes: number,
    lengthBytes: number,
    data: Uint8Array | null,
    token: number,
    /** The lease handle when `data` is a lent device buffer (acquireBuffer), else -1. */
    handle?: number,
  ): void;
  /** base:allocation extents from offset; may cover less or (last extent) more than asked. */
  getExtents(offsetBytes: number, lengthBytes: number): Promise<Extent[]>;
  /**
   * Optional buffer provider: a device that wants payloads in its own memory (the mirror's
   * shared ring) lends a buffer of `lengthBytes` for the request `token`, or returns null when
   * none is free right now (the caller waits for `onBufferAvailable`). The lease's `handle`
   * names the buffer from then on: the caller keeps it with its request and passes it to
   * `submit` and `releaseBuffer` (the device keeps no token-to-buffer table). The lease object
   * itself may be reused by the device at the next acquire: copy its two fields out at once.
   * The caller gives the buffer back with `releaseBuffer(handle)` once it no longer reads it
   * (after the reply left, or on error), except a WRITE's buffer when
   * `writeBuffersReturnAtCompletion` is set: the device takes that one back itself when it
   * completes the WRITE (the caller never reads a WRITE's payload after submit).
   */
  acquireBuffer?(command: number, lengthBytes: number, token: number): BufferLease | null;
  releaseBuffer?(handle: number): void;
  onBufferAvailable?: (() => void) | null;
  /** With the buffer provider: a submitted WRITE's lent buffer returns at its completion. */
  readonly writeBuffersReturnAtCompletion?: boolean;
  /**
   * Optional, with the buffer provider: total bytes of the buffers it can hand out (the mirror:
   * ring slots x slot bytes). The server then keeps each connection to a fair share of them
   * (src/nbd/server/buffer-share.ts), so one client cannot hold them all.
   */
  readonly bufferCapacityBytes?: number;
  /**
   * Optional: the unit buffers are handed out in (the mirror: slot bytes); a request is charged
   * whole units. Without it the server assumes capacity / 256.
   */
  readonly bufferUnitBytes?: number;
  /** Number of requests submitted and not yet completed. */
  readonly inFlight: number;
  /**
   * Optional: called once when the device's connection is lost on its own (server closed it,
   * socket error, request timeout). Not called for close()/fence().
   */
  onClose?: ((error: EnbdError | null) => void) | null;
  /**
   * Optional fence: stop using the device now (requests in flight complete with EIO, new ones
   * fail), and resolve true once nothing ever submitted can still be applied by the server
   * (an NBD leg: NBD_CMD_DISC sent and the server closed the connection; a file: its pending
   * I/O finished), or false after `timeoutMs` (a later call waits again). Devices without it are
   * fenced by close().
   */
  fence?(timeoutMs: number): Promise<boolean>;
  close(): Promise<void>;
}

export function noFeatures(): DeviceFeatures {
  return {
    readOnly: false,
    flush: false,
    fua: false,
    trim: false,
    writeZeroes: false,
    fastZero: false,
    cache: false,
    multiConn: false,
    rotational: false,
    blockStatus: false,
  };
}
