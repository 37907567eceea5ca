/**
 * `enbd checkpoint create|list|remove` (changed-block tracking, issue 17); `enbd backup` and
 * `enbd backup-apply` are defined in backup-command.ts (also used by main.ts's lean tree) and
 * copy in backup.ts.
 *
 * Thread: the CLI's main thread (a short-lived process): control calls to the daemon.
 *
 * Design notes: the checkpoint commands are thin control calls (src/control/checkpoint-handlers.ts
 * does the work); what a backup does with a checkpoint is described in backup.ts.
 */
import type { Command } from 'commander';
import type { CheckpointView } from '../control/protocol.js';
import { formatBytes } from '../control/format.js';
import { addControlOption, say, withClient, type ControlOption } from './control-option.js';
import { registerBackupCommands } from './backup-command.js';

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
  registerBackupCommands(program);
}
