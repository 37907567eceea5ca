/**
 * Mirror-under-test helpers for the `enbd mirror` suites:
 * - `startMirror`: spawns `enbd mirror ...` as a child process and resolves once its banner
 *   says it listens (the banner is printed only after every listener is bound);
 * - `runMirrorCli`: runs the CLI expecting it to exit (error cases); kills it if it serves;
 * - `startInProcessMirror`: MirrorDevice.open + createNbdServer in this process (fast, for
 *   property tests);
 * - leg readers (`readLegFile`, `copyLegOut`, `readNbd`) and `assertSameBytes`, which reports
 *   the first differing offset instead of dumping megabytes.
 *
 * Threads: test process main thread (the in-process mirror starts its own actor workers).
 * Invariants: every process or in-process mirror started here is stopped by `stopAllMirrors`
 * (call it from `after()`); processes still alive at exit get SIGKILL.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import assert from 'node:assert/strict';
import { createLogger } from '../../src/core/log.js';
import { MirrorDevice, type MirrorOptions } from '../../src/engine/mirror.js';
import type { CopyMode, Placement } from '../../src/engine/messages.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { createNbdServer, type NbdServer } from '../../src/nbd/server/server.js';
import { kConnectionActorEntry } from '../../src/cli/actor-entry.js';
import { enbdCli } from './serve.js';
import { runOk, toolEnv, unixUri } from './tools.js';

export { enbdCli };

const kStartTimeoutMs = 20_000;
const kStopTimeoutMs = 15_000;

export interface MirrorProcess {
  readonly process: ChildProcess;
  /** Export URIs from the banner (`export: ...` lines), Unix socket first. */
  readonly uris: string[];
  /** The first export URI. */
  readonly uri: string;
  stdout(): string;
  stderr(): string;
  alive(): boolean;
  /**
   * Sends `signal` (default SIGTERM) and waits for the exit; SIGKILL after `killAfterMs`
   * (default 15 s), which then reads as exit code 128. Resolves with the exit code.
   */
  stop(signal?: NodeJS.Signals, killAfterMs?: number): Promise<number | null>;
}

export interface StartMirrorOptions {
  legs: string[];
  socketPath?: string;
  /** `--listen` value, e.g. `127.0.0.1:10810`. */
  listen?: string;
  /** Further flags (`--placement inline`, `--size 1M`, ...). */
  args?: string[];
  logLevel?: string;
  cwd?: string;
}

interface Spawned {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  exited: Promise<number | null>;
}

const liveProcesses = new Set<ChildProcess>();
const liveInProcess = new Set<InProcessMirror>();
process.on('exit', () => {
  for (const child of liveProcesses) child.kill('SIGKILL');
});

/**
 * The suites written before on-leg metadata run on raw legs: `enbd mirror ... --leg` gets
 * `--metadata none` (so does one with `--config`) unless the test says `--metadata` itself (the
 * metadata suites do; the embedded default, with neither, keeps its metadata).
 */
export function withMetadataDefault(args: string[]): string[] {
  if (args[0] !== 'mirror' || !(args.includes('--leg') || args.includes('--config')) || args.includes('--metadata')) return args;
  return [...args, '--metadata', 'none'];
}

function spawnCli(rawArgs: string[], cwd: string | undefined): Spawned {
  const args = withMetadataDefault(rawArgs);
  const child = spawn(process.execPath, [enbdCli, ...args], {
    env: { ...toolEnv, ENBD_LOG_JSON: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
    ...(cwd !== undefined ? { cwd } : {}),
  });
  liveProcesses.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout?.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | null>((resolveExit) => {
    child.once('exit', (code, signal) => {
      liveProcesses.delete(child);
      resolveExit(code ?? (signal === null ? null : 128));
    });
  });
  return { child, stdout: () => stdout, stderr: () => stderr, exited };
}

function mirrorArgs(options: StartMirrorOptions): string[] {
  const args = ['mirror'];
  for (const leg of options.legs) args.push('--leg', leg);
  if (options.socketPath !== undefined) args.push('--socket', options.socketPath);
  if (options.listen !== undefined) args.push('--listen', options.listen);
  args.push('--log-level', options.logLevel ?? 'warn', ...(options.args ?? []));
  return args;
}

/** Export URIs listed in a banner. */
export function bannerUris(stdout: string): string[] {
  const uris: string[] = [];
  for (const line of stdout.split('\n')) {
    const match = /^\s*export:\s*(\S+)\s*$/.exec(line);
    if (match?.[1] !== undefined) uris.push(match[1]);
  }
  return uris;
}

/** Starts `enbd mirror` with raw CLI arguments (after `mirror`); resolves once it listens. */
export async function startMirrorArgs(args: string[], cwd?: string): Promise<MirrorProcess> {
  const spawned = spawnCli(['mirror', ...args], cwd);
  const deadline = Date.now() + kStartTimeoutMs;
  // The banner (export lines, then "attach:") is written once every listener is bound.
  while (!/^attach:/m.test(spawned.stdout())) {
    if (spawned.child.exitCode !== null || spawned.child.signalCode !== null) {
      throw new Error(`enbd mirror exited ${String(spawned.child.exitCode)} before listening:\n${spawned.stdout()}\n${spawned.stderr()}`);
    }
    if (Date.now() > deadline) {
      spawned.child.kill('SIGKILL');
      throw new Error(`enbd mirror did not print its banner in ${kStartTimeoutMs} ms:\n${spawned.stdout()}\n${spawned.stderr()}`);
    }
    await sleep(20);
  }
  const uris = bannerUris(spawned.stdout());
  assert.ok(uris.length > 0, `banner lists an export:\n${spawned.stdout()}`);
  const mirror: MirrorProcess = {
    process: spawned.child,
    uris,
    uri: uris[0] as string,
    stdout: spawned.stdout,
    stderr: spawned.stderr,
    alive: () => spawned.child.exitCode === null && spawned.child.signalCode === null,
    stop: async (signal: NodeJS.Signals = 'SIGTERM', killAfterMs = kStopTimeoutMs) => {
      if (mirror.alive()) spawned.child.kill(signal);
      const timer = setTimeout(() => spawned.child.kill('SIGKILL'), killAfterMs);
      const code = await spawned.exited;
      clearTimeout(timer);
      return code;
    },
  };
  return mirror;
}

export async function startMirror(options: StartMirrorOptions): Promise<MirrorProcess> {
  assert.ok(options.socketPath !== undefined || options.listen !== undefined, 'give a socket or a TCP address (never the default 10809)');
  return await startMirrorArgs(mirrorArgs(options).slice(1), options.cwd);
}

export interface CliResult {
  /** Exit code, or null when the CLI was still running at the deadline (it was killed). */
  status: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs `enbd mirror ARGS` expecting it to exit by itself (error cases). If it is still running
 * after `timeoutMs` (it started serving) it is killed and `status` is null.
 */
export async function runMirrorCli(args: string[], options: { cwd?: string; timeoutMs?: number } = {}): Promise<CliResult> {
  const spawned = spawnCli(['mirror', ...args], options.cwd);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    spawned.child.kill('SIGKILL');
  }, options.timeoutMs ?? 15_000);
  const code = await spawned.exited;
  clearTimeout(timer);
  return { status: timedOut ? null : code, stdout: spawned.stdout(), stderr: spawned.stderr() };
}

// ---- in-process mirror ------------------------------------------------------------------------

export interface InProcessMirrorOptions {
  legs: string[];
  socketPath: string;
  placement?: Placement;
  copyMode?: CopyMode;
  sizeBytes?: number;
  ring?: MirrorOptions['ring'];
  /** Further engine options (timeouts, reconnect backoff, resync rates, bitmap sizes). */
  engine?: Partial<Omit<MirrorOptions, 'legs' | 'logger'>>;
}

export interface InProcessMirror {
  device: MirrorDevice;
  server: NbdServer;
  uri: string;
  /** Graceful stop: server drain, flush every leg, stop the actors. Idempotent. */
  close(): Promise<void>;
}

export async function startInProcessMirror(options: InProcessMirrorOptions): Promise<InProcessMirror> {
  const logger = createLogger({ level: process.env['ENBD_TEST_LOG_LEVEL'] ?? 'silent', pretty: false });
  const device = await MirrorDevice.open({
    legs: options.legs,
    actorEntry: kConnectionActorEntry,
    logger,
    logLevel: process.env['ENBD_TEST_LOG_LEVEL'] ?? 'silent',
    ...(options.placement !== undefined ? { placement: options.placement } : {}),
    ...(options.copyMode !== undefined ? { copyMode: options.copyMode } : {}),
    ...(options.sizeBytes !== undefined ? { sizeBytes: options.sizeBytes } : {}),
    ...(options.ring !== undefined ? { ring: options.ring } : {}),
    ...(options.engine ?? {}),
  });
  const server = createNbdServer({ device, logger });
  let closed = false;
  const mirror: InProcessMirror = {
    device,
    server,
    uri: unixUri(options.socketPath),
    close: async () => {
      if (closed) return;
      closed = true;
      liveInProcess.delete(mirror);
      await server.close();
      const errno = await device.flushAll();
      await device.close();
      assert.equal(errno, 0, 'final flush of the legs succeeded');
    },
  };
  liveInProcess.add(mirror);
  try {
    await server.listenUnix(options.socketPath);
  } catch (error) {
    await mirror.close();
    throw error;
  }
  return mirror;
}

/** Stops every in-process mirror and kills every mirror process still alive (for `after()`). */
export async function stopAllMirrors(): Promise<void> {
  await Promise.all([...liveInProcess].map(async (mirror) => await mirror.close()));
  for (const child of liveProcesses) child.kill('SIGKILL');
}

// ---- leg contents -----------------------------------------------------------------------------

export function readLegFile(path: string): Buffer {
  return readFileSync(path);
}

/**
 * Copies a whole NBD export out with nbdcopy and returns its bytes. nbdcopy (libnbd 1.14)
 * ignores the advertised maximum block size: pass `requestBytes` for exports with a small one.
 */
export async function copyLegOut(uri: string, outputPath: string, requestBytes?: number): Promise<Buffer> {
  const size = requestBytes === undefined ? [] : [`--request-size=${requestBytes}`];
  await runOk('nbdcopy', ['--flush', ...size, uri, outputPath], { timeoutMs: 120_000 });
  return readFileSync(outputPath);
}

/** Reads a range of an NBD export with a fresh NbdClient connection. */
export async function readNbd(uri: string, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
  const client = await NbdClient.connect(uri);
  try {
    return await client.read(offsetBytes, lengthBytes);
  } finally {
    await client.close();
  }
}

/** First offset where the two differ, or -1. */
export function firstDifference(left: Uint8Array, right: Uint8Array): number {
  const length = Math.min(left.length, right.length);
  const leftBuffer = Buffer.from(left.buffer, left.byteOffset, left.byteLength);
  const rightBuffer = Buffer.from(right.buffer, right.byteOffset, right.byteLength);
  if (length === left.length && length === right.length && leftBuffer.equals(rightBuffer)) return -1;
  const step = 64 * 1024;
  for (let start = 0; start < length; start += step) {
    const end = Math.min(length, start + step);
    if (leftBuffer.subarray(start, end).equals(rightBuffer.subarray(start, end))) continue;
    for (let index = start; index < end; index += 1) if (left[index] !== right[index]) return index;
  }
  return length;
}

/** Asserts equal bytes; the message names both sides and the first differing offset. */
export function assertSameBytes(left: Uint8Array, right: Uint8Array, what: string): void {
  assert.equal(left.length, right.length, `${what}: lengths ${left.length} and ${right.length}`);
  const at = firstDifference(left, right);
  if (at >= 0) {
    assert.fail(`${what}: first difference at offset ${at} (0x${at.toString(16)}): ${left[at]} vs ${right[at]}`);
  }
}

/** Asserts every byte of `data[offset, offset+length)` equals `value`. */
export function assertFilled(data: Uint8Array, offsetBytes: number, lengthBytes: number, value: number, what: string): void {
  const view = data.subarray(offsetBytes, offsetBytes + lengthBytes);
  assert.equal(view.length, lengthBytes, `${what}: range inside the data`);
  const index = view.findIndex((byte) => byte !== value);
  if (index >= 0) assert.fail(`${what}: byte at ${offsetBytes + index} is ${view[index]}, expected ${value}`);
}
