/**
 * Child process of test/interop/hot-path-alloc.test.ts (run with --expose-gc and a large young
 * generation): a served mirror over two file legs (src/cli/mirror-server.ts, direct receive on,
 * leg actors on workers) on a Unix socket. It measures the main thread's allocations over a
 * window the parent opens and closes on stdin while its client streams 4 KiB WRITEs:
 *   "mark\n"     forced GC, then heapUsed + arrayBuffers and the GC count are recorded
 *   "measure\n"  the same again (no GC forced); prints one JSON line with the deltas
 * Any GC inside the window (a scavenge would free what was allocated) is reported, so the
 * parent can tell a clean window from a spoiled one.
 * ENBD_ALLOC_PLACEMENT=inline: leg actors on the main thread (legs may then be NBD URIs, and the
 * window covers the actors' and their NBD clients' send path too).
 * ENBD_ALLOC_EXTRA_BYTES (test only): allocate a Buffer of that size per submitted request, to
 * prove the budget catches a per-request allocation (added at submit: a WRITE's buffer is no
 * longer released by the server).
 * Thread: child main thread (the session master); the leg actors on workers.
 */
import { PerformanceObserver } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { openMirrorServer } from '../../src/cli/mirror-server.js';
import { kConnectionActorEntry } from '../../src/cli/actor-entry.js';
import { createLogger } from '../../src/core/log.js';

const [socketPath, legA, legB] = process.argv.slice(2);
if (socketPath === undefined || legA === undefined || legB === undefined) throw new Error('usage: alloc-server SOCKET LEG LEG');
const gc = (globalThis as { gc?: () => void }).gc;
if (gc === undefined) throw new Error('run with --expose-gc');
const extraBytes = Number(process.env['ENBD_ALLOC_EXTRA_BYTES'] ?? 0);

let gcCount = 0;
new PerformanceObserver((list) => (gcCount += list.getEntries().length)).observe({ entryTypes: ['gc'] });

const logger = createLogger({ level: 'silent', pretty: false });
// ENBD_ALLOC_PLACEMENT=inline (test only): the leg actors and their NBD clients on this thread, so their allocations count too.
const placement = process.env['ENBD_ALLOC_PLACEMENT'] === 'inline' ? 'inline' : 'workers';
const served = await openMirrorServer({ legs: [legA, legB], logger, actorEntry: kConnectionActorEntry, placement }, { logger, directReceive: true });
const kept: Buffer[] = [];
if (extraBytes > 0) {
  // the deliberate regression: one Buffer per submitted request (kept, bounded)
  const device = served.mirror as unknown as { submit(...args: unknown[]): void };
  const submit = device.submit.bind(served.mirror) as (...args: unknown[]) => void;
  device.submit = (...args: unknown[]) => {
    kept.push(Buffer.alloc(extraBytes));
    if (kept.length > 100_000) kept.length = 0;
    submit(...args);
  };
}
await served.server.listenUnix(socketPath);

const sample = (): { bytes: number; gcs: number; completed: number } => {
  const usage = process.memoryUsage();
  return { bytes: usage.heapUsed + usage.arrayBuffers, gcs: gcCount, completed: served.mirror.stats().writeRequests };
};
let marked = sample();
const lines = createInterface({ input: process.stdin });
process.stdout.write('ready\n');
for await (const line of lines) {
  if (line === 'mark') {
    gc();
    // the observer's entry for this forced GC arrives later: wait for it before counting
    const forcedSeen = gcCount + 1;
    while (gcCount < forcedSeen) await new Promise((resolve) => setTimeout(resolve, 5));
    marked = sample();
    process.stdout.write('marked\n');
  } else if (line === 'measure') {
    const now = sample();
    await new Promise((resolve) => setImmediate(resolve));
    process.stdout.write(`${JSON.stringify({ allocatedBytes: now.bytes - marked.bytes, gcs: gcCount - marked.gcs, requests: now.completed - marked.completed })}\n`);
  } else if (line === 'stop') {
    break;
  }
}
lines.close();
await served.stop();
process.exit(0);
