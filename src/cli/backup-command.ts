/**
 * The `enbd backup` and `enbd backup-apply` command definitions, shared by the full command
 * tree (src/cli/checkpoint.ts) and the lean one main.ts builds when argv[2] names one of them.
 *
 * Thread: the CLI's main thread.
 *
 * Design notes: why a lean tree. `enbd backup` of a small change is bounded by Node's start:
 * the full tree loads every command's modules (the engine, pino, the metadata code, ~100
 * files) before parsing; this file needs commander, the control client and the formatter, and
 * the copy (src/cli/backup.ts, the NBD client) is imported only when the command runs.
 * | argv[2]                  | tree main.ts builds                    | modules loaded (dist)  |
 * |--------------------------|----------------------------------------|------------------------|
 * | backup, backup-apply     | these two commands only                | this file's graph + backup.ts |
 * | anything else            | every command (this file registered    | the command's own graph |
 * |                          | by checkpoint.ts, in its place)        |                        |
 * Both trees share main.ts's program setup, so usage errors, --help and exit codes are the same.
 *
 * Invariants: this file imports nothing heavy at its top level (checked by a test that counts
 * the modules the lean tree loads).
 */
import type { Command } from 'commander';
import { formatBytes } from '../control/format.js';
import { addControlOption, say, withClient, type ControlOption } from './control-option.js';
import type { BackupOptions, BackupReport } from './backup.js';

export const kBackupCommands: readonly string[] = ['backup', 'backup-apply'];

/** `--timings`: one line on stderr, the phases in ms since the process started, and the counts. */
function describeTimings(report: BackupReport): string {
  const phases = [['node', performance.nodeTiming.bootstrapComplete] as [string, number], ...report.phases];
  const at = phases.map(([phase, ms]) => `${phase} ${ms.toFixed(0)}`).join(', ');
  return `enbd backup: timings (ms since the process started): ${at}; ${report.reads} reads, ${report.writes} writes, ${report.bytesCopied} bytes, ${report.lanes} in flight\n`;
}

export function registerBackupCommands(program: Command): void {
  addControlOption(program.command('backup').description('copy the blocks changed since a checkpoint (or, without --since, everything) into a sparse FILE plus FILE.json'))
    .option('--since <name>', 'copy only what changed since this checkpoint')
    .requiredOption('--to <file>', 'output image (sparse, the device size); FILE.json lists the extents')
    .option('--new-checkpoint <name>', 'start this checkpoint in the same engine step (the next backup\'s --since); the --since one is removed after success')
    .option('--uri <uri>', 'the export to read (default: derived from the control socket <socket>.ctl)')
    .option('--timings', 'print where the time went (phases, reads, writes) on stderr', false)
    .action(async (options: ControlOption & BackupOptions & { timings?: boolean }) => {
      const { runBackupReport } = await import('./backup.js');
      const report = await withClient(options, async (client) => await runBackupReport(client, options));
      const manifest = report.manifest;
      say(`backup ${options.to}: ${formatBytes(manifest.changedBytes)} in ${manifest.extents.length} extent(s)${manifest.since !== null ? ` changed since ${manifest.since}` : ' (full copy)'}${manifest.checkpoint !== null ? `; checkpoint ${manifest.checkpoint} started` : ''}`);
      if (options.timings === true) process.stderr.write(describeTimings(report));
    });
  program.command('backup-apply').description('restore: apply a backup (FILE + FILE.json) onto an image, full first, then each increment in order')
    .argument('<backup>', 'backup file written by enbd backup')
    .argument('<image>', 'image to update (created when missing)')
    .action(async (backup: string, image: string) => {
      const { applyBackup } = await import('./backup.js');
      const manifest = await applyBackup(backup, image);
      say(`applied ${backup}: ${formatBytes(manifest.changedBytes)} in ${manifest.extents.length} extent(s) onto ${image}`);
    });
}
