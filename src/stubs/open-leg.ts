/**
 * Leg URIs to server stubs: `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH`
 * become an NbdClient (or a ConnectionGroup of several, see below); `file:///abs/path` or a
 * plain path becomes a FileDevice. The engine only ever sees the BlockDevice interface.
 * Thread: the thread that will use the device (a connection actor's worker, or main inline).
 *
 * Design notes
 * - Connections per leg: the URI's `connections=N` query parameter (enbd's own; it is taken
 *   off before the NBD URI is parsed, so `nbd://host/export?connections=4` is valid), else
 *   OpenLegOptions.connections (`--leg-connections N`), else 1. More than one is used only when
 *   the server advertises multi-conn (the first connection's handshake tells); otherwise the
 *   leg keeps its one connection and an info line says why.
 * - `write-mostly=1` (enbd's own too) marks a leg given at start as write-mostly (the engine's
 *   ReadChooser reads from it only when no other leg can serve): the CLI reads it with
 *   legUriWriteMostly; it is taken off an NBD URI like `connections` (a file: URI's query is
 *   ignored by the path anyway). A plain path has no query: use file:///path?write-mostly=1.
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
import { ConnectionGroup, kMaxLegConnections } from './leg-connections.js';

export type { LegKind };

export type LegAddress =
  | { kind: 'nbd'; address: NbdAddress; uri: string; connections?: number; writeMostly?: boolean }
  | { kind: 'file'; path: string; uri: string; writeMostly?: boolean };

/** A connection count (flag or URI parameter): an integer in 1..kMaxLegConnections, else null. */
export function parseConnectionCount(text: string): number | null {
  if (!/^[0-9]{1,3}$/.test(text)) return null;
  const count = Number(text);
  return count >= 1 && count <= kMaxLegConnections ? count : null;
}

/** A `write-mostly=` value: 1 (or empty) is true, 0 false; anything else throws naming the URI. */
function writeMostlyValue(text: string, uri: string): boolean {
  if (text === '1' || text === '') return true;
  if (text === '0') return false;
  throw new EnbdError('ENBD_ERR_URI', `invalid leg URI '${uri}': write-mostly must be 0 or 1`);
}

/**
 * The leg URI's `write-mostly=` parameter (undefined when absent), for URIs with a scheme
 * (nbd*, file:); a plain path has no query. Throws ENBD_ERR_URI for a value other than 0 or 1.
 */
export function legUriWriteMostly(text: string): boolean | undefined {
  const trimmed = text.trim();
  if (!/^[a-z][a-z0-9+.-]*:/i.test(trimmed)) return undefined;
  const queryStart = trimmed.indexOf('?');
  if (queryStart < 0) return undefined;
  let writeMostly: boolean | undefined;
  for (const part of trimmed.slice(queryStart + 1).split('#')[0]?.split('&') ?? []) {
    if (part === 'write-mostly' || part.startsWith('write-mostly=')) writeMostly = writeMostlyValue(part.slice('write-mostly='.length), trimmed);
  }
  return writeMostly;
}

/** Takes enbd's `connections=N` and `write-mostly=` off an NBD URI's query: [the URI without them, N or undefined]. */
function takeConnections(text: string): [string, number | undefined] {
  const queryStart = text.indexOf('?');
  if (queryStart < 0) return [text, undefined];
  const kept: string[] = [];
  let connections: number | undefined;
  for (const part of text.slice(queryStart + 1).split('&')) {
    if (part === 'write-mostly' || part.startsWith('write-mostly=')) continue; // read by legUriWriteMostly
    if (!part.startsWith('connections=')) {
      kept.push(part);
      continue;
    }
    const count = parseConnectionCount(part.slice('connections='.length));
    if (count === null) {
      throw new EnbdError('ENBD_ERR_URI', `invalid leg URI '${text}': connections must be an integer in 1..${kMaxLegConnections}`);
    }
    connections = count;
  }
  const base = text.slice(0, queryStart);
  return [kept.length > 0 ? `${base}?${kept.join('&')}` : base, connections];
}

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
    const writeMostly = legUriWriteMostly(trimmed);
    return { kind: 'file', path, uri: trimmed, ...(writeMostly !== undefined ? { writeMostly } : {}) };
  }
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(trimmed)) {
    const writeMostly = legUriWriteMostly(trimmed);
    const [nbdUri, connections] = takeConnections(trimmed);
    return { kind: 'nbd', address: parseNbdUri(nbdUri), uri: trimmed, ...(connections !== undefined ? { connections } : {}), ...(writeMostly !== undefined ? { writeMostly } : {}) };
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
  /** Connections per NBD leg when its URI does not say (default 1; used with multi-conn only). */
  connections?: number;
}

/** Opens the leg: connects and negotiates for NBD, opens the file for a file leg. */
export async function openLeg(leg: LegAddress, options: OpenLegOptions = {}): Promise<BlockDevice> {
  // A file leg lives on its own actor thread: synchronous I/O there blocks only that leg.
  if (leg.kind === 'file') return FileDevice.open(leg.path, { io: options.fileIo ?? 'sync' });
  const connect = async (): Promise<NbdClient> => await NbdClient.connect(leg.address, {
    connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
    requestTimeoutMs: options.requestTimeoutMs ?? 0,
    ...(options.logger !== undefined ? { logger: options.logger } : {}),
  });
  const wanted = leg.connections ?? options.connections ?? 1;
  const first = await connect();
  if (wanted <= 1) return first;
  if (!first.features.multiConn) {
    options.logger?.info({ leg: leg.uri, connections: wanted },
      'leg server does not advertise multi-conn (NBD_FLAG_CAN_MULTI_CONN): using one connection');
    return first;
  }
  const others = await Promise.allSettled(Array.from({ length: wanted - 1 }, connect));
  const failed = others.find((result): result is PromiseRejectedResult => result.status === 'rejected');
  if (failed !== undefined) {
    await Promise.all([first, ...others.flatMap((result) => (result.status === 'fulfilled' ? [result.value] : []))]
      .map(async (client) => await client.close().catch(() => undefined)));
    throw failed.reason;
  }
  const members = [first, ...others.map((result) => (result as PromiseFulfilledResult<NbdClient>).value)];
  const sizes = new Set(members.map((client) => client.sizeBytes));
  if (sizes.size !== 1) {
    await Promise.all(members.map(async (client) => await client.close().catch(() => undefined)));
    throw new EnbdError('ENBD_ERR_CONFIG', `leg ${leg.uri}: its connections see different export sizes (${[...sizes].join(', ')})`);
  }
  options.logger?.info({ leg: leg.uri, connections: members.length }, 'leg connected over several connections (multi-conn)');
  return new ConnectionGroup(members);
}
