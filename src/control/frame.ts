/**
 * Framing of the control socket: every message is a 4-byte big-endian body length followed by
 * a msgpack body (msgpackr, plain maps, no records). Pure bytes <-> values: no sockets here.
 *
 * Threads: the daemon's main thread (ControlServer) and the CLI client's (ControlClient).
 *
 * Design notes
 *   frame  = u32be bodyBytes | body[bodyBytes]
 *   bodyBytes is 1 .. kFrameBodyBytesMax (1 MiB). 0 and anything larger are refused as soon as
 *   the 4 length bytes are in, before any body byte is buffered.
 *
 * | decoder state          | `used`            | `bodyBytes`  |
 * |------------------------|-------------------|--------------|
 * | idle (nothing pending) | 0                 | -1           |
 * | header partly in       | 1..3              | -1           |
 * | body partly in         | 4..4+bodyBytes-1  | 1..max       |
 *
 * Invariants:
 * - The decoder's buffer is grow-only and never exceeds kFrameHeaderBytes + kFrameBodyBytesMax;
 *   it only ever holds the one incomplete frame. Complete frames in a chunk are decoded straight
 *   from the chunk (no copy).
 * - Any split of a byte stream into chunks yields the same messages in the same order.
 * - After a FrameError the decoder is poisoned: the caller must drop the connection.
 * - Decoded values never alias the decoder's buffer or the caller's chunk (copyBuffers); msgpack
 *   bin values decode as Buffers.
 */
import { Packr } from 'msgpackr';
import { assert } from '../core/assert.js';
import { EnbdError } from '../core/errors.js';

export const kFrameHeaderBytes = 4;
export const kFrameBodyBytesMax = 1024 * 1024;
const kInitialBufferBytes = 64 * 1024;

assert(kFrameBodyBytesMax + kFrameHeaderBytes <= 0xffff_ffff, 'a frame length fits the u32 prefix');
assert(kInitialBufferBytes <= kFrameBodyBytesMax + kFrameHeaderBytes, 'initial buffer within bound');

export type FrameErrorCode = 'ENBD_CTL_FRAME_EMPTY' | 'ENBD_CTL_FRAME_TOO_LARGE' | 'ENBD_CTL_FRAME_UNDECODABLE' | 'ENBD_CTL_FRAME_UNENCODABLE';

/** A frame that cannot be read or written; the connection it came on must be closed. */
export class FrameError extends EnbdError {
  declare readonly code: FrameErrorCode;
  constructor(code: FrameErrorCode, message: string) {
    super(code, message);
    this.name = 'FrameError';
  }
}

/** One codec for both ends: plain maps as objects, integers above 2^32 as numbers. */
const packr = new Packr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number', copyBuffers: true, moreTypes: false });

/** Encodes one message as a complete frame (a fresh Buffer the caller may keep). */
export function encodeFrame(message: unknown): Buffer {
  let body: Uint8Array;
  try {
    body = packr.pack(message);
  } catch (error) {
    throw new FrameError('ENBD_CTL_FRAME_UNENCODABLE', `cannot encode message: ${error instanceof Error ? error.message : String(error)}`);
  }
  if (body.length > kFrameBodyBytesMax) {
    throw new FrameError('ENBD_CTL_FRAME_TOO_LARGE', `message of ${body.length} bytes exceeds the ${kFrameBodyBytesMax}-byte frame limit`);
  }
  assert(body.length > 0, 'msgpack never encodes to zero bytes');
  const frame = Buffer.allocUnsafe(kFrameHeaderBytes + body.length);
  frame.writeUInt32BE(body.length, 0);
  frame.set(body, kFrameHeaderBytes);
  return frame;
}

function decodeBody(body: Uint8Array): unknown {
  assert(body.length > 0 && body.length <= kFrameBodyBytesMax, 'body length checked before decoding');
  try {
    return packr.unpack(body);
  } catch (error) {
    throw new FrameError('ENBD_CTL_FRAME_UNDECODABLE', `undecodable frame body (${body.length} bytes): ${error instanceof Error ? error.message : String(error)}`);
  }
}

function checkBodyBytes(bodyBytes: number): void {
  if (bodyBytes === 0) throw new FrameError('ENBD_CTL_FRAME_EMPTY', 'empty frame (length prefix 0)');
  if (bodyBytes > kFrameBodyBytesMax) {
    throw new FrameError('ENBD_CTL_FRAME_TOO_LARGE', `frame length prefix ${bodyBytes} exceeds the ${kFrameBodyBytesMax}-byte limit`);
  }
}

function readU32(bytes: Uint8Array, at: number): number {
  return (((bytes[at] as number) << 24) >>> 0) + ((bytes[at + 1] as number) << 16) + ((bytes[at + 2] as number) << 8) + (bytes[at + 3] as number);
}

/** Incremental decoder for one connection's byte stream. */
export class FrameDecoder {
  /** A Buffer (not a plain Uint8Array): msgpackr decodes bin values as the source's type. */
  private buffer = Buffer.alloc(kInitialBufferBytes);
  private used = 0;
  private bodyBytes = -1;
  private failed = false;
  private decoding = false;

  /** Bytes held for an incomplete frame. */
  get pendingBytes(): number {
    return this.used;
  }

  /**
   * Feeds one chunk; calls `onMessage` for every frame it completes, in order.
   * Throws FrameError on an empty, oversized or undecodable frame (the decoder is then dead).
   */
  push(chunk: Uint8Array, onMessage: (message: unknown) => void): void {
    assert(!this.decoding, 'FrameDecoder.push is not re-entrant');
    assert(!this.failed, 'FrameDecoder used after a FrameError');
    this.decoding = true;
    const bytes = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    try {
      this.consume(bytes, onMessage);
    } catch (error) {
      if (error instanceof FrameError) this.failed = true;
      throw error;
    } finally {
      this.decoding = false;
    }
  }

  private consume(chunk: Buffer, onMessage: (message: unknown) => void): void {
    let at = 0;
    while (at < chunk.length) {
      if (this.used === 0) {
        const rest = chunk.length - at;
        if (rest >= kFrameHeaderBytes) {
          const bodyBytes = readU32(chunk, at);
          checkBodyBytes(bodyBytes);
          if (rest >= kFrameHeaderBytes + bodyBytes) {
            const start = at + kFrameHeaderBytes;
            at = start + bodyBytes;
            onMessage(decodeBody(chunk.subarray(start, at)));
            continue;
          }
        }
      }
      at += this.accumulate(chunk, at);
      if (this.bodyBytes < 0 && this.used === kFrameHeaderBytes) {
        this.bodyBytes = readU32(this.buffer, 0);
        checkBodyBytes(this.bodyBytes);
      }
      if (this.bodyBytes > 0 && this.used === kFrameHeaderBytes + this.bodyBytes) {
        const body = this.buffer.subarray(kFrameHeaderBytes, this.used);
        this.used = 0;
        this.bodyBytes = -1;
        onMessage(decodeBody(body));
      }
    }
    assert(this.used <= kFrameHeaderBytes + kFrameBodyBytesMax, 'pending bytes within one frame');
  }

  /** Copies what the incomplete frame still lacks (or the whole rest) from chunk[at..]. */
  private accumulate(chunk: Buffer, at: number): number {
    const wanted = this.bodyBytes < 0 ? kFrameHeaderBytes - this.used : kFrameHeaderBytes + this.bodyBytes - this.used;
    assert(wanted > 0, 'an incomplete frame wants bytes');
    const taken = Math.min(wanted, chunk.length - at);
    const needed = this.used + taken;
    if (needed > this.buffer.length) {
      let capacity = this.buffer.length;
      while (capacity < needed) capacity *= 2;
      const grown = Buffer.alloc(Math.min(capacity, kFrameHeaderBytes + kFrameBodyBytesMax));
      grown.set(this.buffer.subarray(0, this.used));
      this.buffer = grown;
    }
    this.buffer.set(chunk.subarray(at, at + taken), this.used);
    this.used += taken;
    return taken;
  }
}
