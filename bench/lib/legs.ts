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
