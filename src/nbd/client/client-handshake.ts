/**
 * Client side of the NBD fixed-newstyle handshake: option codecs (pure functions over buffers)
 * and `negotiateClient`, the option-phase driver. The driver talks to the server only through
 * a tiny `HandshakeIo` (read exactly n bytes / write bytes), so unit tests script a fake server.
 * Threads: whichever thread owns the connection (the NbdClient's thread).
 *
 * Sequence (each option is sent only after the final reply to the previous one):
 *   S: NBDMAGIC IHAVEOPT flags16        C: client flags32 (only bits the server offered)
 *   C: OPT_STRUCTURED_REPLY             S: ACK | error (any error: carry on with simple replies)
 *   C: OPT_SET_META_CONTEXT base:allocation (only with structured replies)
 *                                       S: META_CONTEXT* ACK | error (no block status)
 *   C: OPT_GO name [EXPORT, NAME, DESCRIPTION, BLOCK_SIZE]
 *                                       S: INFO* ACK -> transmission
 *                                          ERR_UNSUP -> fall back to OPT_EXPORT_NAME
 *                                          ERR_UNKNOWN -> ENBD_ERR_HANDSHAKE (no such export)
 * A server without FIXED_NEWSTYLE gets OPT_EXPORT_NAME only.
 *
 * Invariants:
 * - Every failure is an EnbdError('ENBD_ERR_HANDSHAKE') naming the server and export (or
 *   whatever error `io.read` produced, e.g. a timeout).
 * - 64-bit sizes are read as two u32 halves and must be below 2^53.
 * - Option reply payloads are bounded (kOptionReplyBytesMax) so a hostile server cannot make
 *   the client buffer without limit.
 */
import { EnbdError } from '../../core/errors.js';
import type { Logger } from '../../core/log.js';
import type { BlockSizes } from '../../core/block-device.js';
import { assert, isPowerOfTwo } from '../../core/assert.js';
import {
  kBlockSizeMinimumMax,
  kClientFlagFixedNewstyle,
  kClientFlagNoZeroes,
  kExportNamePaddingBytes,
  kExportNameReplyBytes,
  kFlagFixedNewstyle,
  kFlagNoZeroes,
  kGreetingBytes,
  kIHaveOptHigh,
  kIHaveOptLow,
  kInfoBlockSize,
  kInfoDescription,
  kInfoExport,
  kInfoName,
  kMetaContextBaseAllocation,
  kNbdMagicHigh,
  kNbdMagicLow,
  kOptExportName,
  kOptGo,
  kOptionHeaderBytes,
  kOptionReplyHeaderBytes,
  kOptionReplyMagicHigh,
  kOptionReplyMagicLow,
  kOptSetMetaContext,
  kOptStartTls,
  kOptStructuredReply,
  kRepAck,
  kRepErrorBit,
  kRepErrShutdown,
  kRepErrTlsReqd,
  kRepErrUnknown,
  kRepErrUnsup,
  kRepInfo,
  kRepMetaContext,
  kStringBytesMax,
  kTxFlagHasFlags,
} from '../protocol.js';
import { optionReplyErrorName } from '../protocol-names.js';

/** Largest option reply payload the client accepts (REP_SERVER / INFO strings are <= 4 KiB). */
export const kOptionReplyBytesMax = 64 * 1024;
const kTwoPow32 = 0x1_0000_0000;
// cliserv_magic 0x00420281861253 as u64 halves (what nbdkit -o sends after NBDMAGIC).
const kOldstyleHigh = 0x00004202;
const kOldstyleLow = 0x81861253;

export interface HandshakeIo {
  /** Resolves with exactly `lengthBytes` bytes, or rejects (EOF, timeout, socket error). */
  read(lengthBytes: number): Promise<Buffer>;
  write(data: Uint8Array): void;
  /** After an acknowledged STARTTLS: run the TLS handshake on the connection (nbds:// only). */
  startTls?(): Promise<void>;
}

export interface HandshakeOptions {
  exportName: string;
  structuredReplies: boolean;
  /** Ask for base:allocation (only effective when structured replies are agreed). */
  blockStatus: boolean;
  /** For messages: 'unix:/path' or 'host:port'. */
  serverName: string;
  logger?: Logger | undefined;
  /** nbds://: send NBD_OPT_STARTTLS first and negotiate inside TLS. */
  tls?: boolean;
}

function tlsRequired(serverName: string): EnbdError {
  return handshakeError(`NBD server ${serverName} requires TLS: use an nbds:// or nbds+unix:// URI (with tls-certificates=DIR)`);
}

export interface HandshakeResult {
  sizeBytes: number;
  transmissionFlags: number;
  handshakeFlags: number;
  structuredReplies: boolean;
  /** Context id of base:allocation, or null when not negotiated. */
  baseAllocationContextId: number | null;
  /** From NBD_INFO_BLOCK_SIZE, or null when the server sent none. */
  blockSizes: BlockSizes | null;
  description: string;
  canonicalName: string | null;
  /** True when OPT_GO was unsupported and OPT_EXPORT_NAME was used. */
  usedExportNameFallback: boolean;
}

export interface OptionReplyHeader {
  option: number;
  replyType: number;
  lengthBytes: number;
}

function handshakeError(message: string): EnbdError {
  return new EnbdError('ENBD_ERR_HANDSHAKE', message);
}

/** Read a big-endian u64 that must fit a JS safe integer; null when it does not. */
export function readSafeU64(view: Buffer, offset: number): number | null {
  const high = view.readUInt32BE(offset);
  const low = view.readUInt32BE(offset + 4);
  if (high >= 0x20_0000) return null;
  return high * kTwoPow32 + low;
}

/** Parse the 18-byte server greeting; returns the handshake flags. */
export function parseGreeting(view: Buffer, serverName: string): number {
  assert(view.length === kGreetingBytes, 'greeting view must be 18 bytes');
  if (view.readUInt32BE(0) !== kNbdMagicHigh || view.readUInt32BE(4) !== kNbdMagicLow) {
    throw handshakeError(`${serverName} is not an NBD server (bad NBDMAGIC)`);
  }
  const high = view.readUInt32BE(8);
  const low = view.readUInt32BE(12);
  if (high === kOldstyleHigh && low === kOldstyleLow) {
    throw handshakeError(`${serverName} speaks the oldstyle NBD handshake, which is not supported`);
  }
  if (high !== kIHaveOptHigh || low !== kIHaveOptLow) {
    throw handshakeError(`${serverName} sent an unknown greeting magic`);
  }
  return view.readUInt16BE(16);
}

/** Client flags: echo only the bits the server offered that we understand. */
export function clientFlagsFor(handshakeFlags: number): number {
  let flags = 0;
  if ((handshakeFlags & kFlagFixedNewstyle) !== 0) flags |= kClientFlagFixedNewstyle;
  if ((handshakeFlags & kFlagNoZeroes) !== 0) flags |= kClientFlagNoZeroes;
  return flags;
}

export function encodeOption(option: number, data: Uint8Array | null): Buffer {
  const dataBytes = data === null ? 0 : data.length;
  const message = Buffer.alloc(kOptionHeaderBytes + dataBytes);
  message.writeUInt32BE(kIHaveOptHigh, 0);
  message.writeUInt32BE(kIHaveOptLow, 4);
  message.writeUInt32BE(option, 8);
  message.writeUInt32BE(dataBytes, 12);
  if (data !== null) message.set(data, kOptionHeaderBytes);
  return message;
}

function encodedName(name: string, what: string): Buffer {
  const bytes = Buffer.from(name, 'utf8');
  if (bytes.length > kStringBytesMax) {
    throw handshakeError(`${what} is longer than ${kStringBytesMax} bytes`);
  }
  return bytes;
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO: name length u32, name, count u16, info types u16. */
export function encodeInfoRequest(exportName: string, infoTypes: readonly number[]): Buffer {
  const name = encodedName(exportName, 'export name');
  const data = Buffer.alloc(4 + name.length + 2 + 2 * infoTypes.length);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  data.writeUInt16BE(infoTypes.length, 4 + name.length);
  infoTypes.forEach((type, index) => data.writeUInt16BE(type, 6 + name.length + 2 * index));
  return data;
}

/** Data of NBD_OPT_{LIST,SET}_META_CONTEXT: name length u32, name, count u32, (len u32, query)*. */
export function encodeMetaContextRequest(exportName: string, queries: readonly string[]): Buffer {
  const name = encodedName(exportName, 'export name');
  const encoded = queries.map((query) => encodedName(query, 'meta context query'));
  const queryBytes = encoded.reduce((sum, query) => sum + 4 + query.length, 0);
  const data = Buffer.alloc(4 + name.length + 4 + queryBytes);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  let position = 4 + name.length;
  data.writeUInt32BE(encoded.length, position);
  position += 4;
  for (const query of encoded) {
    data.writeUInt32BE(query.length, position);
    query.copy(data, position + 4);
    position += 4 + query.length;
  }
  assert(position === data.length, 'meta context request fully written');
  return data;
}

export function parseOptionReplyHeader(view: Buffer, serverName: string): OptionReplyHeader {
  assert(view.length === kOptionReplyHeaderBytes, 'option reply header must be 20 bytes');
  const magicHigh = view.readUInt32BE(0);
  const magicLow = view.readUInt32BE(4);
  if (magicHigh !== kOptionReplyMagicHigh || magicLow !== kOptionReplyMagicLow) {
    throw handshakeError(`${serverName} sent an option reply with a bad magic`);
  }
  const header = {
    option: view.readUInt32BE(8),
    replyType: view.readUInt32BE(12),
    lengthBytes: view.readUInt32BE(16),
  };
  if (header.lengthBytes > kOptionReplyBytesMax) {
    throw handshakeError(
      `${serverName} sent a ${header.lengthBytes}-byte option reply (limit ${kOptionReplyBytesMax})`,
    );
  }
  return header;
}

export type ParsedInfo =
  | { type: 'export'; sizeBytes: number; transmissionFlags: number }
  | { type: 'name'; name: string }
  | { type: 'description'; description: string }
  | { type: 'blockSize'; blockSizes: BlockSizes }
  | { type: 'unknown'; infoType: number };

/** Parse the payload of an NBD_REP_INFO reply (starts with the u16 info type). */
export function parseInfo(payload: Buffer, serverName: string): ParsedInfo {
  if (payload.length < 2) {
    throw handshakeError(`${serverName} sent an NBD_REP_INFO shorter than 2 bytes`);
  }
  const infoType = payload.readUInt16BE(0);
  const bad = (what: string): EnbdError =>
    handshakeError(`${serverName} sent a malformed ${what} (${payload.length} bytes)`);
  switch (infoType) {
    case kInfoExport: {
      if (payload.length !== 12) throw bad('NBD_INFO_EXPORT');
      const sizeBytes = readSafeU64(payload, 2);
      if (sizeBytes === null) {
        throw handshakeError(`${serverName} reports an export size of 2^53 bytes or more`);
      }
      return { type: 'export', sizeBytes, transmissionFlags: payload.readUInt16BE(10) };
    }
    case kInfoName:
      return { type: 'name', name: payload.toString('utf8', 2) };
    case kInfoDescription:
      return { type: 'description', description: payload.toString('utf8', 2) };
    case kInfoBlockSize: {
      if (payload.length !== 14) throw bad('NBD_INFO_BLOCK_SIZE');
      const blockSizes = {
        minimumBytes: payload.readUInt32BE(2),
        preferredBytes: payload.readUInt32BE(6),
        maximumBytes: payload.readUInt32BE(10),
      };
      validateBlockSizes(blockSizes, serverName);
      return { type: 'blockSize', blockSizes };
    }
    default:
      return { type: 'unknown', infoType };
  }
}

export function validateBlockSizes(sizes: BlockSizes, serverName: string): void {
  const { minimumBytes, preferredBytes, maximumBytes } = sizes;
  const text = `${minimumBytes}/${preferredBytes}/${maximumBytes}`;
  if (!isPowerOfTwo(minimumBytes) || minimumBytes > kBlockSizeMinimumMax) {
    throw handshakeError(`${serverName} advertises an invalid minimum block size (${text})`);
  }
  if (!isPowerOfTwo(preferredBytes) || preferredBytes < minimumBytes) {
    throw handshakeError(`${serverName} advertises an invalid preferred block size (${text})`);
  }
  const unaligned = maximumBytes % minimumBytes !== 0 && maximumBytes !== 0xffffffff;
  if (maximumBytes < minimumBytes || unaligned) {
    throw handshakeError(`${serverName} advertises an invalid maximum payload size (${text})`);
  }
}

/** Run the option phase. On success the connection is in transmission. */
export async function negotiateClient(
  io: HandshakeIo,
  options: HandshakeOptions,
): Promise<HandshakeResult> {
  const { serverName, logger } = options;
  const handshakeFlags = parseGreeting(await io.read(kGreetingBytes), serverName);
  const clientFlags = clientFlagsFor(handshakeFlags);
  const flagsMessage = Buffer.alloc(4);
  flagsMessage.writeUInt32BE(clientFlags, 0);
  io.write(flagsMessage);
  logger?.debug({ server: serverName, handshakeFlags, clientFlags }, 'nbd client: greeting');
  const noZeroes = (clientFlags & kClientFlagNoZeroes) !== 0;
  if ((handshakeFlags & kFlagFixedNewstyle) === 0) {
    return await exportNameFallback(io, options, handshakeFlags, noZeroes, false, null);
  }
  if (options.tls === true) {
    assert(io.startTls !== undefined, 'TLS needs a connection that can upgrade');
    if ((handshakeFlags & kFlagFixedNewstyle) === 0) throw handshakeError(`NBD server ${serverName} cannot do TLS (no fixed newstyle)`);
    const reply = await simpleOption(io, kOptStartTls, null, serverName);
    if (reply.replyType !== kRepAck) throw handshakeError(`NBD server ${serverName} refused STARTTLS (${reply.message}); it may not offer TLS: use nbd://`);
    await io.startTls();
    logger?.debug({ server: serverName }, 'nbd client: TLS established');
  }
  let structuredReplies = false;
  if (options.structuredReplies) {
    const reply = await simpleOption(io, kOptStructuredReply, null, serverName);
    if (reply.replyType === kRepErrTlsReqd) throw tlsRequired(serverName);
    structuredReplies = reply.replyType === kRepAck;
    logger?.debug(
      { server: serverName, structuredReplies, reply: reply.message },
      'nbd client: structured replies',
    );
  }
  let baseAllocationContextId: number | null = null;
  if (structuredReplies && options.blockStatus) {
    baseAllocationContextId = await setMetaContext(io, options);
  }
  const go = await optionGo(io, options);
  if (go === null) {
    const contextId = baseAllocationContextId;
    return await exportNameFallback(io, options, handshakeFlags, noZeroes, structuredReplies, contextId);
  }
  return {
    ...go,
    handshakeFlags,
    structuredReplies,
    baseAllocationContextId,
    usedExportNameFallback: false,
  };
}

async function readReply(
  io: HandshakeIo,
  option: number,
  serverName: string,
): Promise<OptionReplyHeader & { payload: Buffer }> {
  const header = parseOptionReplyHeader(await io.read(kOptionReplyHeaderBytes), serverName);
  if (header.option !== option) {
    throw handshakeError(
      `${serverName} answered option ${header.option} while option ${option} was pending`,
    );
  }
  const payload = header.lengthBytes === 0 ? Buffer.alloc(0) : await io.read(header.lengthBytes);
  return { ...header, payload };
}

/** An option whose only replies are ACK or an error (STRUCTURED_REPLY). */
async function simpleOption(
  io: HandshakeIo,
  option: number,
  data: Uint8Array | null,
  serverName: string,
): Promise<{ replyType: number; message: string }> {
  io.write(encodeOption(option, data));
  const reply = await readReply(io, option, serverName);
  if (reply.replyType === kRepAck) return { replyType: kRepAck, message: 'ack' };
  if ((reply.replyType & kRepErrorBit) === 0) {
    throw handshakeError(`${serverName} sent reply type ${reply.replyType} to option ${option}`);
  }
  if (reply.replyType === kRepErrShutdown) throw handshakeError(`${serverName} is shutting down`);
  const message = `${optionReplyErrorName(reply.replyType)} ${reply.payload.toString('utf8')}`;
  return { replyType: reply.replyType, message };
}

async function setMetaContext(io: HandshakeIo, options: HandshakeOptions): Promise<number | null> {
  const { serverName, logger } = options;
  const data = encodeMetaContextRequest(options.exportName, [kMetaContextBaseAllocation]);
  io.write(encodeOption(kOptSetMetaContext, data));
  let contextId: number | null = null;
  for (let replyIndex = 0; replyIndex < 1024; replyIndex++) {
    const reply = await readReply(io, kOptSetMetaContext, serverName);
    if (reply.replyType === kRepAck) {
      logger?.debug({ server: serverName, contextId }, 'nbd client: meta context');
      return contextId;
    }
    if (reply.replyType === kRepMetaContext) {
      if (reply.payload.length < 4) {
        throw handshakeError(`${serverName} sent a short NBD_REP_META_CONTEXT`);
      }
      const name = reply.payload.toString('utf8', 4);
      if (name === kMetaContextBaseAllocation) contextId = reply.payload.readUInt32BE(0);
      continue;
    }
    if ((reply.replyType & kRepErrorBit) !== 0) {
      if (reply.replyType === kRepErrShutdown) {
        throw handshakeError(`${serverName} is shutting down`);
      }
      if (reply.replyType === kRepErrUnknown) throw unknownExport(options);
      logger?.debug(
        { server: serverName, error: optionReplyErrorName(reply.replyType) },
        'nbd client: SET_META_CONTEXT refused; block status off',
      );
      return null;
    }
    throw handshakeError(
      `${serverName} sent reply type ${reply.replyType} to NBD_OPT_SET_META_CONTEXT`,
    );
  }
  throw handshakeError(`${serverName} sent too many NBD_REP_META_CONTEXT replies`);
}

function unknownExport(options: HandshakeOptions, detail = ''): EnbdError {
  const suffix = detail.length === 0 ? '' : `: ${detail}`;
  const { serverName, exportName } = options;
  return handshakeError(`NBD server ${serverName} has no export '${exportName}'${suffix}`);
}

type GoResult = Pick<
  HandshakeResult,
  'sizeBytes' | 'transmissionFlags' | 'blockSizes' | 'description' | 'canonicalName'
>;

/** NBD_OPT_GO; returns null when the server does not support it (ERR_UNSUP). */
async function optionGo(io: HandshakeIo, options: HandshakeOptions): Promise<GoResult | null> {
  const { serverName, logger } = options;
  const infoTypes = [kInfoExport, kInfoName, kInfoDescription, kInfoBlockSize];
  io.write(encodeOption(kOptGo, encodeInfoRequest(options.exportName, infoTypes)));
  const result: GoResult = {
    sizeBytes: -1,
    transmissionFlags: 0,
    blockSizes: null,
    description: '',
    canonicalName: null,
  };
  for (let replyIndex = 0; replyIndex < 1024; replyIndex++) {
    const reply = await readReply(io, kOptGo, serverName);
    if (reply.replyType === kRepInfo) {
      applyInfo(result, parseInfo(reply.payload, serverName));
      continue;
    }
    if (reply.replyType === kRepAck) {
      if (result.sizeBytes < 0) {
        throw handshakeError(`${serverName} finished NBD_OPT_GO without NBD_INFO_EXPORT`);
      }
      logger?.debug({ server: serverName, ...result }, 'nbd client: NBD_OPT_GO accepted');
      return result;
    }
    if ((reply.replyType & kRepErrorBit) === 0) {
      throw handshakeError(`${serverName} sent reply type ${reply.replyType} to NBD_OPT_GO`);
    }
    const message = reply.payload.toString('utf8');
    if (reply.replyType === kRepErrUnsup) {
      logger?.debug({ server: serverName }, 'nbd client: OPT_GO unsupported, using OPT_EXPORT_NAME');
      return null;
    }
    if (reply.replyType === kRepErrUnknown) throw unknownExport(options, message);
    if (reply.replyType === kRepErrTlsReqd) throw tlsRequired(serverName);
    throw handshakeError(
      `NBD server ${serverName} refused export '${options.exportName}': ` +
        `${optionReplyErrorName(reply.replyType)}${message.length === 0 ? '' : ` (${message})`}`,
    );
  }
  throw handshakeError(`${serverName} sent too many NBD_REP_INFO replies`);
}

function applyInfo(result: GoResult, info: ParsedInfo): void {
  switch (info.type) {
    case 'export':
      result.sizeBytes = info.sizeBytes;
      result.transmissionFlags = info.transmissionFlags;
      break;
    case 'name':
      result.canonicalName = info.name;
      break;
    case 'description':
      result.description = info.description;
      break;
    case 'blockSize':
      result.blockSizes = info.blockSizes;
      break;
    case 'unknown':
      break;
  }
}

async function exportNameFallback(
  io: HandshakeIo,
  options: HandshakeOptions,
  handshakeFlags: number,
  noZeroes: boolean,
  structuredReplies: boolean,
  baseAllocationContextId: number | null,
): Promise<HandshakeResult> {
  io.write(encodeOption(kOptExportName, encodedName(options.exportName, 'export name')));
  let reply: Buffer;
  try {
    reply = await io.read(kExportNameReplyBytes + (noZeroes ? 0 : kExportNamePaddingBytes));
  } catch (error) {
    if (error instanceof EnbdError && error.code === 'ENBD_ERR_TIMEOUT') throw error;
    throw unknownExport(options, 'the server closed the connection after NBD_OPT_EXPORT_NAME');
  }
  const sizeBytes = readSafeU64(reply, 0);
  if (sizeBytes === null) {
    throw handshakeError(`${options.serverName} reports an export size of 2^53 bytes or more`);
  }
  const transmissionFlags = reply.readUInt16BE(8);
  if ((transmissionFlags & kTxFlagHasFlags) === 0) {
    const server = options.serverName;
    options.logger?.debug({ server, transmissionFlags }, 'nbd client: HAS_FLAGS missing');
  }
  return {
    sizeBytes,
    transmissionFlags,
    handshakeFlags,
    structuredReplies,
    baseAllocationContextId,
    blockSizes: null,
    description: '',
    canonicalName: null,
    usedExportNameFallback: true,
  };
}
