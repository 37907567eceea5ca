/**
 * The fio workloads the harness knows, one line each. A workload is pure data: the harness
 * turns it into fio arguments (lib/fio.ts) and runs it against every selected case.
 * Threads: harness main thread.
 *
 * Invariants: names are unique and stable (they key the results JSON and the ratios);
 * blockBytes is a power of two; queueDepth >= 1.
 * Adding a workload: append one entry; set `quick: true` only if it belongs in `--quick`.
 *
 * Order is run order (workload-major): writes come first, so the reads that follow hit pages
 * the writes allocated in the `nbdkit memory` legs instead of sparse holes.
 * `headline: true` workloads run on every case; the others (QD1, 1 MiB reads) run only on
 * the cases whose `runsWorkload` accepts them (the references and the shared-ring mirrors;
 * see lib/case.ts), which keeps the full run under 10 minutes. `--all-pairs` runs every pair.
 */
import { assert, isPowerOfTwo } from '../../src/core/assert.js';

export type FioPattern = 'randread' | 'randwrite' | 'read' | 'write' | 'randrw';

export interface Workload {
  name: string;
  pattern: FioPattern;
  blockBytes: number;
  queueDepth: number;
  /** Part of the `--quick` subset. */
  quick: boolean;
  /** Runs on every case (the targets are stated on these). */
  headline: boolean;
  description: string;
}

const kKiB = 1024;
const kMiB = 1024 * kKiB;

export const kWorkloads: readonly Workload[] = [
  {
    name: 'seqwrite-1m-qd8', pattern: 'write', blockBytes: kMiB, queueDepth: 8, quick: true, headline: true,
    description: '1 MiB sequential writes, queue depth 8',
  },
  {
    name: 'randwrite-4k-qd32', pattern: 'randwrite', blockBytes: 4 * kKiB, queueDepth: 32, quick: true,
    headline: true, description: '4 KiB random writes, queue depth 32',
  },
  {
    name: 'randwrite-4k-qd1', pattern: 'randwrite', blockBytes: 4 * kKiB, queueDepth: 1, quick: false,
    headline: false, description: '4 KiB random writes, queue depth 1 (latency)',
  },
  {
    name: 'randread-4k-qd32', pattern: 'randread', blockBytes: 4 * kKiB, queueDepth: 32, quick: true,
    headline: true, description: '4 KiB random reads, queue depth 32',
  },
  {
    name: 'randread-4k-qd1', pattern: 'randread', blockBytes: 4 * kKiB, queueDepth: 1, quick: false,
    headline: false, description: '4 KiB random reads, queue depth 1 (latency)',
  },
  {
    name: 'seqread-1m-qd8', pattern: 'read', blockBytes: kMiB, queueDepth: 8, quick: false, headline: false,
    description: '1 MiB sequential reads, queue depth 8',
  },
];

for (const workload of kWorkloads) {
  assert(isPowerOfTwo(workload.blockBytes), `${workload.name}: blockBytes must be a power of two`);
  assert(Number.isInteger(workload.queueDepth), `${workload.name}: queueDepth must be an integer`);
  assert(workload.queueDepth >= 1, `${workload.name}: queueDepth must be >= 1`);
}
assert(new Set(kWorkloads.map((workload) => workload.name)).size === kWorkloads.length,
  'workload names are unique');

export function isSmallBlock(workload: Workload): boolean {
  return workload.blockBytes <= 64 * kKiB;
}
