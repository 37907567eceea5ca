/**
 * SIGHUP for the daemon commands. SIGHUP's default action kills the process (exit 129: no drain,
 * no flush, sockets left behind), which is what closing the terminal of a foreground daemon does;
 * here it never stops the daemon:
 * - `enbd mirror` with `--config FILE` reloads the file (`reloadMirror`, src/cli/mirror.ts)
 *   and applies what can change live; without a config file it logs that there is nothing to
 *   reload;
 * - `enbd serve` logs that it ignores it;
 * - during start-up and while stopping it is logged and ignored.
 *
 * Thread: main thread (signal handlers run on the event loop).
 *
 * Invariants:
 * - from `installHangup` on, a SIGHUP never ends the process;
 * - reloads never overlap: a SIGHUP while one runs is remembered and runs once after it;
 * - a reload that throws is logged and changes nothing more (the running settings stay).
 */
import type { Logger } from '../core/log.js';

export type ReloadFunction = () => Promise<void>;

export interface Hangup {
  /** What SIGHUP does from now on (null: log and ignore, e.g. while stopping). */
  setReload(reload: ReloadFunction | null, ignoredBecause?: string): void;
}

export function installHangup(logger: Logger, ignoredBecause: string): Hangup {
  let reload: ReloadFunction | null = null;
  let why = ignoredBecause;
  let running = false;
  let again = false;
  const runReload = (current: ReloadFunction): void => {
    running = true;
    current()
      .catch((error: unknown) => logger.error({ err: error }, 'SIGHUP: reload failed; the running settings stay'))
      .finally(() => {
        running = false;
        if (again && reload !== null) {
          again = false;
          runReload(reload);
        }
      });
  };
  process.on('SIGHUP', () => {
    if (reload === null) {
      logger.info({ signal: 'SIGHUP' }, `SIGHUP ignored: ${why}`);
      return;
    }
    if (running) {
      again = true;
      return;
    }
    runReload(reload);
  });
  return {
    setReload(next: ReloadFunction | null, nextWhy?: string): void {
      reload = next;
      if (nextWhy !== undefined) why = nextWhy;
    },
  };
}
