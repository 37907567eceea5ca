/**
 * Legs for the mirror-like cases (enbd mirror, nbdkit's nbd proxy, qemu's quorum driver):
 * `nbdkit memory` servers of the export size on Unix sockets in the case's run directory,
 * spawned through the case context (role 'leg': their CPU is not reported).
 * Threads: harness main thread.
 *
 * Invariant: every case compared in one run uses legs started by this one function, so a
 * leg costs the same whatever sits in front of it.
 */
import { join } from 'node:path';
import { assert } from '../../src/core/assert.js';
import { unixUri, type CaseContext } from './case.js';
import { enbdArgs } from './enbd.js';
import { startProcess, type ManagedProcess } from './proc.js';

export interface StartedLegs {
  uris: string[];
  socketPaths: string[];
  processes: ManagedProcess[];
}

/**
 * `nbdkit -f --unix SOCKET ARGS...` as a leg (role 'leg'), outside a case context (the resync
 * and verify benches run their own legs), its log at `runDir/LABEL.log`.
 */
export async function startNbdkitLeg(runDir: string, label: string, socketPath: string, args: readonly string[]): Promise<ManagedProcess> {
  return await startProcess({
    label, command: 'nbdkit', args: ['-f', '--unix', socketPath, ...args], socketPath, role: 'leg',
    logPath: join(runDir, `${label}.log`),
  });
}

export async function startMemoryLegs(context: CaseContext, prefix: string, count: number): Promise<StartedLegs> {
  assert(Number.isInteger(count) && count >= 1, 'leg count');
  const started: StartedLegs = { uris: [], socketPaths: [], processes: [] };
  for (let index = 0; index < count; index += 1) {
    const socketPath = join(context.runDir, `${prefix}-leg${index}.sock`);
    started.processes.push(await context.spawn({
      label: `${prefix}-leg${index}`,
      command: 'nbdkit',
      args: ['-f', '--unix', socketPath, 'memory', String(context.sizeBytes)],
      socketPath,
      role: 'leg',
    }));
    started.socketPaths.push(socketPath);
    started.uris.push(unixUri(socketPath));
  }
  return started;
}

/** A 2-leg enbd mirror (no metadata) over two nbdkit legs, as started by startTwoLegMirror. */
export interface TwoLegMirror {
  uri: string;
  process: ManagedProcess;
}

/**
 * Starts two nbdkit legs (`legArgs(index)`: the nbdkit arguments after `-f --unix SOCKET`)
 * and an enbd mirror over them with `--metadata none --log-level warn` plus `flags`. Every
 * process is spawned through the case context, which stops them.
 */
export async function startTwoLegMirror(context: CaseContext, name: string,
  legArgs: (index: number) => readonly string[], flags: readonly string[]): Promise<TwoLegMirror> {
  const legUris: string[] = [];
  for (let index = 0; index < 2; index += 1) {
    const socketPath = join(context.runDir, `${name}-leg${index}.sock`);
    await context.spawn({
      label: `${name}-leg${index}`, command: 'nbdkit', role: 'leg', socketPath,
      args: ['-f', '--unix', socketPath, ...legArgs(index)],
    });
    legUris.push(unixUri(socketPath));
  }
  const socketPath = join(context.runDir, `${name}.sock`);
  const server = await context.spawn({
    label: name, command: process.execPath, role: 'server', socketPath,
    args: enbdArgs(context, ['mirror', ...legUris.flatMap((uri) => ['--leg', uri]), '--socket', socketPath,
      '--metadata', 'none', '--log-level', 'warn', ...flags]),
  });
  return { uri: unixUri(socketPath), process: server };
}
