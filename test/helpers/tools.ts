/**
 * Test helpers for real NBD programs: tool detection that fails loudly under CI, scratch
 * directories, free ports, and child processes (nbdkit, enbd) that are always cleaned up (the
 * process harness itself is harness/process.ts, shared with the bench).
 * Threads: test process main thread.
 */
import { spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, readSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { TestContext } from 'node:test';
import { runToCompletion, spawnTracked, unixAccepts, waitForListener, type TrackedChild } from '../../harness/process.js';

export { unixAccepts };

export const isCi = process.env['CI'] === 'true' || process.env['CI'] === '1';
export const repoRoot = resolve(new URL('../../../', import.meta.url).pathname);
export const enbdMain = join(repoRoot, 'dist/src/cli/main.js');

/** PATH with /usr/bin first so nbdsh finds Debian's python3 with the nbd module. */
export const toolEnv: NodeJS.ProcessEnv = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env['PATH'] ?? ''}` };

const found = new Map<string, boolean>();
export function hasTool(name: string): boolean {
  let known = found.get(name);
  if (known === undefined) {
    known = spawnSync('sh', ['-c', `command -v ${name}`], { env: toolEnv }).status === 0;
    found.set(name, known);
  }
  return known;
}

function missingToolsReason(tools: readonly string[]): string | null {
  const missing = tools.filter((tool) => !hasTool(tool));
  return missing.length === 0 ? null : `required tool(s) missing: ${missing.join(', ')}`;
}

/**
 * For `describe(name, { skip: skipUnlessTools(...) })`: false when every tool is present;
 * otherwise throws under CI (a missing install step must never turn the suite green) or
 * returns a loud reason.
 */
export function skipUnlessTools(...tools: string[]): string | false {
  const reason = missingToolsReason(tools);
  if (reason === null) return false;
  if (isCi) throw new Error(`${reason} (CI must install them; see .ci/run)`);
  process.stderr.write(`SKIP: ${reason}\n`);
  return reason;
}

/**
 * Returns true when every tool is present. Otherwise: under CI (or with no test context)
 * throws; elsewhere skips the test with a loud reason.
 */
export function requires(t: TestContext | null, ...tools: string[]): boolean {
  if (t === null) {
    const reason = missingToolsReason(tools);
    if (reason !== null) throw new Error(`${reason} (CI must install them; see .ci/run)`);
    return true;
  }
  const reason = skipUnlessTools(...tools);
  if (reason === false) return true;
  t.skip(reason);
  return false;
}

/**
 * nbdkit memory legs for a suite: each gets a fresh socket in the scratch folder; `stopAll`
 * (in the suite's `after`) kills every one started.
 */
export class MemoryLegs {
  private seq = 0;
  readonly children: Child[] = [];
  constructor(private readonly dir: () => Scratch, private readonly sizeBytes: number) {}

  async start(sizeBytes = this.sizeBytes): Promise<{ socket: string; uri: string; child: Child }> {
    this.seq += 1;
    const socket = this.dir().path(`leg${this.seq}.sock`);
    const child = await startNbdkit(socket, ['memory', String(sizeBytes)]);
    this.children.push(child);
    return { socket, uri: unixUri(socket), child };
  }

  async stopAll(): Promise<void> {
    await Promise.all(this.children.map(async (child) => await child.stop('SIGKILL')));
  }
}

export interface Scratch {
  dir: string;
  path(name: string): string;
  cleanup(): void;
}

export function scratch(prefix = 'enbd-test-'): Scratch {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return {
    dir,
    path: (name: string) => join(dir, name),
    // ENBD_KEEP_SCRATCH=1 keeps it (legs, logs) to look at after a failure.
    cleanup: () => {
      if (process.env['ENBD_KEEP_SCRATCH'] === '1') process.stderr.write(`scratch kept: ${dir}\n`);
      else rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Creates (or truncates) `path` as a sparse file of `sizeBytes` zeros; returns the path. */
export function sparseFile(path: string, sizeBytes: number): string {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, sizeBytes);
  } finally {
    closeSync(fd);
  }
  return path;
}

/** One pino JSON record of a daemon's stderr. */
export interface LogLine {
  msg: string;
  [key: string]: unknown;
}

/** The daemon's pino JSON records: the stderr lines that parse as JSON and carry a string msg. */
export function logLines(stderr: string): LogLine[] {
  const lines: LogLine[] = [];
  for (const text of stderr.split('\n')) {
    if (!text.startsWith('{')) continue;
    try {
      const parsed = JSON.parse(text) as LogLine;
      if (typeof parsed.msg === 'string') lines.push(parsed);
    } catch {
      // a partial last line
    }
  }
  return lines;
}

export async function freePort(): Promise<number> {
  return await new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close(() => resolvePort(port));
    });
  });
}

export async function waitFor(what: string, predicate: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(25);
  }
}

/** Reads exactly `lengthBytes` of a file at `offsetBytes` (a leg image, a served file). */
export function readRange(path: string, offsetBytes: number, lengthBytes: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buffer = Buffer.alloc(lengthBytes);
    const got = readSync(fd, buffer, 0, lengthBytes, offsetBytes);
    if (got !== lengthBytes) throw new Error(`short read of ${path} at ${offsetBytes}: ${got} of ${lengthBytes} bytes`);
    return buffer;
  } finally {
    closeSync(fd);
  }
}

/**
 * Sends SIGSTOP and waits until the kernel shows the process stopped (/proc state T): kill()
 * only queues the signal, so a request sent right after it could still be answered.
 */
export async function stopProcess(pid: number, timeoutMs = 5000): Promise<void> {
  process.kill(pid, 'SIGSTOP');
  await waitFor(`process ${pid} stopped`, () => {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
      return state === 'T' || state === 't';
    } catch {
      return false;
    }
  }, timeoutMs);
}

/**
 * Waits until a server accepts connections on `socketPath`. The socket file alone is not
 * enough: a server binds (creating the file) before it listens, and a connect in between is
 * refused.
 */
export async function waitForUnixListener(what: string, socketPath: string, child: Child, timeoutMs = 20_000): Promise<void> {
  const outcome = await waitForListener(socketPath, child.tracked, timeoutMs);
  if (outcome === 'exited') {
    throw new Error(`${what} exited ${String(child.process.exitCode ?? child.process.signalCode)} before listening on ${socketPath}:\n${child.output()}`);
  }
  if (outcome === 'timeout') throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} to listen on ${socketPath}`);
}

export interface Child {
  process: ChildProcess;
  /** The harness's handle (exit promise, registry): harness/process.ts. */
  tracked: TrackedChild;
  output(): string;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** A child of the test (harness/process.ts reaps it at exit), its output collected. */
export function startChild(command: string, args: string[], options: { env?: NodeJS.ProcessEnv } = {}): Child {
  const tracked = spawnTracked(command, args, { env: options.env ?? toolEnv });
  let output = '';
  tracked.process.stdout?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  tracked.process.stderr?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  return {
    process: tracked.process,
    tracked,
    output: () => output,
    stop: async (signal: NodeJS.Signals = 'SIGTERM') => await tracked.stop(signal, 10_000),
  };
}

/** nbdkit in the foreground (-f) on a Unix socket, as a child of the test; resolves once listening. */
export async function startNbdkit(socketPath: string, pluginArgs: string[], extraArgs: string[] = []): Promise<Child> {
  rmSync(socketPath, { force: true });
  const child = startChild('nbdkit', ['-f', '--unix', socketPath, ...extraArgs, ...pluginArgs]);
  try {
    await waitForUnixListener('nbdkit', socketPath, child);
  } catch (error) {
    await child.stop('SIGKILL');
    throw error;
  }
  return child;
}

export function unixUri(socketPath: string, exportName = ''): string {
  return `nbd+unix:///${exportName}?socket=${socketPath}`;
}

export interface RunResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs a tool to completion (async, so servers in this process keep serving): harness/process.ts
 * runToCompletion with the tools' PATH. stdin is /dev/null unless `input` is given; a spawn
 * failure (ENOENT) resolves with status null and the error in stderr.
 */
export async function run(command: string, args: string[], options: { timeoutMs?: number; input?: string } = {}): Promise<RunResult> {
  const result = await runToCompletion(command, args, {
    env: toolEnv,
    timeoutMs: options.timeoutMs ?? 120_000,
    ...(options.input !== undefined ? { input: options.input } : {}),
  });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** Like run, but throws with the tool's output when it exits non-zero. */
export async function runOk(command: string, args: string[], options: { timeoutMs?: number; input?: string } = {}): Promise<RunResult> {
  const result = await run(command, args, options);
  if (result.status !== 0) {
    throw new Error(`${command} ${args.join(' ')} exited ${String(result.status)}\n${result.stdout}\n${result.stderr}`);
  }
  return result;
}
