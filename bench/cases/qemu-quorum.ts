/**
 * Peer cases `qemu-quorum2`, `qemu-quorum3` (and `qemu-quorum1`): qemu's quorum block driver over 2 or 3 `nbdkit
 * memory` legs (the same legs as the enbd mirror cases, lib/legs.ts), exported by qemu-nbd on
 * a Unix socket. qemu-storage-daemon is not installed on these machines; qemu-nbd with
 * --image-opts builds the same graph:
 *
 *   qemu-nbd --persistent -k SOCK --cache=none --aio=threads -x '' --shared=8 --image-opts \
 *     driver=quorum,vote-threshold=1,read-pattern=fifo,\
 *     children.0.driver=nbd,children.0.server.type=unix,children.0.server.path=LEG0,...
 *
 * (no -f with --image-opts; without --persistent qemu-nbd exits after its first client, and
 * the harness's readiness probe is a client.)
 *
 * vote-threshold=1: a WRITE completes when every child has answered and at least one
 * succeeded, which is what a RAID1 mirror promises. read-pattern=fifo: every READ goes to
 * child 0 only (the others are read only after an error), so a quorum READ is one leg's READ
 * plus qemu's hop; enbd also reads one leg per READ, but spreads READs over the legs (the leg
 * with the fewest in flight). The opt-in `qemu-quorum2-rr` (read-pattern=round-robin) spreads
 * READs like enbd does. `qemu-quorum1` (one child: qemu-nbd as a pass-through with the quorum
 * layer in the path) is the 1-leg point of the chart and of the matrix's "x qrm" column.
 * Threads: harness main thread (servers are child processes).
 */
import { join } from 'node:path';
import type { BenchCase } from '../lib/case.js';
import { unixUri } from '../lib/case.js';
import { startMemoryLegs } from '../lib/legs.js';

type ReadPattern = 'fifo' | 'round-robin';

const kSharedClients = 8;

/** The --image-opts value of a quorum over the given leg sockets. */
export function quorumImageOpts(legSockets: readonly string[], readPattern: ReadPattern): string {
  const children = legSockets.flatMap((socketPath, index) => [
    `children.${index}.driver=nbd`, `children.${index}.server.type=unix`, `children.${index}.server.path=${socketPath}`,
  ]);
  return ['driver=quorum', 'vote-threshold=1', `read-pattern=${readPattern}`, ...children].join(',');
}

function quorumCase(name: string, legs: number, order: number, readPattern: ReadPattern, optIn: boolean): BenchCase {
  return {
    name,
    description: `qemu-nbd, quorum driver over ${legs} nbdkit memory leg${legs === 1 ? '' : 's'}, ` +
      `vote-threshold=1, read-pattern=${readPattern}`,
    order,
    quick: legs === 2 && !optIn,
    ...(optIn ? { optIn: true } : {}),
    tools: ['nbdkit', 'qemu-nbd'],
    unavailableReason: () => null,
    async start(context) {
      const started = await startMemoryLegs(context, name, legs);
      const socketPath = join(context.runDir, `${name}.sock`);
      await context.spawn({
        label: name,
        command: 'qemu-nbd',
        args: [
          '--persistent', '-k', socketPath, '--cache=none', '--aio=threads', '-x', '', `--shared=${kSharedClients}`,
          '--image-opts', quorumImageOpts(started.socketPaths, readPattern),
        ],
        socketPath,
        role: 'server',
      });
      return { uri: unixUri(socketPath) };
    },
  };
}

const cases: BenchCase[] = [
  quorumCase('qemu-quorum1', 1, 32, 'fifo', false),
  quorumCase('qemu-quorum2', 2, 33, 'fifo', false),
  quorumCase('qemu-quorum3', 3, 34, 'fifo', false),
  quorumCase('qemu-quorum2-rr', 2, 35, 'round-robin', true),
];

export default cases;
