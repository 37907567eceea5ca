/**
 * The mirror and its NBD server as one unit: open the MirrorDevice, put an NbdServer in front
 * of it, and stop the two in the one safe order. `enbd mirror` (src/cli/mirror.ts), the
 * in-process test mirror (test/helpers/mirror.ts) and the resync bench (bench/lib/resync.ts)
 * all start and stop a served mirror through here; each chooses its own listeners.
 * Thread: main thread (the session master: the mirror's ring and the server live here).
 *
 * Design notes: listening is the caller's (Unix socket, TCP, systemd fds), so `openMirrorServer`
 * only opens and builds; a caller whose listen fails calls `abort()`.
 *   stop():  server.close (drain clients) -> mirror.flushAll -> afterFlush(errno) -> mirror.close
 *   abort(): server.close -> mirror.close (a start that failed: nothing to flush)
 * Invariants: the server closes before the mirror (no request reaches a closed ring); the
 * mirror is closed on every path of stop/abort, also when an earlier step throws; stop and
 * abort are idempotent (the second call resolves at once, stop with the first flush errno).
 */
import { MirrorDevice, type MirrorOptions } from '../engine/mirror.js';
import { createNbdServer, type NbdServer, type NbdServerOptions } from '../nbd/server/server.js';

export interface MirrorServer {
  mirror: MirrorDevice;
  server: NbdServer;
  /**
   * Graceful stop; resolves with the errno of the final flush of the legs (0 = every leg
   * flushed). `afterFlush` runs between the flush and the close (final stats, logs).
   */
  stop(afterFlush?: (errno: number) => void): Promise<number>;
  /** Stop without the final flush (a start whose listeners failed). */
  abort(): Promise<void>;
}

/** The server's options; a function of the opened mirror when they need it (meta contexts). */
export type MirrorServerOptions = Omit<NbdServerOptions, 'device'> | ((mirror: MirrorDevice) => Omit<NbdServerOptions, 'device'>);

export async function openMirrorServer(mirrorOptions: MirrorOptions, serverOptions: MirrorServerOptions): Promise<MirrorServer> {
  const mirror = await MirrorDevice.open(mirrorOptions);
  let server: NbdServer;
  try {
    const options = typeof serverOptions === 'function' ? serverOptions(mirror) : serverOptions;
    server = createNbdServer({ ...options, device: mirror });
  } catch (error) {
    await mirror.close();
    throw error;
  }
  let stopped: Promise<number> | null = null;
  const closeBoth = async (flush: boolean, afterFlush?: (errno: number) => void): Promise<number> => {
    let errno = 0;
    try {
      await server.close();
      if (flush) {
        errno = await mirror.flushAll();
        afterFlush?.(errno);
      }
    } finally {
      await mirror.close();
    }
    return errno;
  };
  return {
    mirror,
    server,
    stop: async (afterFlush) => await (stopped ??= closeBoth(true, afterFlush)),
    abort: async () => {
      await (stopped ??= closeBoth(false));
    },
  };
}
