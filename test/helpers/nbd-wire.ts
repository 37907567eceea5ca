/**
 * Server-side NBD frames for tests that play the server by hand (scripted servers, parser
 * feeds): option replies, simple replies and structured reply chunks, built from the numbers in
 * src/nbd/protocol.ts. One encoder of each, shared by the client's handshake, reply-parser and
 * direct-receive tests.
 * Thread: test main thread. Allocates freely (tests only).
 *
 * A cookie is either its 8 bytes or the two 32-bit halves the client's request table hands out.
 */
import {
  kOptionReplyMagicHigh,
  kOptionReplyMagicLow,
  kReplyTypeError,
  kReplyTypeOffsetData,
  kReplyTypeOffsetHole,
  kSimpleReplyMagic,
  kStructuredReplyMagic,
} from '../../src/nbd/protocol.js';

export type Cookie = Uint8Array | readonly [number, number];

function writeCookie(frame: Buffer, cookie: Cookie, at: number): void {
  if (cookie instanceof Uint8Array) {
    frame.set(cookie.subarray(0, 8), at);
    return;
  }
  frame.writeUInt32BE(cookie[0], at);
  frame.writeUInt32BE(cookie[1], at + 4);
}

/** A 64-bit big-endian number (values up to 2^53). */
export function u64(value: number): Buffer {
  const bytes = Buffer.alloc(8);
  bytes.writeUInt32BE(Math.floor(value / 2 ** 32), 0);
  bytes.writeUInt32BE(value >>> 0, 4);
  return bytes;
}

/** An option reply (fixed newstyle negotiation). */
export function optionReply(option: number, type: number, payload: Uint8Array = new Uint8Array(0)): Buffer {
  const frame = Buffer.alloc(20 + payload.length);
  frame.writeUInt32BE(kOptionReplyMagicHigh, 0);
  frame.writeUInt32BE(kOptionReplyMagicLow, 4);
  frame.writeUInt32BE(option, 8);
  frame.writeUInt32BE(type, 12);
  frame.writeUInt32BE(payload.length, 16);
  frame.set(payload, 20);
  return frame;
}

/** A simple reply, followed by `data` (a READ's payload) when given. */
export function simpleReply(cookie: Cookie, errno: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const frame = Buffer.alloc(16 + data.length);
  frame.writeUInt32BE(kSimpleReplyMagic, 0);
  frame.writeUInt32BE(errno, 4);
  writeCookie(frame, cookie, 8);
  frame.set(data, 16);
  return frame;
}

/** A structured reply chunk. */
export function structuredChunk(cookie: Cookie, flags: number, type: number, payload: Uint8Array = new Uint8Array(0)): Buffer {
  const frame = Buffer.alloc(20 + payload.length);
  frame.writeUInt32BE(kStructuredReplyMagic, 0);
  frame.writeUInt16BE(flags, 4);
  frame.writeUInt16BE(type, 6);
  writeCookie(frame, cookie, 8);
  frame.writeUInt32BE(payload.length, 16);
  frame.set(payload, 20);
  return frame;
}

/** NBD_REPLY_TYPE_OFFSET_DATA: `data` at `offsetBytes`. */
export function dataChunk(cookie: Cookie, flags: number, offsetBytes: number, data: Uint8Array): Buffer {
  return structuredChunk(cookie, flags, kReplyTypeOffsetData, Buffer.concat([u64(offsetBytes), data]));
}

/** NBD_REPLY_TYPE_OFFSET_HOLE: `lengthBytes` of zeros at `offsetBytes`. */
export function holeChunk(cookie: Cookie, flags: number, offsetBytes: number, lengthBytes: number): Buffer {
  const size = Buffer.alloc(4);
  size.writeUInt32BE(lengthBytes, 0);
  return structuredChunk(cookie, flags, kReplyTypeOffsetHole, Buffer.concat([u64(offsetBytes), size]));
}

/** An error chunk (NBD_REPLY_TYPE_ERROR, or ERROR_OFFSET with `offset`). */
export function errorChunk(cookie: Cookie, flags: number, errno: number, message: string, type = kReplyTypeError, offset: number | null = null): Buffer {
  const text = Buffer.from(message);
  const head = Buffer.alloc(6);
  head.writeUInt32BE(errno, 0);
  head.writeUInt16BE(text.length, 4);
  const parts: Buffer[] = [head, text];
  if (offset !== null) parts.push(u64(offset));
  return structuredChunk(cookie, flags, type, Buffer.concat(parts));
}
