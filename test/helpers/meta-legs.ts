/**
 * Helpers for the on-leg metadata scenario suites (issue 11): nbdkit file legs that can be
 * stopped and started again on the same Unix socket (so a daemon's --leg URI stays valid and
 * the leg's bytes survive in its file), the real `enbd create` / `enbd examine --json`, an
 * `enbd mirror --metadata leg` started with a control socket and short fault timeouts, the
 * daemon's pino JSON log records, and reads of a leg file's data area.
 *
 * Threads: test process main thread; nbdkit, the daemon and the CLI are child processes.
 * Invariants: every nbdkit started here is tracked until `MetaLegs.stopAll`; every mirror goes
 * through test/helpers/mirror.ts (reaped by `stopAllMirrors`); `--metadata leg` is always passed
 * explicitly (mirror.ts would append `--metadata none` otherwise).
 */
import { truncateSync, writeFileSync } from 'node:fs';
import assert from 'node:assert/strict';
import { enbdCli, run } from './serve.js';
import { logLines, readRange, startNbdkit, unixUri, type Child, type Scratch } from './tools.js';
import { assertSameBytes, startMirror, type MirrorProcess } from './mirror.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { MirrorControl } from './fault-legs.js';

/** Short fault timeouts so a lost or returning leg plays out in well under a second or two. */
export const kMetaMirrorFlags = [
  '--metadata', 'leg',
  '--leg-timeout', '1000',
  '--reconnect-min', '50',
  '--reconnect-max', '300',
  '--fence-timeout', '3000',
  '--probe-timeout', '1000',
  '--idle-probe', '300',
];

/** An nbdkit file leg on a fixed Unix socket; stop/start keep the socket path and the file. */
export class FileLeg {
  child: Child | null = null;

  /** `nbdkitArgs`: filters and their parameters, e.g. ['--filter=delay', 'delay-write=20ms']. */
  constructor(readonly file: string, readonly socket: string, private readonly nbdkitArgs: string[] = []) {}

  get uri(): string {
    return unixUri(this.socket);
  }

  async start(): Promise<void> {
    assert.equal(this.child, null, `leg ${this.file} is already served`);
    const filters = this.nbdkitArgs.filter((arg) => arg.startsWith('--'));
    const params = this.nbdkitArgs.filter((arg) => !arg.startsWith('--'));
    this.child = await startNbdkit(this.socket, ['file', this.file, ...params], filters);
  }

  /** SIGKILL: the leg vanishes at once (its file keeps every byte nbdkit wrote). */
  async stop(): Promise<void> {
    const child = this.child;
    this.child = null;
    if (child !== null) await child.stop('SIGKILL');
  }

  /** Replaces the backing file with a blank (all zero, sparse) one of the same size. */
  blank(sizeBytes: number): void {
    assert.equal(this.child, null, 'blank a leg only while its nbdkit is stopped');
    writeFileSync(this.file, '');
    truncateSync(this.file, sizeBytes);
  }

  /** The first `dataSizeBytes` of the backing file (the leg's data area). */
  dataArea(dataSizeBytes: number): Buffer {
    return readRange(this.file, 0, dataSizeBytes);
  }
}

/**
 * Compares two legs' data areas slice by slice (large legs are not read whole); fails naming the
 * first differing offset.
 */
/** Writes `data` at `offsetBytes` through a fresh NBD connection (4 MiB requests), then FLUSH. */
export async function writeFlush(uri: string, offsetBytes: number, data: Buffer): Promise<void> {
  const piece = 4 * 1024 * 1024;
  const client = await NbdClient.connect(uri);
  try {
    for (let at = 0; at < data.length; at += piece) await client.write(offsetBytes + at, data.subarray(at, Math.min(data.length, at + piece)));
    await client.flush();
  } finally {
    await client.close();
  }
}

/** Every leg's data area equals leg 0's (compared in memory); returns leg 0's. */
export function assertLegsIdentical(legs: FileLeg[], dataSizeBytes: number, what: string): Buffer {
  const first = (legs[0] as FileLeg).dataArea(dataSizeBytes);
  for (const [index, leg] of legs.entries()) {
    if (index > 0) assertSameBytes(leg.dataArea(dataSizeBytes), first, `${what}: data area of leg ${index} vs leg 0`);
  }
  return first;
}

export function assertSameDataAreas(left: FileLeg, right: FileLeg, dataSizeBytes: number, what: string): void {
  const slice = 16 * 1024 * 1024;
  for (let at = 0; at < dataSizeBytes; at += slice) {
    const length = Math.min(slice, dataSizeBytes - at);
    const a = readRange(left.file, at, length);
    const b = readRange(right.file, at, length);
    if (a.equals(b)) continue;
    let index = 0;
    while (a[index] === b[index]) index += 1;
    assert.fail(`${what}: data areas of ${left.file} and ${right.file} first differ at offset ${at + index}`);
  }
}

export class MetaLegs {
  private readonly legs: FileLeg[] = [];

  constructor(readonly dir: Scratch, readonly legBytes: number) {}

  /** A sparse file leg, served by nbdkit on `<name>.sock` (optionally behind filters). */
  async leg(name: string, nbdkitArgs: string[] = [], legBytes = this.legBytes): Promise<FileLeg> {
    const file = this.dir.path(`${name}.img`);
    writeFileSync(file, '');
    truncateSync(file, legBytes);
    const leg = new FileLeg(file, this.dir.path(`${name}.sock`), nbdkitArgs);
    await leg.start();
    this.legs.push(leg);
    return leg;
  }

  async stopAll(): Promise<void> {
    await Promise.all(this.legs.map(async (leg) => await leg.stop()));
  }
}

export interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

export async function enbd(...args: string[]): Promise<CliResult> {
  return await run(process.execPath, [enbdCli, ...args], { timeoutMs: 30_000 });
}

export async function enbdOk(...args: string[]): Promise<string> {
  const result = await enbd(...args);
  assert.equal(result.status, 0, `enbd ${args.join(' ')} exits 0:\n${result.stdout}\n${result.stderr}`);
  return result.stdout;
}

/** `enbd create --leg ... [extra]`. */
export async function createArray(legs: FileLeg[], extra: string[] = []): Promise<void> {
  await enbdOk('create', ...legs.flatMap((leg) => ['--leg', leg.uri]), ...extra);
}

export interface ExamineCopy {
  copyIndex: number;
  offsetBytes: number;
  status: string;
  reason: string | null;
  sequence: number | null;
  events: number | null;
}

export interface ExamineJson {
  uri: string;
  legSizeBytes: number;
  usedCopy: number | null;
  copies: ExamineCopy[];
  superblock: {
    arrayUuid: string;
    legUuid: string;
    slotIndex: number;
    dataSizeBytes: number;
    events: number;
    state: string;
    owner: { host: string; pid: number; heartbeatMs: number } | null;
    members: Array<{ legUuid: string; state: string; events: number }>;
    /** Generation history, newest first (absent in metadata from before it). */
    generations?: string[];
  } | null;
  dirtyChunks: number | null;
}

/** `enbd examine URI --json`; `expectOk` false allows exit 1 (no valid metadata). */
export async function examine(uri: string, expectOk = true): Promise<ExamineJson> {
  const result = await enbd('examine', uri, '--json');
  if (expectOk) assert.equal(result.status, 0, `enbd examine ${uri}:\n${result.stderr}`);
  return JSON.parse(result.stdout) as ExamineJson;
}

export async function dataSizeOf(leg: FileLeg): Promise<number> {
  const report = await examine(leg.uri);
  assert.ok(report.superblock !== null, `${leg.uri} carries a superblock`);
  return report.superblock.dataSizeBytes;
}

export interface MetaMirror {
  mirror: MirrorProcess;
  control: MirrorControl;
  /** SIGTERM (clean stop, final metadata written) or SIGKILL; resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** `enbd mirror --metadata leg` on the legs, with a control socket; log level info (JSON on stderr). */
export async function startMetaMirror(dir: Scratch, legs: FileLeg[], name: string, extra: string[] = []): Promise<MetaMirror> {
  const controlPath = dir.path(`mirror-${name}.ctl`);
  const mirror = await startMirror({
    legs: legs.map((leg) => leg.uri),
    socketPath: dir.path(`mirror-${name}.sock`),
    args: ['--control', controlPath, ...kMetaMirrorFlags, ...extra],
    logLevel: 'info',
  });
  const control = await MirrorControl.connect(controlPath);
  return {
    mirror,
    control,
    stop: async (signal: NodeJS.Signals = 'SIGTERM') => {
      control.close();
      return await mirror.stop(signal, 10_000);
    },
  };
}

export interface LogRecord {
  msg?: string;
  leg?: number;
  [key: string]: unknown;
}

/** The daemon's pino JSON records (stderr), optionally only those with message `msg`. */
export function logRecords(stderr: string, msg?: string): LogRecord[] {
  return logLines(stderr).filter((record) => msg === undefined || record.msg === msg);
}

/** The 'leg assembled' record of leg `index` (role, why, dirtyBytes). */
export function assembledRecord(stderr: string, index: number): LogRecord {
  const record = logRecords(stderr, 'leg assembled').find((entry) => entry.leg === index);
  assert.ok(record !== undefined, `the daemon logged how leg ${index} was assembled:\n${stderr.slice(0, 4000)}`);
  return record;
}
