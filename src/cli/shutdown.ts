/**
 * Signal handling shared by the daemon commands: the first SIGINT/SIGTERM starts a graceful
 * stop (drain, flush, close) and exits 0; a second signal exits 1 at once. The returned
 * `Shutdown` starts the same stop from inside (the `--run` command exited: exit with its status;
 * `--exit-with-parent`: the parent is gone), with the exit code to end with.
 * Thread: main thread.
 *
 * Invariant: the stop function runs at most once; the process exits only after it settled
 * (or at once on a second signal).
 */
import type { Logger } from '../core/log.js';

export interface Shutdown {
  /** Starts the graceful stop (once); the process then exits with `exitCode` (1 if it failed). */
  begin(reason: string, exitCode: number): void;
  readonly stopping: boolean;
}

export function installShutdown(logger: Logger, stop: () => Promise<void>): Shutdown {
  let stopping = false;
  const begin = (reason: string, exitCode: number): void => {
    if (stopping) return;
    stopping = true;
    logger.info({ reason }, 'shutting down');
    stop().then(
      () => {
        logger.info({ exitCode }, 'stopped cleanly');
        process.exit(exitCode);
      },
      (error: unknown) => {
        logger.error({ err: error }, 'error while shutting down');
        process.exit(1);
      },
    );
  };
  const onSignal = (signal: NodeJS.Signals): void => {
    if (stopping) {
      logger.warn({ signal }, 'second signal: exiting now');
      process.exit(1);
    }
    begin(signal, 0);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return {
    begin,
    get stopping() {
      return stopping;
    },
  };
}
