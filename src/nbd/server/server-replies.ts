/**
 * NBD server, the reply path of one connection: simple replies, structured chunks (READ data,
 * errors, BLOCK_STATUS), written into an output arena and sent once per event-loop turn.
 *
 * Thread: main thread (session master).
 *
 * Design notes
 * Headers and small READ payloads (up to kInlineReadBytesMax) are appended to the output
 * arena (copyBytes: the slot -> arena copy of a payload behind a 28-byte structured header is
 * not 8-byte congruent every other reply, and V8 copies such pairs out of shared memory byte by
 * byte); large READ payloads are written as their own buffers (the record goes to state
 * writing until the socket has written it). The socket is corked on the first reply of an
 * event-loop turn and uncorked once in setImmediate, so a turn's replies leave in one writev.
 * The arena is reset only when the socket has nothing pending (writableLength 0), so no
 * pending write ever sees its bytes overwritten; when it must grow while bytes are pending, a
 * new arena is made and the old one is left to the writes that hold it.
 *
 * Invariants:
 * - Bytes handed to the socket are never written again (reset only when writableLength is 0).
 * - After `stop()` nothing more is flushed (the connection is closed).
 */
import type { Socket } from 'node:net';
import { copyBytes } from '../../core/copy-bytes.js';
import * as p from '../protocol.js';
import { RecordState, kTwoPow32, type RequestRecord } from './server-records.js';

const kOutputArenaBytes = 256 * 1024;
/** READ payloads up to this size are copied into the output arena; larger ones are sent as is. */
const kInlineReadBytesMax = 16 * 1024;

export class ReplyWriter {
  private out = Buffer.allocUnsafeSlow(kOutputArenaBytes);
  private outStart = 0;
  private outUsed = 0;
  private scheduled = false;
  private stopped = false;
  private readonly flushBound = (): void => this.flush();

  /** The client's socket; the connection replaces it after STARTTLS. */
  constructor(public socket: Socket) {}

  /** A flush is scheduled for this turn (replies may still sit corked). */
  get flushScheduled(): boolean {
    return this.scheduled;
  }

  /** The connection closed: a scheduled flush writes nothing. */
  stop(): void {
    this.stopped = true;
  }

  /** Corks the socket on the first reply of a turn and schedules the turn's one flush. */
  beginBatch(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    if (this.outStart === this.outUsed && this.socket.writableLength === 0) {
      this.outStart = 0;
      this.outUsed = 0;
    }
    this.socket.cork();
    setImmediate(this.flushBound);
  }

  simple(record: RequestRecord, errno: number): void {
    const at = this.reserve(p.kSimpleReplyHeaderBytes);
    const out = this.out;
    out.writeUInt32BE(p.kSimpleReplyMagic, at);
    out.writeUInt32BE(errno, at + 4);
    this.writeCookie(at + 8, record);
  }

  /**
   * A READ's reply (starts the turn's batch). True when the record may be released now; false when
   * its payload was handed to the socket (state writing; `record.onWritten` follows).
   */
  read(record: RequestRecord, errno: number, structured: boolean): boolean {
    this.beginBatch();
    const length = record.lengthBytes;
    if (errno !== 0 || length === 0 || record.data === null) {
      if (!structured) this.simple(record, errno);
      else if (errno === 0) this.chunkHeader(record, p.kReplyFlagDone, p.kReplyTypeNone, 0, 0);
      else {
        const body = this.chunkHeader(record, p.kReplyFlagDone, p.kReplyTypeError, 6, 6);
        this.out.writeUInt32BE(errno, body);
        this.out.writeUInt16BE(0, body + 4);
      }
      return true;
    }
    if (structured) {
      const at = this.chunkHeader(record, p.kReplyFlagDone, p.kReplyTypeOffsetData, 8 + length, 8);
      this.out.writeUInt32BE(Math.floor(record.offsetBytes / kTwoPow32), at);
      this.out.writeUInt32BE(record.offsetBytes >>> 0, at + 4);
    } else {
      this.simple(record, 0);
    }
    if (length <= kInlineReadBytesMax) {
      const at = this.reserve(length);
      copyBytes(this.out, at, record.data, 0, length);
      return true;
    }
    this.flushSegment();
    record.state = RecordState.Writing;
    this.socket.write(record.data, record.onWritten);
    return false;
  }

  /** One BLOCK_STATUS chunk (starts the turn's batch): `count` extents of `lengths`/`flags`. */
  blockStatus(record: RequestRecord, contextId: number, lengths: number[], flags: number[], count: number, done = true): void {
    this.beginBatch();
    const at = this.chunkHeader(record, done ? p.kReplyFlagDone : 0, p.kReplyTypeBlockStatus, 4 + 8 * count, 4 + 8 * count);
    this.out.writeUInt32BE(contextId, at);
    for (let index = 0; index < count; index += 1) {
      this.out.writeUInt32BE(lengths[index] ?? 0, at + 4 + 8 * index);
      this.out.writeUInt32BE(flags[index] ?? 0, at + 8 + 8 * index);
    }
  }

  private reserve(bytes: number): number {
    if (this.outUsed + bytes > this.out.length) {
      this.flushSegment();
      if (this.socket.writableLength === 0 && !this.scheduled) {
        this.outStart = 0;
        this.outUsed = 0;
      } else {
        this.out = Buffer.allocUnsafeSlow(Math.max(kOutputArenaBytes, bytes));
        this.outStart = 0;
        this.outUsed = 0;
      }
    }
    const at = this.outUsed;
    this.outUsed += bytes;
    return at;
  }

  private flushSegment(): void {
    if (this.outUsed > this.outStart) {
      this.socket.write(this.out.subarray(this.outStart, this.outUsed));
      this.outStart = this.outUsed;
    }
  }

  private flush(): void {
    this.scheduled = false;
    if (this.stopped) return;
    this.flushSegment();
    this.socket.uncork();
  }

  private writeCookie(at: number, record: RequestRecord): void {
    this.out.writeUInt32BE(record.cookieHigh, at);
    this.out.writeUInt32BE(record.cookieLow, at + 4);
  }

  /** Reserves a chunk header plus `bodyBytes` of body; returns where the body starts. */
  private chunkHeader(record: RequestRecord, flags: number, type: number, lengthBytes: number, bodyBytes: number): number {
    const at = this.reserve(p.kStructuredReplyHeaderBytes + bodyBytes);
    const out = this.out;
    out.writeUInt32BE(p.kStructuredReplyMagic, at);
    out.writeUInt16BE(flags, at + 4);
    out.writeUInt16BE(type, at + 6);
    this.writeCookie(at + 8, record);
    out.writeUInt32BE(lengthBytes, at + 16);
    return at + p.kStructuredReplyHeaderBytes;
  }
}
