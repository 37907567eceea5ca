/**
 * `enbd backup` and `enbd backup-apply`: the copy itself (changed-block tracking, issue 17).
 * Loaded on demand by src/cli/backup-command.ts, so only these two commands pay for the NBD
 * client.
 *
 * Thread: the CLI's main thread (a short-lived process): control calls to the daemon, one NBD
 * connection to the export for the reads, synchronous positional writes into the output file.
 *
 * Design notes: a backup in two commands
 * | step                                   | what happens                                         |
 * |----------------------------------------|------------------------------------------------------|
 * | enbd backup --to full.img              | the daemon creates CP (seeded with writes in flight),|
 * |   --new-checkpoint CP                  | then the whole device is copied (writes during the   |
 * |                                        | copy are in CP too)                                  |
 * | enbd backup --since CP --to inc.img    | one engine step freezes CP and starts CP2; only CP's |
 * |   --new-checkpoint CP2                 | changed extents are copied; CP is removed after      |
 *
 * Order of one incremental backup (what overlaps what; a round trip is ~1 ms, the copy most):
 * | control connection                 | NBD connection / output file                          |
 * |------------------------------------|-------------------------------------------------------|
 * | status and freeze sent together    |                                                       |
 * | runs (after freeze: all of CP)     | connect + handshake (meanwhile); then FILE opened and |
 * |                                    | truncated to the device size                          |
 * |                                    | reads: up to kBytesInFlight in flight (at most        |
 * |                                    | kLanesMax requests of <= kPieceBytes), each written   |
 * |                                    | with one pwrite at its offset as it arrives           |
 * |                                    | FILE.json.tmp written; FILE and it fsynced together;  |
 * |                                    | renamed to FILE.json; the directory fsynced           |
 * | remove CP                          |                                                       |
 *
 * Output: FILE is a sparse image of the device size holding the copied extents at their
 * offsets (holes elsewhere); FILE.json lists the extents (`offsetBytes`, `lengthBytes`) so a
 * restore knows which holes are "unchanged" and which are zeros that were written.
 * Restore: the full image, then each increment's extents in order (`enbd backup-apply`).
 *
 * Invariants:
 * - No read is sent before the daemon answered checkpoint.create / checkpoint.freeze: every
 *   write the copy might miss is in the new checkpoint. FILE is not touched before that answer
 *   either (a refused backup leaves an earlier FILE of the same name as it was).
 * - The frozen checkpoint is removed only after FILE and FILE.json are complete and synced (and
 *   the rename of FILE.json is synced in its directory); a failed backup leaves it frozen (run
 *   the same `--since` again, without --new-checkpoint).
 * - Bounded: at most kLanesMax reads and kBytesInFlight bytes in flight; buffers are allocated
 *   once per lane.
 */
import { closeSync, fsync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { open, readFile, rename } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { ControlClient } from '../control/client.js';
import type { CheckpointRunsResult } from '../control/protocol.js';
import { assert } from '../core/assert.js';
import { EnbdError } from '../core/errors.js';
import { NbdClient } from '../nbd/client/client.js';
import { resolveControlPath, type ControlOption } from './control-option.js';

/** Largest single READ (an extent longer than this is read in pieces). */
const kPieceBytes = 4 * 1024 * 1024;
/** Most reads in flight (scattered 64 KiB extents: the daemon's per-request cost dominates). */
const kLanesMax = 64;
/** Most bytes in flight (lanes x their buffer). */
const kBytesInFlight = 64 * 1024 * 1024;
export const kBackupFormat = 'enbd-backup-1';

assert(kPieceBytes <= kBytesInFlight, 'one piece fits the in-flight bound');

export interface BackupExtent {
  offsetBytes: number;
  lengthBytes: number;
}

export interface BackupManifest {
  format: typeof kBackupFormat;
  /** The checkpoint the extents changed since (null: a full copy). */
  since: string | null;
  /** The checkpoint started by this backup (the next --since), or null. */
  checkpoint: string | null;
  sizeBytes: number;
  createdMs: number;
  changedBytes: number;
  extents: BackupExtent[];
}

export interface BackupOptions extends ControlOption {
  since?: string;
  to: string;
  newCheckpoint?: string;
  uri?: string;
}

/** What one backup did, for `enbd backup --timings` and the bench. */
export interface BackupReport {
  manifest: BackupManifest;
  /** [phase, ms since the process's time origin] in the order reached. */
  phases: Array<[string, number]>;
  reads: number;
  writes: number;
  bytesCopied: number;
  lanes: number;
}

function exportUri(options: BackupOptions, exportName: string): string {
  if (options.uri !== undefined) return options.uri;
  const control = resolveControlPath(options.control);
  if (!control.endsWith('.ctl')) throw new EnbdError('ENBD_ERR_CONFIG', `cannot tell the export from the control socket ${control}; pass --uri`);
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${encodeURIComponent(control.slice(0, -'.ctl'.length))}`;
}

/** The checks that need no daemon, before anything is sent (a refusal changes nothing). */
function checkOptions(options: BackupOptions): void {
  if (options.since === undefined && options.newCheckpoint === undefined) {
    throw new EnbdError('ENBD_ERR_CONFIG', 'a full backup (no --since) needs --new-checkpoint NAME to start tracking at the copy');
  }
  if (options.uri === undefined) exportUri(options, '');
}

export async function runBackup(client: ControlClient, options: BackupOptions): Promise<BackupManifest> {
  return (await runBackupReport(client, options)).manifest;
}

/** runBackup with what it did and when (phases, counts). */
export async function runBackupReport(client: ControlClient, options: BackupOptions): Promise<BackupReport> {
  checkOptions(options);
  const phases: Array<[string, number]> = [['start', performance.now()]];
  const mark = (phase: string): void => {
    phases.push([phase, performance.now()]);
  };
  // status and the checkpoint step travel together; no read before the step's answer.
  const statusCall = client.call('status');
  const step = options.since === undefined
    ? client.call('checkpoint.create', { name: options.newCheckpoint ?? '' })
    : options.newCheckpoint === undefined ? Promise.resolve(null) : client.call('checkpoint.freeze', { since: options.since, next: options.newCheckpoint });
  step.catch(() => undefined);
  const status = await statusCall;
  mark('status');
  const sizeBytes = status.export.sizeBytes;
  const connecting = NbdClient.connect(exportUri(options, status.export.name), { blockStatus: false });
  connecting.catch(() => undefined);
  let nbd: NbdClient | null = null;
  // FILE is opened (truncated) only once the daemon accepted the step: a refused backup
  // (an unknown --since, a duplicate name) leaves an existing FILE as it was.
  let fd = -1;
  try {
    await step;
    mark(options.since === undefined ? 'create' : 'freeze');
    const extents = options.since === undefined ? [{ offsetBytes: 0, lengthBytes: sizeBytes }] : await changedExtents(client, options.since);
    mark('runs');
    fd = openSync(options.to, 'w');
    ftruncateSync(fd, sizeBytes);
    const manifest: BackupManifest = {
      format: kBackupFormat,
      since: options.since ?? null,
      checkpoint: options.newCheckpoint ?? null,
      sizeBytes,
      createdMs: Date.now(),
      changedBytes: extents.reduce((sum, extent) => sum + extent.lengthBytes, 0),
      extents,
    };
    nbd = await connecting;
    mark('connect');
    const counts = await copyExtents(nbd, extents, fd);
    assert(counts.bytesCopied === manifest.changedBytes, 'every changed byte copied once');
    mark('copy');
    await nbd.disconnect();
    await syncOutputs(fd, options.to, manifest);
    mark('sync');
    if (options.since !== undefined && options.newCheckpoint !== undefined) await client.call('checkpoint.remove', { name: options.since });
    mark('remove');
    return { manifest, phases, ...counts };
  } finally {
    if (fd >= 0) closeSync(fd);
    // a failed step or copy: the connection may still be coming up, or be open (disconnect
    // is idempotent)
    nbd ??= await connecting.catch(() => null);
    await nbd?.disconnect().catch(() => undefined);
  }
}

async function changedExtents(client: ControlClient, name: string): Promise<BackupExtent[]> {
  const extents: BackupExtent[] = [];
  let offset: number | null = 0;
  for (let pages = 0; offset !== null && pages < 1 << 20; pages += 1) {
    const page: CheckpointRunsResult = await client.call('checkpoint.runs', { name, offset });
    extents.push(...page.runs);
    offset = page.nextOffsetBytes;
  }
  return extents;
}

interface CopyCounts {
  reads: number;
  writes: number;
  bytesCopied: number;
  lanes: number;
}

/** The extents cut into reads of at most kPieceBytes ([offset, length] pairs, in order). */
function cutPieces(extents: readonly BackupExtent[]): Array<[number, number]> {
  const pieces: Array<[number, number]> = [];
  for (const extent of extents) {
    const end = extent.offsetBytes + extent.lengthBytes;
    for (let at = extent.offsetBytes; at < end; at += kPieceBytes) pieces.push([at, Math.min(kPieceBytes, end - at)]);
  }
  return pieces;
}

/**
 * Reads every extent from the export into `fd` at its offset. Lanes: each owns one buffer and
 * keeps one read in flight; the write is a synchronous pwrite (a page-cache write of <= 4 MiB
 * is shorter than a thread-pool round trip; the file is fsynced once at the end).
 */
async function copyExtents(nbd: NbdClient, extents: readonly BackupExtent[], fd: number): Promise<CopyCounts> {
  const pieces = cutPieces(extents);
  const pieceBytesMax = pieces.reduce((largest, [, length]) => Math.max(largest, length), 0);
  const lanes = Math.min(pieces.length, kLanesMax, Math.max(1, Math.floor(kBytesInFlight / Math.max(1, pieceBytesMax))));
  const counts: CopyCounts = { reads: 0, writes: 0, bytesCopied: 0, lanes };
  let next = 0;
  const lane = async (): Promise<void> => {
    const buffer = Buffer.allocUnsafe(pieceBytesMax);
    while (next < pieces.length) {
      const [offsetBytes, lengthBytes] = pieces[next] as [number, number];
      next += 1;
      const view = buffer.subarray(0, lengthBytes);
      await nbd.readInto(offsetBytes, view);
      counts.reads += 1;
      for (let done = 0; done < lengthBytes; counts.writes += 1) done += writeSync(fd, view, done, lengthBytes - done, offsetBytes + done);
      counts.bytesCopied += lengthBytes;
    }
  };
  await Promise.all(Array.from({ length: lanes }, lane));
  return counts;
}

/**
 * FILE's data and FILE.json.tmp fsynced together (thread pool, one journal commit when the
 * file system allows), then the rename, then the directory: both names durable.
 */
async function syncOutputs(fd: number, path: string, manifest: BackupManifest): Promise<void> {
  const temporary = `${path}.json.tmp`;
  // on the thread pool while the manifest is written
  const dataSynced = new Promise<void>((resolve, reject) => {
    fsync(fd, (error) => (error === null ? resolve() : reject(error)));
  });
  dataSynced.catch(() => undefined);
  const manifestFile = await open(temporary, 'w');
  try {
    await manifestFile.writeFile(JSON.stringify(manifest) + '\n');
    await manifestFile.sync();
  } finally {
    await manifestFile.close();
  }
  await dataSynced;
  await rename(temporary, `${path}.json`);
  const directory = await open(dirname(path), 'r');
  try {
    await directory.sync();
  } finally {
    await directory.close();
  }
}

export async function readManifest(backup: string): Promise<BackupManifest> {
  const manifest = JSON.parse(await readFile(`${backup}.json`, 'utf8')) as BackupManifest;
  if (manifest.format !== kBackupFormat || !Array.isArray(manifest.extents)) throw new EnbdError('ENBD_ERR_CONFIG', `${backup}.json is not an enbd backup manifest`);
  return manifest;
}

/** Copies the backup's extents onto `image` (same offsets); the image grows to the device size. */
export async function applyBackup(backup: string, image: string): Promise<BackupManifest> {
  const manifest = await readManifest(backup);
  const source = await open(backup, 'r');
  const target = await open(image, 'a+').then(async (handle) => {
    await handle.close();
    return await open(image, 'r+');
  });
  try {
    if ((await target.stat()).size < manifest.sizeBytes) await target.truncate(manifest.sizeBytes);
    const buffer = Buffer.alloc(kPieceBytes);
    for (const extent of manifest.extents) {
      for (let at = extent.offsetBytes; at < extent.offsetBytes + extent.lengthBytes; at += kPieceBytes) {
        const length = Math.min(kPieceBytes, extent.offsetBytes + extent.lengthBytes - at);
        const { bytesRead } = await source.read(buffer, 0, length, at);
        if (bytesRead !== length) throw new EnbdError('ENBD_ERR_IO', `${backup} is shorter than its manifest says (offset ${at})`);
        await target.write(buffer, 0, length, at);
      }
    }
    await target.sync();
  } finally {
    await source.close();
    await target.close();
  }
  return manifest;
}
