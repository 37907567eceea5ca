/**
 * Mirror cases over `nbdkit memory` legs on Unix sockets: one factory, several named cases
 * (this file exports a list). `enbd-mirror2-shared` (the design), `-per-leg` (a payload copy
 * per leg), `-inline` (actors on the main thread), `enbd-mirror3-shared`, and the peer
 * `nbdkit-nbd-proxy` (nbdkit's nbd plugin as a 1-leg C pass-through).
 * Targets (issue: mirror engine): 2-leg 4 KiB randwrite >= 1.5x the pass-through, randread >= 2x.
 * Threads: harness main thread (servers are child processes).
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { BenchCase, CaseContext } from '../lib/case.js';
import { unixUri } from '../lib/case.js';

function enbdMain(context: CaseContext): string {
  return process.env['ENBD_BENCH_MAIN'] ?? join(context.distRoot, 'src/cli/main.js');
}

async function startLegs(context: CaseContext, prefix: string, count: number): Promise<string[]> {
  const uris: string[] = [];
  for (let index = 0; index < count; index += 1) {
    const socketPath = join(context.runDir, `${prefix}-leg${index}.sock`);
    await context.spawn({
      label: `${prefix}-leg${index}`,
      command: 'nbdkit',
      args: ['-f', '--unix', socketPath, 'memory', String(context.sizeBytes)],
      socketPath,
      role: 'leg',
    });
    uris.push(unixUri(socketPath));
  }
  return uris;
}

function mirrorCase(name: string, legs: number, extra: string[], order: number, quick: boolean): BenchCase {
  return {
    name,
    description: `enbd mirror, ${legs} nbdkit memory legs ${extra.join(' ')}`.trim(),
    order,
    quick,
    tools: ['nbdkit'],
    unavailableReason(context) {
      const main = enbdMain(context);
      return existsSync(main) ? null : `enbd not built (${main} missing)`;
    },
    async start(context) {
      const legUris = await startLegs(context, name, legs);
      const socketPath = join(context.runDir, `${name}.sock`);
      await context.spawn({
        label: name,
        command: process.execPath,
        args: [enbdMain(context), 'mirror', ...legUris.flatMap((uri) => ['--leg', uri]), '--socket', socketPath, '--log-level', 'warn', ...extra],
        socketPath,
        role: 'server',
        env: { ...process.env, ENBD_LOG_JSON: '1' },
      });
      return { uri: unixUri(socketPath) };
    },
    targets: [{
      versus: 'nbdkit-nbd-proxy',
      source: 'issue: mirror engine (2 legs vs nbdkit nbd pass-through)',
      minRatio: (workload) => (workload.name.includes('randwrite') ? 1.5 : workload.name.includes('randread') ? 2 : undefined),
    }],
  };
}

const proxy: BenchCase = {
  name: 'nbdkit-nbd-proxy',
  description: "nbdkit's nbd plugin in front of one nbdkit memory leg (C proxy hop)",
  order: 30,
  quick: false,
  tools: ['nbdkit'],
  unavailableReason: () => null,
  async start(context) {
    const [legUri] = await startLegs(context, 'proxy', 1);
    const legSocket = (legUri ?? '').replace(/^nbd\+unix:\/\/\/\?socket=/, '');
    const socketPath = join(context.runDir, 'proxy.sock');
    await context.spawn({
      label: 'nbdkit-nbd-proxy',
      command: 'nbdkit',
      args: ['-f', '--unix', socketPath, 'nbd', `socket=${legSocket}`],
      socketPath,
      role: 'server',
    });
    return { uri: unixUri(socketPath) };
  },
};

const cases: BenchCase[] = [
  proxy,
  mirrorCase('enbd-mirror2-shared', 2, [], 40, true),
  mirrorCase('enbd-mirror2-per-leg', 2, ['--copy-mode', 'per-leg'], 41, false),
  mirrorCase('enbd-mirror2-inline', 2, ['--placement', 'inline'], 42, false),
  mirrorCase('enbd-mirror2-direct', 2, ['--receive', 'direct'], 43, false),
  mirrorCase('enbd-mirror3-shared', 3, [], 44, false),
];

export default cases;
