/**
 * Raw-socket NBD probe for negative tests: speaks the wire format byte by byte so a test can
 * send what no well-behaved client would (unknown options, bad flags, truncated data, bad
 * magics) and read exactly what the server answered. Test-only; correctness over speed (uses
 * BigInt and allocates freely).
 *
 * Threads: test process main thread.
 *
 * Invariants:
 * - Received bytes are kept in order in one pending buffer; `readExact` consumes from its head.
 * - Every wait is bounded (timeoutMs); a wait never hangs a test when the server misbehaves.
 * - Once the peer closed (or the socket errored), `closed` is true and pending reads that cannot
 *   be satisfied reject with ProbeClosedError.
 */
import { connect, type Socket } from 'node:net';
import {
  kIHaveOptHigh,
  kIHaveOptLow,
  kInfoExport,
  kNbdMagicHigh,
  kNbdMagicLow,
  kOptGo,
  kOptSetMetaContext,
  kOptStructuredReply,
  kOptionReplyMagicHigh,
  kOptionReplyMagicLow,
  kRepAck,
  kRepInfo,
  kRequestMagic,
  kSimpleReplyMagic,
  kStructuredReplyMagic,
  kReplyTypeError,
  kReplyTypeErrorOffset,
} from '../../src/nbd/protocol.js';

export const kProbeTimeoutMs = 10_000;

export class ProbeClosedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProbeClosedError';
  }
}

export class ProbeTimeoutError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProbeTimeoutError';
  }
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export interface Reply {
  /** true for a structured chunk, false for a simple reply. */
  structured: boolean;
  cookie: bigint;
  /** Simple replies: the error field. Structured: the error of an error chunk, else 0. */
  errno: number;
  /** Structured only: reply flags (DONE = 1) and chunk type. */
  flags: number;
  type: number;
  /** Structured chunk payload, or for a simple successful READ the data (when readLength given). */
  payload: Buffer;
}

export interface RequestFields {
  flags?: number;
  type: number;
  cookie?: bigint;
  offset?: bigint | number;
  length: number;
  payload?: Buffer;
  magic?: number;
}

export interface NegotiateOptions {
  exportName?: string;
  structured?: boolean;
  metaContexts?: string[];
}

export interface Negotiated {
  sizeBytes: bigint;
  transmissionFlags: number;
  /** meta context name -> id chosen by the server */
  contexts: Map<string, number>;
}

type Target = { path: string } | { host: string; port: number };

export class NbdProbe {
  private pending: Buffer = Buffer.alloc(0);
  private waiter: (() => void) | null = null;
  private closedFlag = false;
  private readonly closedPromise: Promise<void>;

  private constructor(private readonly socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.pending = this.pending.length === 0 ? chunk : Buffer.concat([this.pending, chunk]);
      this.wake();
    });
    // Writes after the peer closed raise EPIPE/ECONNRESET; they only mean "closed" here.
    socket.on('error', () => undefined);
    this.closedPromise = new Promise((resolveClosed) => {
      socket.once('close', () => {
        this.closedFlag = true;
        this.wake();
        resolveClosed();
      });
    });
  }

  static async connect(target: Target): Promise<NbdProbe> {
    return await new Promise((resolveProbe, reject) => {
      const socket = 'path' in target ? connect(target.path) : connect(target.port, target.host);
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.removeListener('error', reject);
        socket.setNoDelay(true);
        resolveProbe(new NbdProbe(socket));
      });
    });
  }

  get closed(): boolean {
    return this.closedFlag;
  }

  /** Bytes received and not yet consumed. */
  get bufferedBytes(): number {
    return this.pending.length;
  }

  private wake(): void {
    const waiter = this.waiter;
    this.waiter = null;
    if (waiter !== null) waiter();
  }

  write(bytes: Buffer | Uint8Array): void {
    if (!this.socket.destroyed) this.socket.write(bytes);
  }

  /** Half-close: tell the server we send nothing more. */
  end(): void {
    this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }

  async readExact(lengthBytes: number, timeoutMs = kProbeTimeoutMs): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.pending.length < lengthBytes) {
      if (this.closedFlag) {
        throw new ProbeClosedError(`connection closed with ${this.pending.length}/${lengthBytes} bytes pending`);
      }
      const leftMs = deadline - Date.now();
      if (leftMs <= 0) throw new ProbeTimeoutError(`no ${lengthBytes} bytes within ${timeoutMs} ms`);
      await new Promise<void>((resolveWait) => {
        const timer = setTimeout(resolveWait, leftMs);
        this.waiter = () => {
          clearTimeout(timer);
          resolveWait();
        };
      });
    }
    const head = this.pending.subarray(0, lengthBytes);
    this.pending = this.pending.subarray(lengthBytes);
    return Buffer.from(head);
  }

  /**
   * Resolves true once the server closed the connection (any bytes it sent first are kept),
   * false if it is still open after timeoutMs.
   */
  async waitClosed(timeoutMs = kProbeTimeoutMs): Promise<boolean> {
    if (this.closedFlag) return true;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<boolean>((resolveTimeout) => {
      timer = setTimeout(() => resolveTimeout(false), timeoutMs);
    });
    const result = await Promise.race([this.closedPromise.then(() => true), timedOut]);
    clearTimeout(timer);
    return result;
  }

  // ---- handshake ----

  /** Reads the newstyle greeting; returns the handshake flags. */
  async readGreeting(): Promise<number> {
    const greeting = await this.readExact(18);
    if (greeting.readUInt32BE(0) !== kNbdMagicHigh || greeting.readUInt32BE(4) !== kNbdMagicLow) {
      throw new Error(`bad NBDMAGIC: ${greeting.toString('hex')}`);
    }
    if (greeting.readUInt32BE(8) !== kIHaveOptHigh || greeting.readUInt32BE(12) !== kIHaveOptLow) {
      throw new Error(`not a newstyle greeting: ${greeting.toString('hex')}`);
    }
    return greeting.readUInt16BE(16);
  }

  sendClientFlags(flags: number): void {
    const bytes = Buffer.alloc(4);
    bytes.writeUInt32BE(flags >>> 0, 0);
    this.write(bytes);
  }

  /** Greeting + client flags (FIXED_NEWSTYLE | NO_ZEROES by default). */
  async handshake(clientFlags = 0x3): Promise<number> {
    const handshakeFlags = await this.readGreeting();
    this.sendClientFlags(clientFlags);
    return handshakeFlags;
  }

  /** Option header with a declared length that may differ from data.length (for lies). */
  sendOption(option: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): void {
    const header = Buffer.alloc(16);
    header.writeUInt32BE(kIHaveOptHigh, 0);
    header.writeUInt32BE(kIHaveOptLow, 4);
    header.writeUInt32BE(option >>> 0, 8);
    header.writeUInt32BE(declaredLength >>> 0, 12);
    this.write(Buffer.concat([header, data]));
  }

  async readOptionReply(timeoutMs = kProbeTimeoutMs): Promise<OptionReply> {
    const header = await this.readExact(20, timeoutMs);
    if (header.readUInt32BE(0) !== kOptionReplyMagicHigh || header.readUInt32BE(4) !== kOptionReplyMagicLow) {
      throw new Error(`bad option reply magic: ${header.toString('hex')}`);
    }
    const lengthBytes = header.readUInt32BE(16);
    const data = await this.readExact(lengthBytes, timeoutMs);
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data };
  }

  /** Reads option replies until a non-intermediate one (ACK or error). */
  async readOptionReplies(timeoutMs = kProbeTimeoutMs): Promise<OptionReply[]> {
    const replies: OptionReply[] = [];
    for (let count = 0; count < 1000; count++) {
      const reply = await this.readOptionReply(timeoutMs);
      replies.push(reply);
      if (reply.type === kRepAck || (reply.type & 0x80000000) !== 0) return replies;
    }
    throw new Error('more than 1000 option replies');
  }

  /** INFO/GO data: name length, name, info request count, info types. */
  static infoData(exportName: string, infoTypes: number[] = []): Buffer {
    const name = Buffer.from(exportName, 'utf8');
    const data = Buffer.alloc(4 + name.length + 2 + 2 * infoTypes.length);
    data.writeUInt32BE(name.length, 0);
    name.copy(data, 4);
    data.writeUInt16BE(infoTypes.length, 4 + name.length);
    infoTypes.forEach((type, index) => data.writeUInt16BE(type, 6 + name.length + 2 * index));
    return data;
  }

  /** LIST/SET_META_CONTEXT data: name length, name, query count, queries. */
  static metaContextData(exportName: string, queries: string[]): Buffer {
    const parts: Buffer[] = [];
    const name = Buffer.from(exportName, 'utf8');
    const head = Buffer.alloc(4);
    head.writeUInt32BE(name.length, 0);
    parts.push(head, name);
    const count = Buffer.alloc(4);
    count.writeUInt32BE(queries.length, 0);
    parts.push(count);
    for (const query of queries) {
      const bytes = Buffer.from(query, 'utf8');
      const length = Buffer.alloc(4);
      length.writeUInt32BE(bytes.length, 0);
      parts.push(length, bytes);
    }
    return Buffer.concat(parts);
  }

  /** Full fixed-newstyle negotiation through GO; throws on any unexpected reply. */
  async negotiate(options: NegotiateOptions = {}): Promise<Negotiated> {
    const exportName = options.exportName ?? '';
    await this.handshake(0x3);
    const contexts = new Map<string, number>();
    if (options.structured ?? true) {
      this.sendOption(kOptStructuredReply);
      const [ack] = await this.readOptionReplies();
      if (ack?.type !== kRepAck) throw new Error(`STRUCTURED_REPLY refused: ${ack?.type.toString(16)}`);
      const queries = options.metaContexts ?? [];
      if (queries.length > 0) {
        this.sendOption(kOptSetMetaContext, NbdProbe.metaContextData(exportName, queries));
        for (const reply of await this.readOptionReplies()) {
          if (reply.type === kRepAck) break;
          if (reply.type !== 4) throw new Error(`SET_META_CONTEXT failed: ${reply.type.toString(16)}`);
          contexts.set(reply.data.subarray(4).toString('utf8'), reply.data.readUInt32BE(0));
        }
      }
    }
    this.sendOption(kOptGo, NbdProbe.infoData(exportName));
    let sizeBytes = -1n;
    let transmissionFlags = -1;
    for (const reply of await this.readOptionReplies()) {
      if (reply.type === kRepInfo && reply.data.readUInt16BE(0) === kInfoExport) {
        sizeBytes = reply.data.readBigUInt64BE(2);
        transmissionFlags = reply.data.readUInt16BE(10);
      } else if (reply.type !== kRepAck && reply.type !== kRepInfo) {
        throw new Error(`GO failed: 0x${reply.type.toString(16)} ${reply.data.toString()}`);
      }
    }
    if (sizeBytes < 0n) throw new Error('GO: no NBD_INFO_EXPORT before ACK');
    return { sizeBytes, transmissionFlags, contexts };
  }

  // ---- transmission ----

  static request(fields: RequestFields): Buffer {
    const header = Buffer.alloc(28);
    header.writeUInt32BE((fields.magic ?? kRequestMagic) >>> 0, 0);
    header.writeUInt16BE(fields.flags ?? 0, 4);
    header.writeUInt16BE(fields.type, 6);
    header.writeBigUInt64BE(fields.cookie ?? 1n, 8);
    header.writeBigUInt64BE(BigInt(fields.offset ?? 0), 16);
    header.writeUInt32BE(fields.length >>> 0, 24);
    return fields.payload === undefined ? header : Buffer.concat([header, fields.payload]);
  }

  sendRequest(fields: RequestFields): void {
    this.write(NbdProbe.request(fields));
  }

  /**
   * Reads one reply: a simple reply (with `readLength` data bytes when it is a successful
   * READ reply) or one structured chunk.
   */
  async readReply(readLength = 0, timeoutMs = kProbeTimeoutMs): Promise<Reply> {
    const magicBytes = await this.readExact(4, timeoutMs);
    const magic = magicBytes.readUInt32BE(0);
    if (magic === kSimpleReplyMagic) {
      const rest = await this.readExact(12, timeoutMs);
      const errno = rest.readUInt32BE(0);
      const cookie = rest.readBigUInt64BE(4);
      const payload = errno === 0 && readLength > 0 ? await this.readExact(readLength, timeoutMs) : Buffer.alloc(0);
      return { structured: false, cookie, errno, flags: 0, type: 0, payload };
    }
    if (magic === kStructuredReplyMagic) {
      const rest = await this.readExact(16, timeoutMs);
      const flags = rest.readUInt16BE(0);
      const type = rest.readUInt16BE(2);
      const cookie = rest.readBigUInt64BE(4);
      const payload = await this.readExact(rest.readUInt32BE(12), timeoutMs);
      const isError = type === kReplyTypeError || type === kReplyTypeErrorOffset;
      const errno = isError ? payload.readUInt32BE(0) : 0;
      return { structured: true, cookie, errno, flags, type, payload };
    }
    throw new Error(`bad reply magic 0x${magic.toString(16)}`);
  }

  /** Reads structured chunks until one has the DONE flag (or a simple reply arrives). */
  async readReplyChunks(readLength = 0, timeoutMs = kProbeTimeoutMs): Promise<Reply[]> {
    const chunks: Reply[] = [];
    for (let count = 0; count < 100_000; count++) {
      const chunk = await this.readReply(readLength, timeoutMs);
      chunks.push(chunk);
      if (!chunk.structured || (chunk.flags & 0x1) !== 0) return chunks;
    }
    throw new Error('reply never finished (no DONE chunk)');
  }
}

/** Reassembles the data of a structured READ (OFFSET_DATA / OFFSET_HOLE chunks) at `offset`. */
export function assembleRead(chunks: Reply[], offset: bigint, lengthBytes: number): Buffer {
  const out = Buffer.alloc(lengthBytes);
  for (const chunk of chunks) {
    if (!chunk.structured) return chunk.payload;
    if (chunk.type === 1) {
      const at = Number(chunk.payload.readBigUInt64BE(0) - offset);
      chunk.payload.subarray(8).copy(out, at);
    } else if (chunk.type === 2) {
      const at = Number(chunk.payload.readBigUInt64BE(0) - offset);
      out.fill(0, at, at + chunk.payload.readUInt32BE(8));
    }
  }
  return out;
}
