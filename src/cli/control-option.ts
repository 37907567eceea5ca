/**
 * The `--control PATH` option every client command takes, and the helpers around it: which
 * control socket to use, one connected ControlClient per command, a line on stdout.
 *
 * Thread: the CLI's main thread (a short-lived process).
 *
 * Design notes: this file is kept light (node:fs, node:path and the control client only), so
 * the lean `enbd backup` entry (src/cli/backup-command.ts) can use it without loading the other
 * client commands (src/cli/control.ts re-exports everything here for them).
 * | --control given | $ENBD_CONTROL set | used                                                 |
 * |-----------------|-------------------|------------------------------------------------------|
 * | yes             | -                 | --control (resolved against the working directory)   |
 * | no              | yes               | $ENBD_CONTROL                                        |
 * | no              | no                | ./enbd-data/enbd.ctl or ./enbd.ctl, the first there  |
 *
 * Invariants: withClient closes its client on every path.
 */
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { ControlClient, ControlError } from '../control/client.js';

const kControlCandidates = ['enbd-data/enbd.ctl', 'enbd.ctl'];

export interface ControlOption {
  control?: string;
}

/** The control socket to use: --control, $ENBD_CONTROL, or the first default that exists. */
export function resolveControlPath(given: string | undefined): string {
  if (given !== undefined && given !== '') return resolve(given);
  const fromEnvironment = process.env['ENBD_CONTROL'];
  if (fromEnvironment !== undefined && fromEnvironment !== '') return resolve(fromEnvironment);
  for (const candidate of kControlCandidates) if (existsSync(candidate)) return resolve(candidate);
  throw new ControlError('connect', `no control socket found (tried ./${kControlCandidates.join(' and ./')}); pass --control PATH or set ENBD_CONTROL (the daemon's default is <socket>.ctl)`);
}

export async function withClient<T>(options: ControlOption, run: (client: ControlClient) => Promise<T>): Promise<T> {
  const client = await ControlClient.connect(resolveControlPath(options.control));
  try {
    return await run(client);
  } finally {
    client.close();
  }
}

export function say(line: string): void {
  process.stdout.write(line + '\n');
}

export function addControlOption(command: Command): Command {
  return command.option('--control <path>', 'the daemon\'s control socket (default: $ENBD_CONTROL, ./enbd-data/enbd.ctl or ./enbd.ctl)');
}
