/**
 * NBD server, handshake phase: the fixed-newstyle greeting and option negotiation as a pure
 * state machine. Bytes in (`feed`), bytes out (`send` callback), a verdict when negotiation
 * ends (`onTransmission` or `onClose`). No sockets here, so the fuzz tests can drive it too.
 *
 * Thread: main thread (the session master). Not a hot path: option data is buffered and parsed
 * with ordinary allocations.
 *
 * Design notes
 * | state            | waiting for                          | next                          |
 * |------------------|--------------------------------------|-------------------------------|
 * | clientFlags      | 4 bytes of client flags              | options (or closed)           |
 * | options          | 16-byte option header + data         | options, tls, transmission,   |
 * |                  |                                      | closed                        |
 * | tls              | the TLS handshake (socket's business) | options (tlsEstablished)     |
 * | done             | nothing (handed off or closed)       | -                             |
 *
 * TLS (mode on/require): STARTTLS is acknowledged, then `onStartTls` upgrades the socket; bytes
 * already received after STARTTLS (before the server's ACK could be seen) are a protocol
 * violation and close the connection. After the handshake every earlier negotiated state
 * (structured replies, meta contexts) is forgotten and option haggling restarts. With
 * `require`, every option but STARTTLS and ABORT gets ERR_TLS_REQD until TLS is up (and
 * EXPORT_NAME, which has no error reply, closes), so no export information leaks.
 *
 * Invariants:
 * - Every option gets exactly one final reply (ACK or an error) unless it ends negotiation
 *   (EXPORT_NAME, GO success, ABORT) or the connection is closed for a protocol violation.
 * - Unknown options get ERR_UNSUP and parsing continues after their data (baseline MUST).
 * - Option data above kOptionBytesMax is treated as a denial of service: hard disconnect.
 * - Bytes that follow the option that ends negotiation are handed to the transmission phase.
 */
import { assert } from '../../core/assert.js';
import * as p from '../protocol.js';
import { optionName } from '../protocol-names.js';
import { kExtraContextIdFirst, matchMetaContexts, type MetaContextSource } from './meta-contexts.js';

/** What the server exports; encodings are precomputed once per export. */
export interface ExportDescriptor {
  /** Canonical name; the default export "" also reaches it. */
  name: string;
  description: string;
  sizeBytes: number;
  transmissionFlags: number;
  minimumBlockBytes: number;
  preferredBlockBytes: number;
  maximumPayloadBytes: number;
}

export interface NegotiatedState {
  exportDescriptor: ExportDescriptor;
  structuredReplies: boolean;
  /** Context id of base:allocation when selected for this export, else 0. */
  baseAllocationId: number;
  /** Other selected contexts (meta-contexts.ts), each with its id, in selection order. */
  extraContexts: Array<{ id: number; name: string }>;
  noZeroes: boolean;
}

export interface OptionHandlers {
  send(bytes: Buffer): void;
  /** Negotiation finished; `rest` holds bytes already received after it. */
  onTransmission(state: NegotiatedState, rest: Buffer): void;
  /** The connection must be closed; `reason` is logged (null for a clean ABORT). */
  onClose(reason: string | null): void;
  /** STARTTLS was acknowledged: upgrade the socket, then call `tlsEstablished()`. */
  onStartTls?(): void;
}

/** TLS offered by the server: off (STARTTLS unsupported), on (optional), require (forced). */
export type NegotiatorTlsMode = 'off' | 'on' | 'require';

export const kOptionBytesMax = 64 * 1024;
export const kBaseAllocationContextId = 1;

const kHandshakeFlags = p.kFlagFixedNewstyle | p.kFlagNoZeroes;
const kKnownClientFlags = p.kClientFlagFixedNewstyle | p.kClientFlagNoZeroes;

export function encodeGreeting(): Buffer {
  const greeting = Buffer.alloc(p.kGreetingBytes);
  greeting.writeUInt32BE(p.kNbdMagicHigh, 0);
  greeting.writeUInt32BE(p.kNbdMagicLow, 4);
  greeting.writeUInt32BE(p.kIHaveOptHigh, 8);
  greeting.writeUInt32BE(p.kIHaveOptLow, 12);
  greeting.writeUInt16BE(kHandshakeFlags, 16);
  return greeting;
}

function optionReply(option: number, replyType: number, data: Buffer | null): Buffer {
  const dataBytes = data === null ? 0 : data.length;
  const reply = Buffer.allocUnsafe(p.kOptionReplyHeaderBytes + dataBytes);
  reply.writeUInt32BE(p.kOptionReplyMagicHigh, 0);
  reply.writeUInt32BE(p.kOptionReplyMagicLow, 4);
  reply.writeUInt32BE(option, 8);
  reply.writeUInt32BE(replyType, 12);
  reply.writeUInt32BE(dataBytes, 16);
  if (data !== null) data.copy(reply, p.kOptionReplyHeaderBytes);
  return reply;
}

function u64(value: number): Buffer {
  const bytes = Buffer.allocUnsafe(8);
  bytes.writeUInt32BE(Math.floor(value / 0x1_0000_0000), 0);
  bytes.writeUInt32BE(value >>> 0, 4);
  return bytes;
}

type ParsedNameRequest = { name: string; infoTypes: number[] } | { error: string };

/** INFO/GO data: name length u32, name, count u16, count x u16. */
function parseInfoRequest(data: Buffer): ParsedNameRequest {
  if (data.length < 6) return { error: 'option data shorter than 6 bytes' };
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > data.length - 6) return { error: 'export name length runs past the option data' };
  if (nameBytes > p.kStringBytesMax) return { error: 'export name longer than 4096 bytes' };
  const name = data.toString('utf8', 4, 4 + nameBytes);
  const count = data.readUInt16BE(4 + nameBytes);
  if (data.length !== 6 + nameBytes + 2 * count) {
    return { error: `information request count ${count} does not match the option length` };
  }
  const infoTypes: number[] = [];
  for (let index = 0; index < count; index += 1) {
    infoTypes.push(data.readUInt16BE(6 + nameBytes + 2 * index));
  }
  return { name, infoTypes };
}

type ParsedMetaRequest = { name: string; queries: string[] } | { error: string };

/** *_META_CONTEXT data: name length u32, name, query count u32, (length u32, query) x count. */
function parseMetaRequest(data: Buffer): ParsedMetaRequest {
  if (data.length < 8) return { error: 'option data shorter than 8 bytes' };
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > data.length - 8 || nameBytes > p.kStringBytesMax) {
    return { error: 'export name length runs past the option data' };
  }
  const name = data.toString('utf8', 4, 4 + nameBytes);
  const count = data.readUInt32BE(4 + nameBytes);
  let position = 8 + nameBytes;
  const queries: string[] = [];
  for (let index = 0; index < count; index += 1) {
    if (position + 4 > data.length) return { error: 'query count runs past the option data' };
    const queryBytes = data.readUInt32BE(position);
    position += 4;
    if (queryBytes > data.length - position || queryBytes > p.kStringBytesMax) {
      return { error: 'query length runs past the option data' };
    }
    queries.push(data.toString('utf8', position, position + queryBytes));
    position += queryBytes;
  }
  if (position !== data.length) return { error: 'trailing bytes after the last query' };
  return { name, queries };
}

export class OptionNegotiator {
  private buffered: Buffer = Buffer.alloc(0);
  private stage: 'clientFlags' | 'options' | 'tls' | 'done' = 'clientFlags';
  private tlsActive = false;
  private fixedNewstyle = false;
  private noZeroes = false;
  private structuredReplies = false;
  /** Export name the current meta context selection was made for, or null when none. */
  private metaExportName: string | null = null;
  private metaSelected = false;
  /** Contexts other than base:allocation selected by the last SET_META_CONTEXT. */
  private extraSelected: string[] = [];
  private shuttingDown = false;

  constructor(
    private readonly exportDescriptor: ExportDescriptor,
    private readonly handlers: OptionHandlers,
    private readonly tlsMode: NegotiatorTlsMode = 'off',
    private readonly metaContexts: MetaContextSource | null = null,
  ) {
    assert(tlsMode === 'off' || handlers.onStartTls !== undefined, 'TLS needs an onStartTls handler');
    assert(exportDescriptor.sizeBytes >= 0, 'export size must be non-negative');
    assert((exportDescriptor.transmissionFlags & p.kTxFlagHasFlags) !== 0, 'HAS_FLAGS must be set');
  }

  get finished(): boolean {
    return this.stage === 'done';
  }

  /** Answer later options with ERR_SHUTDOWN (server is stopping). */
  beginShutdown(): void {
    this.shuttingDown = true;
  }

  /** True once STARTTLS succeeded on this connection. */
  get tls(): boolean {
    return this.tlsActive;
  }

  /** The TLS handshake after STARTTLS finished: forget earlier state, haggle again. */
  tlsEstablished(): void {
    assert(this.stage === 'tls', 'tlsEstablished outside the TLS stage');
    this.tlsActive = true;
    this.structuredReplies = false;
    this.metaExportName = null;
    this.metaSelected = false;
    this.extraSelected = [];
    this.buffered = Buffer.alloc(0);
    this.stage = 'options';
  }

  feed(chunk: Buffer): void {
    if (this.stage === 'done') return;
    if (this.stage === 'tls') {
      this.finish('client sent data after STARTTLS before the TLS handshake');
      return;
    }
    this.buffered = this.buffered.length === 0 ? chunk : Buffer.concat([this.buffered, chunk]);
    while (this.parsing() && this.step()) {
      // each step consumes one complete unit (client flags or one option)
    }
  }

  private parsing(): boolean {
    return this.stage === 'clientFlags' || this.stage === 'options';
  }

  /** Parses one unit if complete; returns false when more bytes are needed. */
  private step(): boolean {
    if (this.stage === 'clientFlags') {
      if (this.buffered.length < 4) return false;
      const clientFlags = this.buffered.readUInt32BE(0);
      this.buffered = this.buffered.subarray(4);
      if ((clientFlags & ~kKnownClientFlags) !== 0) {
        this.finish(`client sent unknown handshake flags 0x${clientFlags.toString(16)}`);
        return false;
      }
      this.fixedNewstyle = (clientFlags & p.kClientFlagFixedNewstyle) !== 0;
      this.noZeroes = (clientFlags & p.kClientFlagNoZeroes) !== 0;
      this.stage = 'options';
      return true;
    }
    if (this.buffered.length < p.kOptionHeaderBytes) return false;
    const magicHigh = this.buffered.readUInt32BE(0);
    const magicLow = this.buffered.readUInt32BE(4);
    if (magicHigh !== p.kIHaveOptHigh || magicLow !== p.kIHaveOptLow) {
      this.finish('bad option magic (expected IHAVEOPT)');
      return false;
    }
    const option = this.buffered.readUInt32BE(8);
    const dataBytes = this.buffered.readUInt32BE(12);
    if (dataBytes > kOptionBytesMax) {
      this.finish(`${optionName(option)} carries ${dataBytes} bytes of data (limit ${kOptionBytesMax})`);
      return false;
    }
    if (this.buffered.length < p.kOptionHeaderBytes + dataBytes) return false;
    const data = this.buffered.subarray(p.kOptionHeaderBytes, p.kOptionHeaderBytes + dataBytes);
    this.buffered = this.buffered.subarray(p.kOptionHeaderBytes + dataBytes);
    this.handleOption(option, data);
    return true;
  }

  private finish(reason: string | null): void {
    this.stage = 'done';
    this.buffered = Buffer.alloc(0);
    this.handlers.onClose(reason);
  }

  private reply(option: number, replyType: number, data: Buffer | null = null): void {
    this.handlers.send(optionReply(option, replyType, data));
  }

  private replyError(option: number, replyType: number, message: string): void {
    this.reply(option, replyType, Buffer.from(message, 'utf8'));
  }

  private knowsExport(name: string): boolean {
    return name === '' || name === this.exportDescriptor.name;
  }

  private handleOption(option: number, data: Buffer): void {
    if (this.shuttingDown && option !== p.kOptAbort) {
      this.replyError(option, p.kRepErrShutdown, 'server is shutting down');
      return;
    }
    if (this.tlsMode === 'require' && !this.tlsActive && option !== p.kOptStartTls && option !== p.kOptAbort) {
      if (option === p.kOptExportName) {
        this.finish('EXPORT_NAME before STARTTLS, and the server requires TLS');
        return;
      }
      this.replyError(option, p.kRepErrTlsReqd, 'this server requires TLS: send NBD_OPT_STARTTLS first');
      return;
    }
    switch (option) {
      case p.kOptExportName:
        this.handleExportName(data);
        return;
      case p.kOptAbort:
        this.reply(option, p.kRepAck);
        this.finish(null);
        return;
      case p.kOptList:
        this.handleList(data);
        return;
      case p.kOptStartTls:
        this.handleStartTls(data);
        return;
      case p.kOptInfo:
      case p.kOptGo:
        this.handleInfoOrGo(option, data);
        return;
      case p.kOptStructuredReply:
        this.handleStructuredReply(data);
        return;
      case p.kOptListMetaContext:
      case p.kOptSetMetaContext:
        this.handleMetaContext(option, data);
        return;
      default:
        this.replyError(option, p.kRepErrUnsup, `${optionName(option)} is not supported`);
    }
  }

  private handleStartTls(data: Buffer): void {
    if (this.tlsMode === 'off') {
      this.replyError(p.kOptStartTls, p.kRepErrUnsup, 'TLS is not enabled on this server');
      return;
    }
    if (this.tlsActive) {
      this.replyError(p.kOptStartTls, p.kRepErrInvalid, 'TLS is already active');
      return;
    }
    if (data.length !== 0) {
      this.replyError(p.kOptStartTls, p.kRepErrInvalid, 'STARTTLS takes no data');
      return;
    }
    if (this.buffered.length !== 0) {
      // A client must wait for the ACK before its TLS hello: anything here is a violation.
      this.finish('client sent data after STARTTLS before the TLS handshake');
      return;
    }
    this.reply(p.kOptStartTls, p.kRepAck);
    this.stage = 'tls';
    (this.handlers.onStartTls as () => void)();
  }

  private handleExportName(data: Buffer): void {
    const name = data.toString('utf8');
    if (!this.knowsExport(name)) {
      this.finish(`EXPORT_NAME asked for unknown export "${name}"`);
      return;
    }
    const exportInfo = this.exportDescriptor;
    const reply = Buffer.alloc(p.kExportNameReplyBytes + (this.noZeroes ? 0 : p.kExportNamePaddingBytes));
    u64(exportInfo.sizeBytes).copy(reply, 0);
    reply.writeUInt16BE(this.transmissionFlags(), 8);
    this.handlers.send(reply);
    this.enterTransmission(name);
  }

  private handleList(data: Buffer): void {
    if (data.length !== 0) {
      this.replyError(p.kOptList, p.kRepErrInvalid, 'LIST takes no data');
      return;
    }
    const name = Buffer.from(this.exportDescriptor.name, 'utf8');
    const description = Buffer.from(this.exportDescriptor.description, 'utf8');
    const entry = Buffer.allocUnsafe(4 + name.length + description.length);
    entry.writeUInt32BE(name.length, 0);
    name.copy(entry, 4);
    description.copy(entry, 4 + name.length);
    this.reply(p.kOptList, p.kRepServer, entry);
    this.reply(p.kOptList, p.kRepAck);
  }

  private handleStructuredReply(data: Buffer): void {
    if (data.length !== 0) {
      this.replyError(p.kOptStructuredReply, p.kRepErrInvalid, 'STRUCTURED_REPLY takes no data');
      return;
    }
    this.structuredReplies = true;
    this.reply(p.kOptStructuredReply, p.kRepAck);
  }

  /** Transmission flags for this connection: DF only when structured replies were agreed. */
  private transmissionFlags(): number {
    const flags = this.exportDescriptor.transmissionFlags;
    return this.structuredReplies ? flags : flags & ~p.kTxFlagSendDf;
  }

  private handleInfoOrGo(option: number, data: Buffer): void {
    const parsed = parseInfoRequest(data);
    if ('error' in parsed) {
      this.replyError(option, p.kRepErrInvalid, parsed.error);
      return;
    }
    if (!this.knowsExport(parsed.name)) {
      this.replyError(option, p.kRepErrUnknown, `no export named "${parsed.name}"`);
      return;
    }
    const exportInfo = this.exportDescriptor;
    const exportInfoData = Buffer.allocUnsafe(12);
    exportInfoData.writeUInt16BE(p.kInfoExport, 0);
    u64(exportInfo.sizeBytes).copy(exportInfoData, 2);
    exportInfoData.writeUInt16BE(this.transmissionFlags(), 10);
    this.reply(option, p.kRepInfo, exportInfoData);
    const asked = new Set(parsed.infoTypes);
    if (asked.has(p.kInfoName)) this.reply(option, p.kRepInfo, infoString(p.kInfoName, exportInfo.name));
    if (asked.has(p.kInfoDescription)) {
      this.reply(option, p.kRepInfo, infoString(p.kInfoDescription, exportInfo.description));
    }
    const blockSize = Buffer.allocUnsafe(14);
    blockSize.writeUInt16BE(p.kInfoBlockSize, 0);
    blockSize.writeUInt32BE(exportInfo.minimumBlockBytes, 2);
    blockSize.writeUInt32BE(exportInfo.preferredBlockBytes, 6);
    blockSize.writeUInt32BE(exportInfo.maximumPayloadBytes, 10);
    this.reply(option, p.kRepInfo, blockSize);
    this.reply(option, p.kRepAck);
    if (option === p.kOptGo) this.enterTransmission(parsed.name);
  }

  private handleMetaContext(option: number, data: Buffer): void {
    const isSet = option === p.kOptSetMetaContext;
    if (isSet) {
      // SET replaces the selection even when it fails.
      this.metaExportName = null;
      this.metaSelected = false;
      this.extraSelected = [];
    }
    if (isSet && !this.structuredReplies) {
      this.replyError(option, p.kRepErrInvalid, 'SET_META_CONTEXT needs STRUCTURED_REPLY first');
      return;
    }
    const parsed = parseMetaRequest(data);
    if ('error' in parsed) {
      this.replyError(option, p.kRepErrInvalid, parsed.error);
      return;
    }
    if (!this.knowsExport(parsed.name)) {
      this.replyError(option, p.kRepErrUnknown, `no export named "${parsed.name}"`);
      return;
    }
    const matches = parsed.queries.some((query) =>
      query === p.kMetaContextBaseAllocation || (!isSet && query === 'base:'),
    );
    const listAll = !isSet && parsed.queries.length === 0;
    if (matches || listAll) {
      const context = Buffer.from(p.kMetaContextBaseAllocation, 'utf8');
      const replyData = Buffer.allocUnsafe(4 + context.length);
      replyData.writeUInt32BE(isSet ? kBaseAllocationContextId : 0, 0);
      context.copy(replyData, 4);
      this.reply(option, p.kRepMetaContext, replyData);
      if (isSet) {
        this.metaSelected = true;
        this.metaExportName = parsed.name;
      }
    }
    const extra = this.metaContexts === null ? [] : matchMetaContexts(this.metaContexts.names(), parsed.queries, isSet);
    for (const [index, name] of extra.entries()) {
      const context = Buffer.from(name, 'utf8');
      const replyData = Buffer.allocUnsafe(4 + context.length);
      replyData.writeUInt32BE(isSet ? kExtraContextIdFirst + index : 0, 0);
      context.copy(replyData, 4);
      this.reply(option, p.kRepMetaContext, replyData);
    }
    if (isSet && extra.length > 0) {
      this.extraSelected = extra;
      this.metaExportName = parsed.name;
    }
    this.reply(option, p.kRepAck);
  }

  private enterTransmission(exportName: string): void {
    const selected = this.metaSelected && this.metaExportName === exportName;
    const state: NegotiatedState = {
      exportDescriptor: this.exportDescriptor,
      structuredReplies: this.structuredReplies,
      baseAllocationId: selected && this.metaSelected ? kBaseAllocationContextId : 0,
      extraContexts: this.metaExportName === exportName ? this.extraSelected.map((name, index) => ({ id: kExtraContextIdFirst + index, name })) : [],
      noZeroes: this.noZeroes,
    };
    const rest = this.buffered;
    this.buffered = Buffer.alloc(0);
    this.stage = 'done';
    this.handlers.onTransmission(state, rest);
  }

  /** For logging: did the client ask for fixed newstyle. */
  get clientFixedNewstyle(): boolean {
    return this.fixedNewstyle;
  }
}

function infoString(infoType: number, text: string): Buffer {
  const encoded = Buffer.from(text, 'utf8');
  const data = Buffer.allocUnsafe(2 + encoded.length);
  data.writeUInt16BE(infoType, 0);
  encoded.copy(data, 2);
  return data;
}
