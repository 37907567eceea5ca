/**
 * `enbd checkpoint create|list|remove` and `enbd backup` (changed-block tracking, issue 17).
 *
 * Thread: the CLI's main thread (a short-lived process): control calls to the daemon, and for
 * backup one NBD connection to the export to read the changed extents.
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
 * Output: FILE is a sparse image of the device size holding the copied extents at their
 * offsets (holes elsewhere); FILE.json lists the extents (`offsetBytes`, `lengthBytes`) so a
 * restore knows which holes are "unchanged" and which are zeros that were written.
 * Restore: the full image, then each increment's extents in order (`enbd backup-apply`).
 *
 * Invariants:
 * - The frozen checkpoint is removed only after FILE and FILE.json are complete and synced;
 *   a failed backup leaves it frozen (run the same `--since` again, without --new-checkpoint).
 */
import { writeSync } from 'node:fs';
import { open, readFile, rename, writeFile } from 'node:fs/promises';
import type { Command } from 'commander';
import type { ControlClient } from '../control/client.js';
import type { CheckpointRunsResult, CheckpointView } from '../control/protocol.js';
import { formatBytes } from '../control/format.js';
import { EnbdError } from '../core/errors.js';
import { NbdClient } from '../nbd/client/client.js';
import { addControlOption, resolveControlPath, say, withClient, type ControlOption } from './control.js';

const kPieceBytes = 4 * 1024 * 1024;
const kPiecesInFlight = 16;
export const kBackupFormat = 'enbd-backup-1';

export interface BackupManifest {
  format: typeof kBackupFormat;
  /** The checkpoint the extents changed since (null: a full copy). */
  since: string | null;
  /** The checkpoint started by this backup (the next --since), or null. */
  checkpoint: string | null;
  sizeBytes: number;
  createdMs: number;
  changedBytes: number;
  extents: Array<{ offsetBytes: number; lengthBytes: number }>;
}

function describeCheckpoint(view: CheckpointView): string {
  return `${view.name}\t${new Date(view.createdMs).toISOString()}\t${view.state}\t${formatBytes(view.granularityBytes)}\t${formatBytes(view.changedBytes)} changed (${view.changedBytes} bytes)`;
}

const kMemoryOnly = ' (in memory only: --metadata none; lost when the daemon stops)';

export function registerCheckpointCommands(program: Command): void {
  const checkpoint = program.command('checkpoint').description('changed-block tracking: named checkpoints, exported as qemu:dirty-bitmap:NAME (running daemon)');
  addControlOption(checkpoint.command('create').description('start tracking the blocks written from now on (name: 1-64 letters, digits, . _ - + @)').argument('<name>', 'checkpoint name'))
    .action(async (name: string, options: ControlOption) => {
      const result = await withClient(options, async (client) => await client.call('checkpoint.create', { name }));
      say(`checkpoint ${result.checkpoint.name} created${result.persistent ? ' (kept in the on-leg metadata)' : kMemoryOnly}; meta context qemu:dirty-bitmap:${result.checkpoint.name}`);
    });
  addControlOption(checkpoint.command('list').description('checkpoints: name, created, state, granularity, changed bytes'))
    .option('--json', 'print the list as JSON', false)
    .action(async (options: ControlOption & { json?: boolean }) => {
      const result = await withClient(options, async (client) => await client.call('checkpoint.list'));
      if (options.json === true) {
        say(JSON.stringify(result));
        return;
      }
      if (result.checkpoints.length === 0) say(`no checkpoints${result.persistent ? '' : kMemoryOnly}`);
      for (const view of result.checkpoints) say(describeCheckpoint(view));
    });
  addControlOption(checkpoint.command('remove').description('stop tracking and forget a checkpoint').argument('<name>', 'checkpoint name'))
    .action(async (name: string, options: ControlOption) => {
      const result = await withClient(options, async (client) => await client.call('checkpoint.remove', { name }));
      say(`checkpoint ${result.checkpoint.name} removed`);
    });
  addControlOption(program.command('backup').description('copy the blocks changed since a checkpoint (or, without --since, everything) into a sparse FILE plus FILE.json'))
    .option('--since <name>', 'copy only what changed since this checkpoint')
    .requiredOption('--to <file>', 'output image (sparse, the device size); FILE.json lists the extents')
    .option('--new-checkpoint <name>', 'start this checkpoint in the same engine step (the next backup\'s --since); the --since one is removed after success')
    .option('--uri <uri>', 'the export to read (default: derived from the control socket <socket>.ctl)')
    .action(async (options: ControlOption & { since?: string; to: string; newCheckpoint?: string; uri?: string }) => {
      const manifest = await withClient(options, async (client) => await runBackup(client, options));
      say(`backup ${options.to}: ${formatBytes(manifest.changedBytes)} in ${manifest.extents.length} extent(s)${manifest.since !== null ? ` changed since ${manifest.since}` : ' (full copy)'}${manifest.checkpoint !== null ? `; checkpoint ${manifest.checkpoint} started` : ''}`);
    });
  program.command('backup-apply').description('restore: apply a backup (FILE + FILE.json) onto an image, full first, then each increment in order')
    .argument('<backup>', 'backup file written by enbd backup')
    .argument('<image>', 'image to update (created when missing)')
    .action(async (backup: string, image: string) => {
      const manifest = await applyBackup(backup, image);
      say(`applied ${backup}: ${formatBytes(manifest.changedBytes)} in ${manifest.extents.length} extent(s) onto ${image}`);
    });
}

function exportUri(options: ControlOption & { uri?: string }, exportName: string): string {
  if (options.uri !== undefined) return options.uri;
  const control = resolveControlPath(options.control);
  if (!control.endsWith('.ctl')) throw new EnbdError('ENBD_ERR_CONFIG', `cannot tell the export from the control socket ${control}; pass --uri`);
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${encodeURIComponent(control.slice(0, -'.ctl'.length))}`;
}

export async function runBackup(client: ControlClient, options: ControlOption & { since?: string; to: string; newCheckpoint?: string; uri?: string }): Promise<BackupManifest> {
  const status = await client.call('status');
  const sizeBytes = status.export.sizeBytes;
  const uri = exportUri(options, status.export.name);
  let extents: Array<{ offsetBytes: number; lengthBytes: number }>;
  if (options.since === undefined) {
    if (options.newCheckpoint === undefined) throw new EnbdError('ENBD_ERR_CONFIG', 'a full backup (no --since) needs --new-checkpoint NAME to start tracking at the copy');
    await client.call('checkpoint.create', { name: options.newCheckpoint });
    extents = [{ offsetBytes: 0, lengthBytes: sizeBytes }];
  } else {
    if (options.newCheckpoint !== undefined) await client.call('checkpoint.freeze', { since: options.since, next: options.newCheckpoint });
    extents = await changedExtents(client, options.since);
  }
  const manifest: BackupManifest = {
    format: kBackupFormat,
    since: options.since ?? null,
    checkpoint: options.newCheckpoint ?? null,
    sizeBytes,
    createdMs: Date.now(),
    changedBytes: extents.reduce((sum, extent) => sum + extent.lengthBytes, 0),
    extents,
  };
  await copyExtents(uri, extents, sizeBytes, options.to);
  const temporary = `${options.to}.json.tmp`;
  await writeFile(temporary, JSON.stringify(manifest) + '\n');
  await rename(temporary, `${options.to}.json`);
  if (options.since !== undefined && options.newCheckpoint !== undefined) await client.call('checkpoint.remove', { name: options.since });
  return manifest;
}

async function changedExtents(client: ControlClient, name: string): Promise<Array<{ offsetBytes: number; lengthBytes: number }>> {
  const extents: Array<{ offsetBytes: number; lengthBytes: number }> = [];
  let offset: number | null = 0;
  for (let pages = 0; offset !== null && pages < 1 << 20; pages += 1) {
    const page: CheckpointRunsResult = await client.call('checkpoint.runs', { name, offset });
    extents.push(...page.runs);
    offset = page.nextOffsetBytes;
  }
  return extents;
}

/** Reads each extent from the export (pieces of 4 MiB, 8 in flight) into a sparse file. */
async function copyExtents(uri: string, extents: ReadonlyArray<{ offsetBytes: number; lengthBytes: number }>, sizeBytes: number, path: string): Promise<void> {
  const nbd = await NbdClient.connect(uri, { blockStatus: false });
  const file = await open(path, 'w');
  try {
    await file.truncate(sizeBytes);
    const pieces: Array<[number, number]> = [];
    for (const extent of extents) {
      for (let at = extent.offsetBytes; at < extent.offsetBytes + extent.lengthBytes; at += kPieceBytes) {
        pieces.push([at, Math.min(kPieceBytes, extent.offsetBytes + extent.lengthBytes - at)]);
      }
    }
    let next = 0;
    const lane = async (): Promise<void> => {
      while (next < pieces.length) {
        const [offsetBytes, lengthBytes] = pieces[next] as [number, number];
        next += 1;
        const data = await nbd.read(offsetBytes, lengthBytes);
        // Synchronous: a page-cache write of <= 4 MiB is shorter than a thread-pool round trip
        // (the file is fsynced once at the end).
        writeSync(file.fd, data, 0, data.length, offsetBytes);
      }
    };
    await Promise.all(Array.from({ length: kPiecesInFlight }, lane));
    await file.sync();
  } finally {
    await file.close();
    await nbd.disconnect().catch(() => undefined);
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
