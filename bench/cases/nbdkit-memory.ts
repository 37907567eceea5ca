/**
 * Case `nbdkit-memory`: nbdkit's memory plugin, no file at all; the ceiling for later
 * mirror comparisons (what one leg can do with no storage cost). Not part of --quick.
 * Threads: harness main thread (the server is a child process).
 */
import { join } from 'node:path';
import type { BenchCase } from '../lib/case.js';
import { unixUri } from '../lib/case.js';

const nbdkitMemory: BenchCase = {
  name: 'nbdkit-memory',
  description: 'nbdkit -f memory plugin (ceiling: no storage behind it)',
  order: 90,
  quick: false,
  tools: ['nbdkit'],
  unavailableReason: () => null,
  async start(context) {
    const socketPath = join(context.runDir, 'nbdkit-memory.sock');
    await context.spawn({
      label: 'nbdkit-memory',
      command: 'nbdkit',
      args: ['-f', '--unix', socketPath, 'memory', String(context.sizeBytes)],
      socketPath,
      role: 'server',
    });
    return { uri: unixUri(socketPath) };
  },
};

export default nbdkitMemory;
