/**
 * NBD server, direct receive (`--receive direct`): a connection's socket reads into a buffer
 * chosen before every read (its own receive buffer, or the rest of a WRITE payload's ring
 * slot) instead of into chunks Node allocates.
 *
 * Thread: main thread (session master).
 *
 * Design notes
 * net.Server cannot pass `onread` to the sockets it accepts, so the server accepts paused and
 * the accepted socket's handle is moved to a new Socket made with `onread`; the first Socket
 * object is destroyed without its handle (which also settles the server's connection count).
 * The connection points reads straight into a payload's buffer only when kDirectReceiveMinBytes
 * or more of it are left (below that, one copy from the receive buffer is cheaper than the
 * extra reads).
 *
 * Invariants:
 * - The handle is owned by exactly one Socket at any time (the old one gives it up first).
 */
import { Socket } from 'node:net';

/** Direct receive: own receive buffer size, and the smallest payload rest read straight into its slot. */
export const kReceiveBufferBytes = 256 * 1024;
export const kDirectReceiveMinBytes = 64 * 1024;

/** Node's `onread` option; Node calls both without `this`, so pass arrow functions. */
export interface DirectRead {
  /** The buffer the next read goes into. */
  readonly buffer: () => Uint8Array;
  /** `bytes` were read into `buffer`; true to keep reading. */
  readonly callback: (bytes: number, buffer: Uint8Array) => boolean;
}

/** Moves the accepted (paused) socket's handle to a new, resumed Socket reading via `read`. */
export function adoptForDirectReceive(accepted: Socket, read: DirectRead): Socket {
  const holder = accepted as unknown as { _handle: unknown };
  const handle = holder._handle;
  holder._handle = null;
  accepted.destroy();
  const options = {
    handle,
    allowHalfOpen: true,
    readable: true,
    writable: true,
    onread: read,
  };
  const socket = new Socket(options as unknown as ConstructorParameters<typeof Socket>[0]);
  socket.resume();
  return socket;
}
