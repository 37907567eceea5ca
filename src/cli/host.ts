/**
 * nbdkit's and qemu-nbd's process habits for `enbd serve` and `enbd mirror` (issue 12):
 *   -f/--foreground  accepted, no effect (enbd always stays in the foreground)
 *   -P/--pidfile F   the pid is written to F once every listener accepts; removed at a clean stop
 *   -U -             a private socket `enbd.sock` in a fresh 0700 temp dir (removed at stop)
 *   --run 'CMD'      once ready, `/bin/sh -c CMD` with $uri, $nbd (the same URI, as nbdkit
 *                    >= 1.24), $unixsocket, $socket (the same path), $port, $exportname in its
 *                    environment; when it exits, the daemon stops gracefully and exits with its
 *                    status (128 + N when it was killed by signal N)
 *   --exit-with-parent  stop gracefully when the parent process is gone. Linux's
 *                    prctl(PR_SET_PDEATHSIG) is not reachable from Node without a native addon,
 *                    so process.ppid is polled every 500 ms: a change means the parent died and
 *                    the process was reparented.
 *
 * Thread: main thread.
 *
 * Invariants:
 * - the pidfile never exists before every listener accepts (written after they are bound, to
 *   a temporary name and renamed into place, so a reader never sees a partial pid);
 * - cleanup() removes only what this process created (the pidfile if it still holds our pid,
 *   the private socket directory).
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { constants } from 'node:os';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { assert } from '../core/assert.js';
import { EnbdError } from '../core/errors.js';
import type { Logger } from '../core/log.js';
import type { Shutdown } from './shutdown.js';

export const kParentPollMs = 500;
export const kPrivateSocket = '-';

export interface HostHabits {
  pidfile: string | null;
  run: string | null;
  exitWithParent: boolean;
  /** The private directory made for `-U -` (null when not asked). */
  privateDir: string | null;
}

/** Where the daemon listens once ready, for the --run environment. */
export interface ReadyEndpoints {
  exportName: string;
  unixSocket: string | null;
  tcp: { host: string; port: number } | null;
}

/** Reads -P, --run, --exit-with-parent from commander's options (validated). */
export function parseHostHabits(options: Record<string, unknown>): HostHabits {
  const pidfile = options['pidfile'];
  const run = options['run'];
  if (pidfile !== undefined && (typeof pidfile !== 'string' || pidfile === '')) throw new EnbdError('ENBD_ERR_USAGE', `-P/--pidfile must be a file name, got ${JSON.stringify(pidfile)}`);
  if (run !== undefined && (typeof run !== 'string' || run.trim() === '')) throw new EnbdError('ENBD_ERR_USAGE', `--run must be a command, got ${JSON.stringify(run)}`);
  return {
    pidfile: typeof pidfile === 'string' ? resolve(pidfile) : null,
    run: typeof run === 'string' ? run : null,
    exitWithParent: options['exitWithParent'] === true,
    privateDir: null,
  };
}

/** `-U -`: makes the private directory and returns the socket path inside it. */
export function makePrivateSocket(habits: HostHabits): string {
  assert(habits.privateDir === null, '-U - is resolved once');
  habits.privateDir = mkdtempSync(join(tmpdir(), 'enbd-'));
  return join(habits.privateDir, 'enbd.sock');
}

/** The URI a client should use: the Unix socket when there is one, else TCP ('' when only inherited fds). */
export function preferredUri(endpoints: ReadyEndpoints): string {
  const name = encodeURIComponent(endpoints.exportName);
  if (endpoints.unixSocket !== null) return `nbd+unix:///${name}?socket=${endpoints.unixSocket}`;
  if (endpoints.tcp === null) return '';
  const host = endpoints.tcp.host.includes(':') ? `[${endpoints.tcp.host}]` : endpoints.tcp.host;
  return `nbd://${host}:${endpoints.tcp.port}/${name}`;
}

/**
 * Where the banner goes: stdout, or stderr with --run or under socket activation (stdout then
 * belongs to the command, or is the captive client's own: `nbdinfo --size -- [ enbd ... ]`).
 */
export function bannerStream(habits: HostHabits, activated: boolean): NodeJS.WriteStream {
  return habits.run === null && !activated ? process.stdout : process.stderr;
}

function writePidfile(path: string): void {
  const temporary = `${path}.${process.pid}.tmp`;
  writeFileSync(temporary, `${process.pid}\n`, { mode: 0o644 });
  renameSync(temporary, path);
}

/**
 * Called once every listener accepts: writes the pidfile, starts the parent watch and the
 * --run command. Returns nothing to wait for; the shutdown ends the process.
 */
export function hostReady(habits: HostHabits, endpoints: ReadyEndpoints, logger: Logger, shutdown: Shutdown): void {
  if (habits.pidfile !== null) {
    try {
      writePidfile(habits.pidfile);
    } catch (error) {
      // nbdkit fails its start then: stop (cleanly) with exit 1 rather than run without it
      logger.error({ err: error, pidfile: habits.pidfile }, '--pidfile cannot be written; stopping');
      shutdown.begin('--pidfile cannot be written', 1);
      return;
    }
    logger.debug({ pidfile: habits.pidfile }, 'pidfile written');
  }
  if (habits.exitWithParent) watchParent(logger, shutdown);
  if (habits.run !== null) runCaptive(habits.run, endpoints, logger, shutdown);
}

function watchParent(logger: Logger, shutdown: Shutdown): void {
  const parent = process.ppid;
  const timer = setInterval(() => {
    if (process.ppid === parent) return;
    clearInterval(timer);
    logger.info({ parent, ppid: process.ppid }, '--exit-with-parent: the parent process is gone');
    shutdown.begin('--exit-with-parent: parent exited', 0);
  }, kParentPollMs);
  timer.unref();
}

function runCaptive(command: string, endpoints: ReadyEndpoints, logger: Logger, shutdown: Shutdown): void {
  const uri = preferredUri(endpoints);
  const socket = endpoints.unixSocket ?? '';
  const env = {
    ...process.env,
    uri,
    nbd: uri,
    unixsocket: socket,
    socket,
    port: endpoints.tcp === null ? '' : String(endpoints.tcp.port),
    exportname: endpoints.exportName,
  };
  logger.info({ run: command, uri }, '--run: starting the command');
  const child = spawn('/bin/sh', ['-c', command], { env, stdio: 'inherit' });
  child.once('error', (error) => {
    logger.error({ err: error }, '--run: the command could not be started');
    shutdown.begin('--run command failed to start', 1);
  });
  child.once('exit', (code, signal) => {
    const signalNumber = signal === null ? 0 : (constants.signals[signal] ?? 0);
    const status = code ?? 128 + signalNumber;
    logger.info({ exitCode: code, signal }, '--run: the command exited; stopping');
    shutdown.begin(`--run command exited with ${status}`, status);
  });
}

/** Removes the pidfile (if it still names us) and the private socket directory. */
export function hostCleanup(habits: HostHabits): void {
  if (habits.pidfile !== null) {
    try {
      if (readFileSync(habits.pidfile, 'utf8').trim() === String(process.pid)) rmSync(habits.pidfile, { force: true });
    } catch {
      // never written, or already gone
    }
  }
  if (habits.privateDir !== null) rmSync(habits.privateDir, { recursive: true, force: true });
}

/** -p/--port and -e/--export-name as aliases of --listen and --name; conflicts are refused. */
export function applyAliases(options: Record<string, unknown>): void {
  const port = options['port'];
  if (port !== undefined) {
    if (options['listen'] !== undefined) throw new EnbdError('ENBD_ERR_USAGE', `-p/--port ${String(port)} and --listen ${String(options['listen'])} both given; use one`);
    if (!/^\d+$/.test(String(port)) || Number(port) > 65535) throw new EnbdError('ENBD_ERR_USAGE', `-p/--port must be a port from 0 to 65535, got ${String(port)}`);
    options['listen'] = String(port);
  }
  const exportName = options['exportName'];
  if (exportName !== undefined) {
    if (options['name'] !== undefined && options['name'] !== exportName) {
      throw new EnbdError('ENBD_ERR_USAGE', `-e/--export-name "${String(exportName)}" and --name "${String(options['name'])}" differ; use one`);
    }
    options['name'] = exportName;
  }
  const unix = options['unix'];
  if (unix !== undefined) {
    if (options['socket'] !== undefined && options['socket'] !== unix) throw new EnbdError('ENBD_ERR_USAGE', '--unix and --socket differ; use one');
    options['socket'] = unix;
  }
}
