/**
 * Process management for benchmark servers: spawn as children of the harness (foreground,
 * never daemonized), wait until their Unix socket exists, stop them (SIGTERM, then SIGKILL
 * to the whole tree), and kill everything left if the harness itself is interrupted. Also
 * short-lived tools run to completion (`runTool`: nbdcopy for the resync measurements).
 * Threads: harness main thread.
 *
 * The spawning, the registry, the readiness probe and the tool runner are harness/process.ts
 * (shared with the tests); this file adds the bench's log files, labels and process trees.
 *
 * Invariants:
 * - Every spawned process is in the harness registry until its 'exit' event; `killAllSync`
 *   reaches it and (setDescendantsOf) its descendants.
 * - A server's stdout and stderr go to a log file (never a pipe that could fill and block it);
 *   a tool's output is drained and only its tail kept.
 * - A process whose stop() was called is `stopRequested`: its exit is not a death.
 * - `start` resolves only when the socket path exists and the process is still running; it
 *   rejects with the tail of the log otherwise (the harness reports it as a failed row).
 */
import { closeSync, openSync, readFileSync, rmSync } from 'node:fs';
import { assert } from '../../src/core/assert.js';
import {
  killAllSync, killQuietly, runToCompletion, setDescendantsOf, spawnTracked, waitForListener, type TrackedChild,
} from '../../harness/process.js';
import { descendantPids } from './cpu.js';

export { killAllSync };

// the harness's exit handler also kills what a server forked (nbdkit plugins, enbd workers)
setDescendantsOf(descendantPids);

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

export class ManagedProcess {
  readonly spec: ProcessSpec;
  private readonly tracked: TrackedChild;
  private stopCalled = false;

  constructor(spec: ProcessSpec, tracked: TrackedChild) {
    assert(tracked.process.pid !== undefined, `${spec.label}: spawn gave no pid`);
    this.spec = spec;
    this.tracked = tracked;
  }

  get pid(): number {
    assert(this.tracked.process.pid !== undefined);
    return this.tracked.process.pid;
  }

  get running(): boolean {
    return this.tracked.running;
  }

  /** stop() was called: the process is gone on purpose (e.g. a leg a case takes down). */
  get stopRequested(): boolean {
    return this.stopCalled;
  }

  exitDescription(): string {
    if (this.running) return 'running';
    if (this.tracked.process.signalCode !== null) return `killed by ${this.tracked.process.signalCode}`;
    return `exited with code ${String(this.tracked.process.exitCode)}`;
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
    await this.tracked.stop(signal, kStopGraceMs);
    for (const pid of descendants) killQuietly(pid, 'SIGKILL');
    rmSync(this.spec.socketPath, { force: true });
    assert(!this.running);
  }
}

/** Spawns spec and waits until its socket exists; rejects (after cleanup) if it never does. */
export async function startProcess(spec: ProcessSpec): Promise<ManagedProcess> {
  assert(spec.args.every((arg) => typeof arg === 'string'));
  rmSync(spec.socketPath, { force: true }); // nbdkit leaves stale sockets behind
  const logFd = openSync(spec.logPath, 'a');
  let tracked: TrackedChild;
  try {
    tracked = spawnTracked(spec.command, spec.args, { output: logFd, env: spec.env ?? process.env });
  } finally {
    closeSync(logFd);
  }
  if (tracked.process.pid === undefined) {
    await tracked.exited; // the 'error' event of a failed spawn (ENOENT) has come
    throw new Error(`${spec.label}: cannot spawn ${spec.command}: ${String(tracked.spawnError ?? 'no pid')}`);
  }
  const managed = new ManagedProcess(spec, tracked);
  // The socket file appears at bind(), before listen(): waitForListener probes with a connect.
  const outcome = await waitForListener(spec.socketPath, tracked, spec.readyTimeoutMs ?? kDefaultReadyTimeoutMs, kReadyPollMs);
  if (outcome !== 'listening') {
    const reason = outcome === 'timeout' ? 'socket did not appear in time' : managed.exitDescription();
    await managed.stop();
    throw new Error(`${spec.label}: failed to start (${reason})\n${managed.logTail()}`);
  }
  return managed;
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
 * in the harness registry while it runs, so Ctrl-C and killAllSync reach it too. Never rejects.
 */
export async function runTool(command: string, args: readonly string[], timeoutMs: number): Promise<ToolRun> {
  const result = await runToCompletion(command, args, { timeoutMs, tailChars: kToolOutputTailChars });
  const killed = result.timedOut ? `\n(killed after ${timeoutMs} ms)` : '';
  const output = `${`${result.stdout}${result.stderr}`.slice(-kToolOutputTailChars)}${killed}`.trim();
  return { status: result.status, wallMs: result.wallMs, output };
}
