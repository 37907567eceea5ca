/**
 * Leg URIs to server stubs: `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH`
 * become an NbdClient; `file:///abs/path` or a plain path becomes a FileDevice. The engine only
 * ever sees the BlockDevice interface.
 * Thread: the thread that will use the device (a connection actor's worker, or main inline).
 */
import { isAbsolute, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { BlockDevice } from '../core/block-device.js';
import type { LegKind } from '../core/status-types.js';
import type { Logger } from '../core/log.js';
import { EnbdError, describeError } from '../core/errors.js';
import { NbdClient } from '../nbd/client/client.js';
import { parseNbdUri, type NbdAddress } from '../nbd/uri.js';
import { FileDevice } from './file-device.js';

export type { LegKind };

export type LegAddress = { kind: 'nbd'; address: NbdAddress; uri: string } | { kind: 'file'; path: string; uri: string };

/** Parses a leg URI (throws ENBD_ERR_URI with a message naming the URI). */
export function parseLegUri(text: string): LegAddress {
  const trimmed = text.trim();
  if (trimmed === '') throw new EnbdError('ENBD_ERR_URI', 'empty leg URI');
  if (trimmed.startsWith('file:')) {
    let path: string;
    try {
      path = fileURLToPath(trimmed);
    } catch (error) {
      throw new EnbdError('ENBD_ERR_URI', `invalid file URI '${text}': ${describeError(error)}`);
    }
    return { kind: 'file', path, uri: trimmed };
  }
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(trimmed)) {
    return { kind: 'nbd', address: parseNbdUri(trimmed), uri: trimmed };
  }
  const path = isAbsolute(trimmed) ? trimmed : resolve(trimmed);
  return { kind: 'file', path, uri: `file://${path}` };
}

export interface OpenLegOptions {
  logger?: Logger;
  connectTimeoutMs?: number;
  /** Fail the leg's connection when a request waits longer than this (0 = never). */
  requestTimeoutMs?: number;
  /** I/O mode of file legs (see FileDevice). */
  fileIo?: 'sync' | 'async';
}

/** Opens the leg: connects and negotiates for NBD, opens the file for a file leg. */
export async function openLeg(leg: LegAddress, options: OpenLegOptions = {}): Promise<BlockDevice> {
  // A file leg lives on its own actor thread: synchronous I/O there blocks only that leg.
  if (leg.kind === 'file') return FileDevice.open(leg.path, { io: options.fileIo ?? 'sync' });
  return await NbdClient.connect(leg.address, {
    connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
    requestTimeoutMs: options.requestTimeoutMs ?? 0,
    ...(options.logger !== undefined ? { logger: options.logger } : {}),
  });
}
