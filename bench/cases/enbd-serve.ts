/**
 * Cases `enbd-serve` (default `--io async`) and `enbd-serve-sync` (`--io sync`: pread/pwrite on
 * the serving thread): `enbd serve` (single file export, no mirroring) on the same shared
 * tmpfs image as nbdkit-file. Issue target: >= 0.7x nbdkit-file on 4 KiB, >= 0.8x on 1 MiB.
 * Runs the enbd build that sits beside the harness (<distRoot>/src/cli/main.js), or
 * ENBD_BENCH_MAIN if set (lib/enbd.ts); a missing build is reported as an unavailable row.
 * Runs the headline workloads only (its issue's targets are stated on them).
 * Threads: harness main thread (the server is a child process).
 */
import { join } from 'node:path';
import type { BenchCase } from '../lib/case.js';
import { unixUri } from '../lib/case.js';
import { enbdArgs, enbdUnavailable } from '../lib/enbd.js';
import { isSmallBlock } from '../lib/workloads.js';

const kTargetSmallBlockRatio = 0.7;
const kTargetLargeBlockRatio = 0.8;

function serveCase(name: string, io: 'async' | 'sync', order: number): BenchCase {
  return {
  name,
  description: `enbd serve --io ${io} on the shared /dev/shm image`,
  order,
  quick: false,
  tools: [],
  runsWorkload: (workload) => workload.headline,
  unavailableReason: enbdUnavailable,
  async start(context) {
    const socketPath = join(context.runDir, `${name}.sock`);
    await context.spawn({
      label: name,
      command: process.execPath,
      args: enbdArgs(context, [
        'serve', context.sharedImage(), '--socket', socketPath, '--io', io, '--log-level', 'warn',
      ]),
      socketPath,
      role: 'server',
      env: { ...process.env, ENBD_LOG_JSON: '1' },
    });
    return { uri: unixUri(socketPath) };
  },
  targets: [{
    versus: 'nbdkit-file',
    source: 'issue: enbd serve vs nbdkit file, same tmpfs file, same run',
    minRatio: (workload) => (isSmallBlock(workload) ? kTargetSmallBlockRatio : kTargetLargeBlockRatio),
  }],
  };
}

export default [serveCase('enbd-serve', 'async', 20), serveCase('enbd-serve-sync', 'sync', 21)];
