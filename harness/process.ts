/**
 * The one process harness of the tests (test/helpers/tools.ts) and the bench (bench/lib/proc.ts):
 * children that are always reaped, a readiness probe for Unix-socket servers, a stop that
 * escalates to SIGKILL, and short-lived tools run to completion. Test-and-bench code only:
 * nothing in src/ imports it.
 * Threads: the main thread of the test or bench process.
 *
 * Design notes: every spawned child goes through `track`, so one registry reaches it at
 * process exit (`killAllSync`). The bench also kills a server's descendants (nbdkit forks
 * its plugins): it installs a tree walker with `setDescendantsOf`; tests kill the child only.
 * Invariants:
 * - A tracked child is in `live` from spawn until its 'close' or 'exit' event.
 * - `TrackedChild.exited` resolves exactly once, also for a spawn that failed (ENOENT).
 * - `unixAccepts` is true only after a real connect: the socket file appears at bind(), before
 *   listen(), and a connect in between is refused.
 * - `runToCompletion` never rejects; its timer is cleared on every path.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { connect } from 'node:net';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';

const live = new Set<ChildProcess>();
let descendantsOf: (pid: number) => number[] = () => [];

/** How killAllSync finds a child's descendants (the bench walks /proc; default: none). */
export function setDescendantsOf(walker: (pid: number) => number[]): void {
  descendantsOf = walker;
}

export function killQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // already gone
  }
}

/** Synchronous last-resort cleanup (signal handlers, process 'exit'): SIGKILL every live child. */
export function killAllSync(): void {
  for (const child of live) {
    if (child.pid !== undefined) {
      for (const pid of descendantsOf(child.pid)) killQuietly(pid, 'SIGKILL');
    }
    child.kill('SIGKILL');
  }
  live.clear();
}

process.on('exit', killAllSync);

/** Adds `child` to the registry until it exits. */
export function track(child: ChildProcess): void {
  live.add(child);
  const forget = (): void => {
    live.delete(child);
  };
  child.once('exit', forget);
  child.once('close', forget);
}

/** A tracked child with an exit promise and a stop that escalates. */
export class TrackedChild {
  readonly process: ChildProcess;
  /** Exit code; 128 when killed by a signal; null when the spawn failed. */
  readonly exited: Promise<number | null>;
  spawnError: Error | null = null;

  constructor(child: ChildProcess) {
    this.process = child;
    track(child);
    this.exited = new Promise((resolveExit) => {
      child.once('exit', (code, signal) => resolveExit(code ?? (signal === null ? null : 128)));
      child.once('error', (error) => {
        this.spawnError = error;
        if (child.pid === undefined) resolveExit(null); // no 'exit' follows a failed spawn
      });
    });
  }

  get running(): boolean {
    return this.spawnError === null && this.process.exitCode === null && this.process.signalCode === null;
  }

  /** Sends `signal` (if still running), SIGKILL after `graceMs`, and resolves on exit. */
  async stop(signal: NodeJS.Signals = 'SIGTERM', graceMs = 10_000): Promise<number | null> {
    if (this.running) this.process.kill(signal);
    const timer = setTimeout(() => this.process.kill('SIGKILL'), graceMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }
}

export interface SpawnOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** stdout and stderr: 'pipe' (default) or a file descriptor (a log file). */
  output?: 'pipe' | number;
}

export function spawnTracked(command: string, args: readonly string[], options: SpawnOptions = {}): TrackedChild {
  const output = options.output ?? 'pipe';
  const child = spawn(command, [...args], {
    env: options.env ?? process.env,
    stdio: ['ignore', output, output],
    ...(options.cwd !== undefined ? { cwd: options.cwd } : {}),
  });
  return new TrackedChild(child);
}

/** True when something accepts a connection on the Unix socket right now. */
export async function unixAccepts(socketPath: string): Promise<boolean> {
  if (!existsSync(socketPath)) return false;
  return await new Promise<boolean>((resolveTry) => {
    const socket = connect(socketPath);
    socket.once('connect', () => {
      socket.destroy();
      resolveTry(true);
    });
    socket.once('error', () => resolveTry(false));
  });
}

/**
 * Polls until `socketPath` accepts connections. Resolves 'listening', or 'exited' as soon as
 * the child is gone, or 'timeout' after `timeoutMs` (the caller words the error).
 */
export async function waitForListener(socketPath: string, child: TrackedChild, timeoutMs: number, pollMs = 25): Promise<'listening' | 'exited' | 'timeout'> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!child.running) return 'exited';
    if (await unixAccepts(socketPath)) return 'listening';
    if (Date.now() > deadline) return 'timeout';
    await sleep(pollMs);
  }
}

export interface CompletedRun {
  /** Exit code (null when killed by a signal or the spawn failed). */
  status: number | null;
  stdout: string;
  stderr: string;
  wallMs: number;
  timedOut: boolean;
}

export interface RunOptions {
  timeoutMs: number;
  env?: NodeJS.ProcessEnv;
  /** Written to stdin; without it stdin is /dev/null. */
  input?: string;
  /** Keep only the last this many characters of each stream (default: all). */
  tailChars?: number;
}

/**
 * Runs a tool to completion, SIGKILLed after `timeoutMs`. Never rejects: a spawn failure
 * resolves with status null and the error in stderr. stdin errors are swallowed (a tool may
 * exit before it reads its stdin; an unhandled EPIPE would surface far from here).
 */
export async function runToCompletion(command: string, args: readonly string[], options: RunOptions): Promise<CompletedRun> {
  const startedAt = performance.now();
  const tail = options.tailChars ?? Number.POSITIVE_INFINITY;
  return await new Promise<CompletedRun>((resolveRun) => {
    const stdin = options.input === undefined ? 'ignore' : 'pipe';
    const child = spawn(command, [...args], { env: options.env ?? process.env, stdio: [stdin, 'pipe', 'pipe'] });
    track(child);
    let stdout = '';
    let stderr = '';
    const keep = (text: string): string => (text.length > tail ? text.slice(-tail) : text);
    child.stdout?.on('data', (chunk: Buffer) => (stdout = keep(stdout + chunk.toString())));
    child.stderr?.on('data', (chunk: Buffer) => (stderr = keep(stderr + chunk.toString())));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, options.timeoutMs);
    let settled = false;
    const settle = (status: number | null, extra: string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolveRun({ status, stdout, stderr: `${stderr}${extra}`, wallMs: performance.now() - startedAt, timedOut });
    };
    child.once('error', (error) => settle(null, String(error)));
    child.once('close', (status) => settle(status, ''));
    if (child.stdin !== null) {
      child.stdin.on('error', () => undefined);
      child.stdin.end(options.input);
    }
  });
}
