/**
 * `server.listen` as a promise for net and http servers: resolves once listening; a listen
 * failure (EADDRINUSE, EACCES...) becomes EnbdError('ENBD_ERR_CONFIG') naming the address.
 * Thread: main thread.
 */
import type { Server } from 'node:net';
import { EnbdError, describeError } from './errors.js';

export type ListenTarget = { path: string } | { host: string; port: number };

/** `prefix` starts the message (e.g. "--metrics: "), so the user sees which option failed. */
export async function listenOn(server: Server, target: ListenTarget, prefix = ''): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const done = (): void => {
      server.off('error', reject);
      resolve();
    };
    server.once('error', reject);
    if ('path' in target) server.listen(target.path, done);
    else server.listen(target.port, target.host, done);
  }).catch((error: unknown) => {
    const where = 'path' in target ? target.path : `${target.host}:${target.port}`;
    throw new EnbdError('ENBD_ERR_CONFIG', `${prefix}cannot listen on ${where}: ${describeError(error)}`);
  });
}
