/**
 * Case `nbdkit-memory` ("direct"): fio straight to one `nbdkit memory` leg, no proxy hop, no
 * mirroring; the ceiling of the mirror comparisons (what one leg does with no storage cost;
 * every mirror-like case sits in front of legs exactly like this one, lib/legs.ts). Every
 * matrix case's "x direct" ratio is against it. Part of --quick.
 * Threads: harness main thread (the server is a child process).
 */
import { join } from 'node:path';
import type { BenchCase } from '../lib/case.js';
import { unixUri } from '../lib/case.js';

const nbdkitMemory: BenchCase = {
  name: 'nbdkit-memory',
  description: 'direct: fio to one nbdkit memory leg, no hop (the ceiling of the mirror cases)',
  order: 30,
  quick: true,
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
