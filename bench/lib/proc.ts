/**
 * Process management for benchmark servers: spawn as children of the harness (foreground,
 * never daemonized), wait until their Unix socket exists, stop them (SIGTERM, then SIGKILL
 * to the whole tree), and kill everything left if the harness itself is interrupted. Also
 * short-lived tools run to completion (`runTool`: nbdcopy for the resync measurements).
 * Threads: harness main thread.
 *
 * Invariants:
 * - Every spawned process is in `live` until its 'exit' event; `killAllSync` reaches it.
 * - A server's stdout and stderr go to a log file (never a pipe that could fill and block it);
 *   a tool's output is drained and only its tail kept.
 * - A process whose stop() was called is `stopRequested`: its exit is not a death.
 * - `start` resolves only when the socket path exists and the process is still running; it
 *   rejects with the tail of the log otherwise (the harness reports it as a failed row).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { assert } from '../../src/core/assert.js';
import { descendantPids } from './cpu.js';

const kReadyPollMs = 20;
const kDefaultReadyTimeoutMs = 15_000;
const kStopGraceMs = 3_000;
const kLogTailBytes = 2_000;

export type ProcessRole = 'server' | 'leg';

export interface ProcessSpec {
  /** Label used in messages, e.g. 'nbdkit-file' or 'leg-1'. */
  label: string;
  command: string;
  args: readonly string[];
  /** The process is ready once this Unix socket path exists. */
  socketPath: string;
  /** 'server' processes are the ones whose CPU the harness reports. */
  role: ProcessRole;
  logPath: string;
  env?: NodeJS.ProcessEnv;
  readyTimeoutMs?: number;
}

const live = new Set<ChildProcess>();

export class ManagedProcess {
  readonly spec: ProcessSpec;
  private readonly child: ChildProcess;
  private readonly exited: Promise<void>;
  private stopCalled = false;

  constructor(spec: ProcessSpec, child: ChildProcess) {
    assert(child.pid !== undefined, `${spec.label}: spawn gave no pid`);
    this.spec = spec;
    this.child = child;
    this.exited = new Promise((resolveExit) => child.once('exit', () => resolveExit()));
  }

  get pid(): number {
    assert(this.child.pid !== undefined);
    return this.child.pid;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** stop() was called: the process is gone on purpose (e.g. a leg a case takes down). */
  get stopRequested(): boolean {
    return this.stopCalled;
  }

  exitDescription(): string {
    if (this.running) return 'running';
    if (this.child.signalCode !== null) return `killed by ${this.child.signalCode}`;
    return `exited with code ${String(this.child.exitCode)}`;
  }

  logTail(): string {
    try {
      const text = readFileSync(this.spec.logPath, 'utf8');
      return text.slice(-kLogTailBytes).trim();
    } catch {
      return '';
    }
  }

  /**
   * SIGTERM (or `signal`: SIGKILL to simulate a crash), wait up to kStopGraceMs, then SIGKILL
   * the process and its descendants.
   */
  async stop(signal: 'SIGTERM' | 'SIGKILL' = 'SIGTERM'): Promise<void> {
    this.stopCalled = true;
    const descendants = this.running ? descendantPids(this.pid) : [];
    if (this.running) this.child.kill(signal);
    const timedOut = await Promise.race([
      this.exited.then(() => false),
      sleep(kStopGraceMs).then(() => true),
    ]);
    if (timedOut) this.child.kill('SIGKILL');
    await this.exited;
    for (const pid of descendants) killQuietly(pid, 'SIGKILL');
    rmSync(this.spec.socketPath, { force: true });
    assert(!this.running);
  }
}

function killQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // already gone
  }
}

/** Spawns spec and waits until its socket exists; rejects (after cleanup) if it never does. */
export async function startProcess(spec: ProcessSpec): Promise<ManagedProcess> {
  assert(spec.args.every((arg) => typeof arg === 'string'));
  rmSync(spec.socketPath, { force: true }); // nbdkit leaves stale sockets behind
  const logFd = openSync(spec.logPath, 'a');
  let child: ChildProcess;
  try {
    child = spawn(spec.command, [...spec.args], {
      stdio: ['ignore', logFd, logFd],
      env: spec.env ?? process.env,
    });
  } finally {
    closeSync(logFd);
  }
  const spawnError = new Promise<Error>((resolveError) => child.once('error', resolveError));
  let failure: Error | null = null;
  void spawnError.then((error) => (failure = error));
  // Wait a tick so an ENOENT spawn error is reported before we look at pid.
  await sleep(0);
  if (failure !== null || child.pid === undefined) {
    throw new Error(`${spec.label}: cannot spawn ${spec.command}: ${String(failure ?? 'no pid')}`);
  }
  live.add(child);
  child.once('exit', () => live.delete(child));
  const managed = new ManagedProcess(spec, child);
  const deadline = Date.now() + (spec.readyTimeoutMs ?? kDefaultReadyTimeoutMs);
  // The socket file appears at bind(), before listen(): probe with a real connect.
  while (!(await unixAccepts(spec.socketPath))) {
    if (!managed.running || Date.now() > deadline) {
      const reason = managed.running ? 'socket did not appear in time' : managed.exitDescription();
      await managed.stop();
      throw new Error(`${spec.label}: failed to start (${reason})\n${managed.logTail()}`);
    }
    await sleep(kReadyPollMs);
  }
  return managed;
}

async function unixAccepts(socketPath: string): Promise<boolean> {
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

export interface ToolRun {
  /** Exit code (null when killed by a signal or the spawn failed). */
  status: number | null;
  wallMs: number;
  /** Last kToolOutputTailChars of stdout + stderr. */
  output: string;
}

const kToolOutputTailChars = 2_000;

/**
 * Runs a short-lived tool (nbdcopy...) to completion, SIGKILLed after timeoutMs. The child is
 * in `live` while it runs, so Ctrl-C and killAllSync reach it too. Never rejects.
 */
export async function runTool(command: string, args: readonly string[], timeoutMs: number): Promise<ToolRun> {
  const startedAt = performance.now();
  return await new Promise<ToolRun>((resolveRun) => {
    const child = spawn(command, [...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    live.add(child);
    let output = '';
    const collect = (chunk: Buffer): void => {
      output = (output + chunk.toString()).slice(-kToolOutputTailChars);
    };
    child.stdout?.on('data', collect);
    child.stderr?.on('data', collect);
    const timer = setTimeout(() => {
      output += `\n(killed after ${timeoutMs} ms)`;
      child.kill('SIGKILL');
    }, timeoutMs);
    let settled = false;
    const settle = (status: number | null, extra: string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      live.delete(child);
      resolveRun({ status, wallMs: performance.now() - startedAt, output: `${output}${extra}`.trim() });
    };
    child.once('error', (error) => settle(null, `\n${String(error)}`));
    child.once('close', (code) => settle(code, ''));
  });
}

/** Synchronous last-resort cleanup (signal handlers, process 'exit'). */
export function killAllSync(): void {
  for (const child of live) {
    if (child.pid !== undefined) {
      for (const pid of descendantPids(child.pid)) killQuietly(pid, 'SIGKILL');
    }
    child.kill('SIGKILL');
  }
  live.clear();
}

process.on('exit', killAllSync);
