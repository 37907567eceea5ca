/**
 * Case `nbdkit-file`: nbdkit's file plugin serving the shared tmpfs image; the baseline that
 * `enbd serve` is compared with (same file, same run).
 * Threads: harness main thread (the server is a child process).
 */
import { join } from 'node:path';
import type { BenchCase } from '../lib/case.js';
import { unixUri } from '../lib/case.js';

const nbdkitFile: BenchCase = {
  name: 'nbdkit-file',
  description: 'nbdkit -f file plugin on the shared /dev/shm image (baseline)',
  order: 10,
  quick: false,
  tools: ['nbdkit'],
  runsWorkload: (workload) => workload.headline,
  unavailableReason: () => null,
  async start(context) {
    const socketPath = join(context.runDir, 'nbdkit-file.sock');
    await context.spawn({
      label: 'nbdkit-file',
      command: 'nbdkit',
      args: ['-f', '--unix', socketPath, 'file', context.sharedImage()],
      socketPath,
      role: 'server',
    });
    return { uri: unixUri(socketPath) };
  },
};

export default nbdkitFile;
