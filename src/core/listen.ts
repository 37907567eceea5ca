/**
 * Listening without breaking a neighbour: `server.listen` as a promise, and the checks a daemon
 * runs on every address before it binds any (`checkUnixFree`, `checkTcpFree`), so a second
 * daemon given the same socket, port or control socket refuses cleanly and the first one keeps
 * serving.
 * Thread: main thread.
 *
 * Design notes: what a connect(2) probe of an existing Unix socket path says
 * | result                        | state  | a daemon about to bind there                  |
 * |-------------------------------|--------|-----------------------------------------------|
 * | ENOENT                        | absent | binds                                         |
 * | ECONNREFUSED                  | stale  | unlinks it (nobody accepts), then binds       |
 * | connected                     | live   | refuses, naming the path; never unlinks it    |
 * | no answer within 1 s          | live   | (a full backlog: someone holds it) refuses    |
 * | EACCES, EPERM, other errors   | error  | refuses with the errno (cannot tell)          |
 * | path exists, is not a socket  | error  | refuses; never replaces a file                |
 *
 * Invariant: nothing here unlinks a socket that accepted a connection, and the check on a TCP
 * address binds and closes a throwaway listener only (port 0 is never checked: it cannot clash).
 */
import { lstatSync } from 'node:fs';
import { connect, createServer, type Server } from 'node:net';
import { assert } from './assert.js';
import { EnbdError, describeError } from './errors.js';

/** A Unix socket path, a TCP address, or an inherited listening fd (socket activation). */
export type ListenTarget = { path: string } | { host: string; port: number } | { fd: number };

function describeTarget(target: ListenTarget): string {
  if ('path' in target) return target.path;
  if ('fd' in target) return `inherited fd ${target.fd} (socket activation)`;
  return `${target.host}:${target.port}`;
}

const kProbeTimeoutMs = 1000;

/** `prefix` starts the message (e.g. "--metrics: "), so the user sees which option failed. */
export async function listenOn(server: Server, target: ListenTarget, prefix = ''): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const done = (): void => {
      server.off('error', reject);
      resolve();
    };
    server.once('error', reject);
    if ('path' in target) server.listen(target.path, done);
    else if ('fd' in target) server.listen({ fd: target.fd }, done);
    else server.listen(target.port, target.host, done);
  }).catch((error: unknown) => {
    const where = describeTarget(target);
    const inUse = (error as NodeJS.ErrnoException).code === 'EADDRINUSE' ? ' (in use by another process: another enbd?)' : '';
    throw new EnbdError('ENBD_ERR_CONFIG', `${prefix}cannot listen on ${where}: ${describeError(error)}${inUse}`);
  });
}

export type UnixSocketState = 'absent' | 'stale' | 'live';

/**
 * What is at `path` (table above). Throws EnbdError (naming `what`, e.g. "--socket") for a path
 * that is not a socket or cannot be probed.
 */
export async function probeUnixSocket(path: string, what: string): Promise<UnixSocketState> {
  assert(path.length > 0, 'a socket path');
  let isSocket: boolean;
  try {
    isSocket = lstatSync(path).isSocket();
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return 'absent';
    throw new EnbdError('ENBD_ERR_CONFIG', `${what} ${path}: ${describeError(error)}`);
  }
  if (!isSocket) throw new EnbdError('ENBD_ERR_CONFIG', `${what} ${path} exists and is not a socket; refusing to replace it`);
  return await new Promise((resolve, reject) => {
    const socket = connect(path);
    const timer = setTimeout(() => {
      socket.destroy();
      resolve('live'); // it exists and does not refuse: someone holds it
    }, kProbeTimeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.destroy();
      resolve('live');
    });
    socket.once('error', (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      socket.destroy();
      if (error.code === 'ECONNREFUSED') resolve('stale');
      else if (error.code === 'ENOENT') resolve('absent');
      else reject(new EnbdError('ENBD_ERR_CONFIG', `${what} ${path} exists and cannot be probed: ${describeError(error)}`));
    });
  });
}

/** The message for a Unix socket another process accepts on. */
export function socketInUseMessage(what: string, path: string): string {
  return `${what} ${path} is in use: another process accepts connections on it (another enbd?); stop it first or choose another path`;
}

/** Throws unless `path` is free to bind (absent, or a stale socket the caller may replace). */
export async function checkUnixFree(path: string, what: string): Promise<Exclude<UnixSocketState, 'live'>> {
  const state = await probeUnixSocket(path, what);
  if (state === 'live') throw new EnbdError('ENBD_ERR_CONFIG', socketInUseMessage(what, path));
  return state;
}

/** Throws unless host:port can be bound now (binds a throwaway listener and closes it). */
export async function checkTcpFree(host: string, port: number, what: string): Promise<void> {
  assert(Number.isInteger(port) && port >= 0 && port <= 65535, 'a TCP port');
  if (port === 0) return;
  const probe = createServer();
  const shown = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
  await listenOn(probe, { host, port }, `${what} ${shown}: `);
  await new Promise<void>((resolve) => probe.close(() => resolve()));
}
