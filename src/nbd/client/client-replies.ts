/**
 * Incremental parser for NBD transmission replies on the client side: simple replies and
 * structured reply chunks, fed with whatever byte ranges the socket delivers (split or merged
 * at any boundary). READ data is copied straight from the receive buffer into the request's
 * destination (one copy; copyBytes keeps it word by word when the receive-buffer position is
 * not 8-byte congruent with the ring slot), or, with direct receive, read by the socket
 * straight into it (no copy: `directTarget` / `directReceived`, driven by NbdClient);
 * OFFSET_HOLE zero-fills it.
 * Other chunk payloads are handed out as views of the receive buffer, or of a grow-only scratch
 * buffer when a payload straddles reads.
 * Threads: the NbdClient's thread only.
 *
 * Direct receive: in DATA the rest of the destination is offered as the next read's buffer
 * (`directTarget`, from kDirectReceiveMinBytes left); `wantBytes` is the exact count that
 * finishes the current header or small payload (a structured header at a reply boundary asks
 * for 28: the chunk header and an OFFSET_DATA offset), so the client can read only up to the
 * next READ data and let it land in place. Both paths count their bytes (dataBytesCopied,
 * dataBytesDirect).
 *
 * States:
 *   HEADER   collecting a 16-byte simple or 20-byte structured header (magic decides)
 *   PAYLOAD  collecting a small payload (data-chunk offset, hole, block status, error)
 *   DATA     copying READ data into the destination
 *   DEAD     a protocol error was reported; nothing more is parsed
 *
 * Invariants:
 * - Each request gets exactly one `onReplyDone`, after the parser is finished with its slot
 *   (so the receiver may release and reuse the slot inside the callback).
 * - A READ succeeds only if its data and hole chunks covered exactly its length.
 * - Protocol violations (bad magic, unknown cookie, a non-error chunk type we do not know,
 *   chunk outside the request, inconsistent lengths) -> `onProtocolError` once, then DEAD:
 *   the stream has lost framing and the caller must hard-disconnect.
 * - Unknown error values are reported as EINVAL; an unknown error chunk type fails the request.
 * - No allocation per reply on the data path (payload scratch grows rarely, bounded).
 */
import { assert } from '../../core/assert.js';
import { copyBytes } from '../../core/copy-bytes.js';
import { kTwoPow32 } from '../../core/u64.js';
import {
  kCmdBlockStatus,
  kCmdRead,
  kReplyFlagDone,
  kReplyTypeBlockStatus,
  kReplyTypeErrorBit,
  kReplyTypeErrorOffset,
  kReplyTypeNone,
  kReplyTypeOffsetData,
  kReplyTypeOffsetHole,
  kSimpleReplyHeaderBytes,
  kSimpleReplyMagic,
  kStructuredReplyHeaderBytes,
  kStructuredReplyMagic,
} from '../protocol.js';
import { normalizeErrno } from '../protocol-names.js';
import type { RequestTable } from './client-requests.js';

/** Largest block status chunk accepted: 2^20 extents (the spec's SHOULD NOT exceed) + id. */
export const kBlockStatusPayloadBytesMax = 4 + 8 * 1024 * 1024;
/** Largest error chunk accepted: error, length, 4 KiB message, offset. */
export const kErrorPayloadBytesMax = 4 + 2 + 4096 + 8;

const kStateHeader = 0;
const kStatePayload = 1;
const kStateData = 2;
const kStateDead = 3;

const kAfterDataOffset = 0;
const kAfterHole = 1;
const kAfterBlockStatus = 2;
const kAfterError = 3;

export interface ReplyEvents {
  /** The request in `slot` is complete with 0 or an NBD error value. */
  onReplyDone(slot: number, errno: number): void;
  /** A BLOCK_STATUS chunk: `view[start, end)` is context id u32 then (length u32, flags u32)*. */
  onBlockStatus(slot: number, view: Buffer, start: number, end: number): void;
  /** An error chunk arrived (the request fails when its last chunk arrives). */
  onChunkError(slot: number, errno: number, message: string): void;
  /** Framing lost; called once, after which the parser ignores input. */
  onProtocolError(message: string): void;
}

export class ReplyParser {
  private state = kStateHeader;
  private parsing = false;
  private readonly header = Buffer.alloc(kStructuredReplyHeaderBytes);
  private headerHaveBytes = 0;
  private headerNeedBytes = 0;
  private payload = Buffer.alloc(4096);
  private payloadHaveBytes = 0;
  private payloadNeedBytes = 0;
  private after = kAfterDataOffset;
  private slot = -1;
  private chunkFlags = 0;
  private chunkType = 0;
  private chunkBytes = 0;
  /** DATA: the current reply is a simple READ reply (done when the data ends). */
  private simpleData = false;
  private dataTargetBytes = 0;
  private dataRemainingBytes = 0;
  /** Some of the current reply's data was received directly (reset at each reply's end). */
  private replyDirect = false;
  /** READ data bytes copied from pushed buffers into destinations. */
  dataBytesCopied = 0;
  /** READ data bytes the socket read straight into destinations (directReceived). */
  dataBytesDirect = 0;
  /** onReplyDone's reply had data received directly (valid inside onReplyDone). */
  lastReplyDirect = false;

  constructor(
    private readonly table: RequestTable,
    private readonly events: ReplyEvents,
  ) {}

  get isDead(): boolean {
    return this.state === kStateDead;
  }

  /** True between replies (no partial header or payload buffered). */
  get isIdle(): boolean {
    return this.state === kStateHeader && this.headerHaveBytes === 0;
  }

  /**
   * Direct receive: the rest of the current READ data's destination when `minBytes` or more
   * of it are left, or any of it once this reply's data went direct (so a large READ's tail is
   * not copied); the destination itself when all of it is left, else a view. Else null.
   */
  directTarget(minBytes: number): Uint8Array | null {
    if (this.state !== kStateData) return null;
    if (this.dataRemainingBytes < minBytes && !this.replyDirect) return null;
    const target = this.table.data[this.slot];
    assert(target !== null && target !== undefined, 'READ has a destination');
    const from = this.dataTargetBytes;
    const to = from + this.dataRemainingBytes;
    return from === 0 && to === target.length ? target : target.subarray(from, to);
  }

  /** `count` bytes were read straight into the last `directTarget()` (in order, nothing skipped). */
  directReceived(count: number): void {
    assert(!this.parsing, 'ReplyParser.directReceived is not re-entrant');
    assert(this.state === kStateData, 'direct bytes belong to READ data');
    assert(count > 0 && count <= this.dataRemainingBytes, 'direct bytes fit the data left');
    this.parsing = true;
    try {
      this.dataTargetBytes += count;
      this.dataRemainingBytes -= count;
      this.dataBytesDirect += count;
      this.replyDirect = true;
      if (this.dataRemainingBytes === 0) this.dataEnd();
    } finally {
      this.parsing = false;
    }
  }

  /**
   * Bytes that finish the current header or small payload and no more (0 when DEAD). At a
   * reply boundary: a simple header, or with `structured` a chunk header plus the 8-byte
   * offset of an OFFSET_DATA chunk. In DATA: the data left.
   */
  wantBytes(structured: boolean): number {
    switch (this.state) {
      case kStateHeader:
        if (this.headerHaveBytes === 0) return structured ? kStructuredReplyHeaderBytes + 8 : kSimpleReplyHeaderBytes;
        if (this.headerHaveBytes < 4) return (structured ? kStructuredReplyHeaderBytes : kSimpleReplyHeaderBytes) - this.headerHaveBytes;
        return this.headerNeedBytes - this.headerHaveBytes;
      case kStatePayload:
        return this.payloadNeedBytes - this.payloadHaveBytes;
      case kStateData:
        return this.dataRemainingBytes;
      default:
        return 0;
    }
  }

  /** Stop parsing for good (the connection is gone). */
  kill(): void {
    this.state = kStateDead;
    this.slot = -1;
  }

  /** Feed `buffer[start, end)`. The bytes are consumed before this returns. */
  push(buffer: Buffer, start: number, end: number): void {
    assert(!this.parsing, 'ReplyParser.push is not re-entrant');
    assert(start >= 0 && end <= buffer.length && start <= end, 'push range inside the buffer');
    this.parsing = true;
    try {
      let position = start;
      while (position < end && this.state !== kStateDead) {
        if (this.state === kStateHeader) position = this.takeHeader(buffer, position, end);
        else if (this.state === kStateData) position = this.takeData(buffer, position, end);
        else position = this.takePayload(buffer, position, end);
      }
    } finally {
      this.parsing = false;
    }
  }

  private fail(message: string): void {
    if (this.state === kStateDead) return;
    this.state = kStateDead;
    this.slot = -1;
    this.events.onProtocolError(message);
  }

  private headerBytesFor(magic: number): number {
    if (magic === kSimpleReplyMagic) return kSimpleReplyHeaderBytes;
    if (magic === kStructuredReplyMagic) return kStructuredReplyHeaderBytes;
    this.fail(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
    return 0;
  }

  private takeHeader(buffer: Buffer, position: number, end: number): number {
    if (this.headerHaveBytes === 0 && end - position >= 4) {
      const needBytes = this.headerBytesFor(buffer.readUInt32BE(position));
      if (needBytes === 0) return end;
      if (end - position >= needBytes) {
        this.onHeader(buffer, position);
        return position + needBytes;
      }
    }
    const targetBytes = this.headerHaveBytes < 4 ? 4 : this.headerNeedBytes;
    const countBytes = Math.min(targetBytes - this.headerHaveBytes, end - position);
    buffer.copy(this.header, this.headerHaveBytes, position, position + countBytes);
    this.headerHaveBytes += countBytes;
    if (this.headerHaveBytes === 4 && targetBytes === 4) {
      this.headerNeedBytes = this.headerBytesFor(this.header.readUInt32BE(0));
      if (this.headerNeedBytes === 0) return end;
    } else if (this.headerHaveBytes === this.headerNeedBytes) {
      this.headerHaveBytes = 0;
      this.onHeader(this.header, 0);
    }
    return position + countBytes;
  }

  private lookup(view: Buffer, at: number): number {
    const slot = this.table.lookup(view.readUInt32BE(at), view.readUInt32BE(at + 4));
    if (slot < 0) {
      const cookie = `${view.toString('hex', at, at + 4)}${view.toString('hex', at + 4, at + 8)}`;
      this.fail(`reply for unknown cookie 0x${cookie}`);
    }
    return slot;
  }

  private onHeader(view: Buffer, at: number): void {
    const magic = view.readUInt32BE(at);
    const slot = this.lookup(view, at + 8);
    if (slot < 0) return;
    this.slot = slot;
    if (magic === kSimpleReplyMagic) {
      this.onSimpleReply(slot, view.readUInt32BE(at + 4));
      return;
    }
    assert(magic === kStructuredReplyMagic, 'header magic was checked');
    this.chunkFlags = view.readUInt16BE(at + 4);
    this.chunkType = view.readUInt16BE(at + 6);
    this.chunkBytes = view.readUInt32BE(at + 16);
    this.onChunkHeader(slot);
  }

  private onSimpleReply(slot: number, errno: number): void {
    const command = this.table.command[slot];
    if (errno !== 0) {
      this.finish(slot, normalizeErrno(errno));
      return;
    }
    if (command === kCmdBlockStatus) {
      this.fail('simple success reply to BLOCK_STATUS (status chunks are required)');
      return;
    }
    if (command !== kCmdRead || this.table.lengthBytes[slot] === 0) {
      this.finish(slot, 0);
      return;
    }
    this.simpleData = true;
    this.dataTargetBytes = 0;
    this.dataRemainingBytes = this.table.lengthBytes[slot] as number;
    this.table.coveredBytes[slot] = this.dataRemainingBytes;
    this.state = kStateData;
  }

  private onChunkHeader(slot: number): void {
    const command = this.table.command[slot];
    const type = this.chunkType;
    const chunkBytes = this.chunkBytes;
    if (type === kReplyTypeNone) {
      if (chunkBytes !== 0) return this.fail(`NONE chunk with ${chunkBytes} payload bytes`);
      if ((this.chunkFlags & kReplyFlagDone) === 0) {
        return this.fail('NONE chunk without the DONE flag');
      }
      this.chunkEnd();
      return;
    }
    if (type === kReplyTypeOffsetData) {
      if (command !== kCmdRead) {
        return this.fail(`OFFSET_DATA chunk for command ${String(command)}`);
      }
      if (chunkBytes < 9) return this.fail(`OFFSET_DATA chunk of ${chunkBytes} bytes`);
      return this.expectPayload(8, kAfterDataOffset);
    }
    if (type === kReplyTypeOffsetHole) {
      if (command !== kCmdRead) {
        return this.fail(`OFFSET_HOLE chunk for command ${String(command)}`);
      }
      if (chunkBytes !== 12) return this.fail(`OFFSET_HOLE chunk of ${chunkBytes} bytes`);
      return this.expectPayload(12, kAfterHole);
    }
    if (type === kReplyTypeBlockStatus) {
      if (command !== kCmdBlockStatus) {
        return this.fail(`BLOCK_STATUS chunk for command ${String(command)}`);
      }
      const ragged = (chunkBytes - 4) % 8 !== 0;
      if (chunkBytes < 12 || ragged || chunkBytes > kBlockStatusPayloadBytesMax) {
        return this.fail(`BLOCK_STATUS chunk of ${chunkBytes} bytes`);
      }
      return this.expectPayload(chunkBytes, kAfterBlockStatus);
    }
    if ((type & kReplyTypeErrorBit) !== 0) {
      if (chunkBytes < 6 || chunkBytes > kErrorPayloadBytesMax) {
        return this.fail(`error chunk type 0x${type.toString(16)} of ${chunkBytes} bytes`);
      }
      return this.expectPayload(chunkBytes, kAfterError);
    }
    this.fail(`unknown structured reply chunk type ${type}`);
  }

  private expectPayload(needBytes: number, after: number): void {
    assert(needBytes > 0, 'payload has bytes');
    if (needBytes > this.payload.length) {
      let bytes = this.payload.length;
      while (bytes < needBytes) bytes *= 2;
      this.payload = Buffer.alloc(bytes);
    }
    this.payloadNeedBytes = needBytes;
    this.payloadHaveBytes = 0;
    this.after = after;
    this.state = kStatePayload;
  }

  private takePayload(buffer: Buffer, position: number, end: number): number {
    const needBytes = this.payloadNeedBytes;
    if (this.payloadHaveBytes === 0 && end - position >= needBytes) {
      this.state = kStateHeader;
      this.onPayload(buffer, position);
      return position + needBytes;
    }
    const countBytes = Math.min(needBytes - this.payloadHaveBytes, end - position);
    buffer.copy(this.payload, this.payloadHaveBytes, position, position + countBytes);
    this.payloadHaveBytes += countBytes;
    if (this.payloadHaveBytes === needBytes) {
      this.state = kStateHeader;
      this.onPayload(this.payload, 0);
    }
    return position + countBytes;
  }

  /** Offset of a data/hole chunk relative to the request, or -1 (protocol error reported). */
  private relativeOffset(view: Buffer, at: number, lengthBytes: number, what: string): number {
    const slot = this.slot;
    const high = view.readUInt32BE(at);
    const offsetBytes = high * kTwoPow32 + view.readUInt32BE(at + 4);
    const relativeBytes = offsetBytes - (this.table.offsetBytes[slot] as number);
    const requestBytes = this.table.lengthBytes[slot] as number;
    if (high >= 0x20_0000 || relativeBytes < 0 || relativeBytes + lengthBytes > requestBytes) {
      this.fail(`${what} chunk at ${offsetBytes}+${lengthBytes} outside the request`);
      return -1;
    }
    const coveredBytes = (this.table.coveredBytes[slot] as number) + lengthBytes;
    if (coveredBytes > requestBytes) {
      this.fail(`${what} chunks cover more than the ${requestBytes}-byte request`);
      return -1;
    }
    this.table.coveredBytes[slot] = coveredBytes;
    return relativeBytes;
  }

  private onPayload(view: Buffer, at: number): void {
    const slot = this.slot;
    assert(slot >= 0 && this.table.inUse[slot] === 1, 'payload belongs to a request in flight');
    switch (this.after) {
      case kAfterDataOffset: {
        const dataBytes = this.chunkBytes - 8;
        const relativeBytes = this.relativeOffset(view, at, dataBytes, 'OFFSET_DATA');
        if (relativeBytes < 0) return;
        this.simpleData = false;
        this.dataTargetBytes = relativeBytes;
        this.dataRemainingBytes = dataBytes;
        this.state = kStateData;
        return;
      }
      case kAfterHole: {
        const holeBytes = view.readUInt32BE(at + 8);
        if (holeBytes === 0) return this.fail('OFFSET_HOLE chunk of length 0');
        const relativeBytes = this.relativeOffset(view, at, holeBytes, 'OFFSET_HOLE');
        if (relativeBytes < 0) return;
        const target = this.table.data[slot];
        assert(target !== null && target !== undefined, 'READ has a destination');
        target.fill(0, relativeBytes, relativeBytes + holeBytes);
        return this.chunkEnd();
      }
      case kAfterBlockStatus:
        this.events.onBlockStatus(slot, view, at, at + this.payloadNeedBytes);
        return this.chunkEnd();
      default:
        return this.onErrorPayload(view, at);
    }
  }

  private onErrorPayload(view: Buffer, at: number): void {
    const slot = this.slot;
    const payloadBytes = this.payloadNeedBytes;
    const rawErrno = view.readUInt32BE(at);
    const messageBytes = view.readUInt16BE(at + 4);
    const tailBytes = this.chunkType === kReplyTypeErrorOffset ? 8 : 0;
    if (6 + messageBytes + tailBytes > payloadBytes) {
      const fits = `does not fit its ${payloadBytes}-byte payload`;
      return this.fail(`error chunk message of ${messageBytes} bytes ${fits}`);
    }
    const errno = normalizeErrno(rawErrno);
    if (this.table.errno[slot] === 0) this.table.errno[slot] = errno;
    this.events.onChunkError(slot, errno, view.toString('utf8', at + 6, at + 6 + messageBytes));
    this.chunkEnd();
  }

  private takeData(buffer: Buffer, position: number, end: number): number {
    const slot = this.slot;
    const target = this.table.data[slot];
    assert(target !== null && target !== undefined, 'READ has a destination');
    const countBytes = Math.min(this.dataRemainingBytes, end - position);
    copyBytes(target, this.dataTargetBytes, buffer, position, position + countBytes);
    this.dataTargetBytes += countBytes;
    this.dataRemainingBytes -= countBytes;
    this.dataBytesCopied += countBytes;
    if (this.dataRemainingBytes === 0) this.dataEnd();
    return position + countBytes;
  }

  private dataEnd(): void {
    this.state = kStateHeader;
    if (this.simpleData) this.finish(this.slot, 0);
    else this.chunkEnd();
  }

  private chunkEnd(): void {
    this.state = kStateHeader;
    if ((this.chunkFlags & kReplyFlagDone) === 0) return;
    const slot = this.slot;
    const errno = this.table.errno[slot] as number;
    if (errno === 0 && this.table.command[slot] === kCmdRead) {
      const coveredBytes = this.table.coveredBytes[slot] as number;
      const requestBytes = this.table.lengthBytes[slot] as number;
      if (coveredBytes !== requestBytes) {
        return this.fail(`READ reply covered ${coveredBytes} of ${requestBytes} bytes`);
      }
    }
    this.finish(slot, errno);
  }

  private finish(slot: number, errno: number): void {
    this.state = kStateHeader;
    this.slot = -1;
    this.lastReplyDirect = this.replyDirect;
    this.replyDirect = false;
    this.events.onReplyDone(slot, errno);
  }
}
