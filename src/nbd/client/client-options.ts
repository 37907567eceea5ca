/**
 * NbdClient's options and what it derives from the handshake: option validation (up front, at
 * connect), the BlockDevice features from the transmission flags, the default block sizes.
 * Threads: any (pure functions and constants).
 *
 * Design notes
 * Options are checked before any socket is opened and name the option path in the error
 * ('options.connectTimeoutMs must be a positive integer'), like piscina's constructor checks.
 *
 * Invariants:
 * - Every feature flag is read from the negotiated transmission flags only (block status:
 *   from whether base:allocation was negotiated).
 */
import type { Logger } from '../../core/log.js';
import { OptionError } from '../../core/errors.js';
import type { BlockSizes, DeviceFeatures } from '../../core/block-device.js';
import {
  kDefaultPayloadBytesMax,
  kTxFlagCanMultiConn,
  kTxFlagReadOnly,
  kTxFlagRotational,
  kTxFlagSendCache,
  kTxFlagSendFastZero,
  kTxFlagSendFlush,
  kTxFlagSendFua,
  kTxFlagSendTrim,
  kTxFlagSendWriteZeroes,
} from '../protocol.js';

export interface NbdClientOptions {
  /** Overrides the export name in the URI. */
  exportName?: string;
  /** Connect + handshake deadline (default 10000). */
  connectTimeoutMs?: number;
  /** Ask for structured replies (default true). */
  structuredReplies?: boolean;
  /** Ask for base:allocation block status (default true; needs structured replies). */
  blockStatus?: boolean;
  logger?: Logger;
  /** A request older than this fails the connection (0 = no limit, the default). */
  requestTimeoutMs?: number;
  /**
   * Direct receive (default true; plain sockets only, never under TLS): READ data of
   * kDirectReceiveMinBytes or more is read by the socket straight into the destination
   * instead of being copied from the receive buffer. false: always copy (A/B, diagnostics).
   */
  directReceive?: boolean;
}

export const kConnectTimeoutMsDefault = 10_000;
export const kDefaultBlockSizes: Readonly<BlockSizes> = {
  minimumBytes: 1,
  preferredBytes: 4096,
  maximumBytes: kDefaultPayloadBytesMax,
};

export function validateOptions(options: NbdClientOptions): void {
  const { connectTimeoutMs, requestTimeoutMs, exportName } = options;
  const badConnect = !Number.isInteger(connectTimeoutMs) || (connectTimeoutMs as number) <= 0;
  if (connectTimeoutMs !== undefined && badConnect) {
    throw new OptionError('ENBD_ERR_OPTION', 'options.connectTimeoutMs must be a positive integer');
  }
  const badRequest = !Number.isInteger(requestTimeoutMs) || (requestTimeoutMs as number) < 0;
  if (requestTimeoutMs !== undefined && badRequest) {
    throw new OptionError('ENBD_ERR_OPTION', 'options.requestTimeoutMs must be a non-negative integer');
  }
  if (options.directReceive !== undefined && typeof options.directReceive !== 'boolean') {
    throw new OptionError('ENBD_ERR_OPTION', 'options.directReceive must be a boolean');
  }
  if (exportName !== undefined && typeof exportName !== 'string') {
    throw new OptionError('ENBD_ERR_OPTION', 'options.exportName must be a string');
  }
}

export function featuresFromFlags(transmissionFlags: number, blockStatus: boolean): DeviceFeatures {
  const has = (flag: number): boolean => (transmissionFlags & flag) !== 0;
  return {
    readOnly: has(kTxFlagReadOnly),
    flush: has(kTxFlagSendFlush),
    fua: has(kTxFlagSendFua),
    trim: has(kTxFlagSendTrim),
    writeZeroes: has(kTxFlagSendWriteZeroes),
    fastZero: has(kTxFlagSendFastZero),
    cache: has(kTxFlagSendCache),
    multiConn: has(kTxFlagCanMultiConn),
    rotational: has(kTxFlagRotational),
    blockStatus,
  };
}
