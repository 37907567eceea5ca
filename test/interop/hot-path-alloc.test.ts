/**
 * Allocation budget of the hot path (ARCHITECTURE.md invariant 8: nothing allocated per request
 * but one exact-length view of a ring slot per READ/WRITE). A child node (test/helpers/alloc-server.ts,
 * --expose-gc, a young generation large enough that no GC runs inside the window) serves a
 * mirror over two file legs with direct receive; this process streams 4 KiB WRITEs at it with
 * NbdClient (queue depth 16) and asks the child for its main thread's heap + ArrayBuffer growth
 * over a window of many requests. The budget is per request and well under 4 KiB: the same
 * test with one 4 KiB Buffer allocated per request must fail it: ENBD_ALLOC_EXTRA_BYTES_PARENT=4096
 * plants one in the child (tried: about 4750 B per request, failed).
 * Threads: test main thread; the served mirror in the child.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { truncateSync, writeFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { NbdClient } from '../../src/nbd/client/client.js';
import { MemoryLegs, requires, scratch, unixUri, waitForUnixListener } from '../helpers/tools.js';
import { TrackedChild } from '../../harness/process.js';

const kLegBytes = 64 * 1024 * 1024;
const kWriteBytes = 4096;
const kWarmupRequests = 4000;
const kWindowRequests = 4000;
const kQueueDepth = 16;
/** Bytes per request the main thread may allocate in the steady state (today: about 430). */
const kBudgetBytesPerRequest = 1024;
/**
 * The same with two NBD legs and inline actors: master + two actors and their NBD clients.
 * 2026-12-01: 1260-1670 B (it varies with the event-loop turns per batch); 1750-1930 B before
 * the actor's per-slot views and the client's per-position header views.
 */
const kBudgetNbdLegsBytesPerRequest = 2048;
const kChild = fileURLToPath(new URL('../helpers/alloc-server.js', import.meta.url));

interface Window {
  allocatedBytes: number;
  gcs: number;
  requests: number;
}

async function writeLoop(client: NbdClient, count: number, startIndex: number, data: Buffer): Promise<void> {
  let next = 0;
  const lanes: Promise<void>[] = [];
  for (let lane = 0; lane < kQueueDepth; lane += 1) {
    lanes.push((async () => {
      while (next < count) {
        const index = startIndex + next++;
        await client.write((index % (kLegBytes / kWriteBytes)) * kWriteBytes, data);
      }
    })());
  }
  await Promise.all(lanes);
}

/**
 * One measured window against a fresh child; `extraBytes` > 0 plants a per-request Buffer.
 * `nbdLegs`: two nbdkit memory legs and inline placement, so the leg actors' and NBD clients'
 * send path is measured too (the file-leg window sees only the master's thread).
 */
async function measure(extraBytes: number, nbdLegs = false): Promise<Window> {
  const dir = scratch('enbd-alloc-');
  const nbdkits = new MemoryLegs(() => dir, kLegBytes);
  const legs: string[] = [];
  if (nbdLegs) {
    for (let index = 0; index < 2; index += 1) legs.push((await nbdkits.start()).uri);
  } else {
    for (const leg of [dir.path('a.img'), dir.path('b.img')]) {
      writeFileSync(leg, '');
      truncateSync(leg, kLegBytes);
      legs.push(leg);
    }
  }
  const socketPath = dir.path('m.sock');
  const process_ = spawn(process.execPath, ['--expose-gc', '--max-semi-space-size=64', '--min-semi-space-size=64', kChild, socketPath, ...legs], {
    env: { ...process.env, ENBD_ALLOC_EXTRA_BYTES: String(extraBytes), ...(nbdLegs ? { ENBD_ALLOC_PLACEMENT: 'inline' } : {}) },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const child = new TrackedChild(process_);
  let output = '';
  process_.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const lines = createInterface({ input: process_.stdout })[Symbol.asyncIterator]();
  const nextLine = async (): Promise<string> => {
    const line = await lines.next();
    if (line.done === true) throw new Error(`alloc child ended:\n${output}`);
    return line.value as string;
  };
  let client: NbdClient | null = null;
  try {
    assert.equal(await nextLine(), 'ready');
    await waitForUnixListener('alloc child', socketPath, { process: process_, tracked: child, output: () => output, stop: async () => await child.stop() });
    client = await NbdClient.connect(unixUri(socketPath));
    const data = Buffer.alloc(kWriteBytes, 0x5a);
    await writeLoop(client, kWarmupRequests, 0, data); // JIT, pools and slot views settle
    process_.stdin.write('mark\n');
    assert.equal(await nextLine(), 'marked');
    await writeLoop(client, kWindowRequests, kWarmupRequests, data);
    process_.stdin.write('measure\n');
    return JSON.parse(await nextLine()) as Window;
  } finally {
    await client?.close().catch(() => undefined);
    process_.stdin.end('stop\n');
    await child.stop('SIGTERM', 10_000);
    await nbdkits.stopAll();
    dir.cleanup();
  }
}

/** A window with a GC inside says nothing (the GC freed part of it): try again, a few times. */
async function cleanWindow(extraBytes: number, nbdLegs = false): Promise<Window> {
  let last: Window | null = null;
  for (let attempt = 0; attempt < 3; attempt += 1) {
    last = await measure(extraBytes, nbdLegs);
    if (last.gcs === 0) return last;
  }
  assert.fail(`every window had a GC inside (last: ${JSON.stringify(last)}); raise the young generation`);
}

test(`steady 4 KiB writes through the server into the ring allocate under ${kBudgetBytesPerRequest} B per request`, { timeout: 120_000 }, async () => {
  const window = await cleanWindow(Number(process.env['ENBD_ALLOC_EXTRA_BYTES_PARENT'] ?? 0));
  assert.ok(window.requests >= kWindowRequests, `the window saw ${window.requests} writes`);
  const perRequest = window.allocatedBytes / window.requests;
  process.stderr.write(`hot-path allocation: ${perRequest.toFixed(0)} B per 4 KiB write over ${window.requests} writes\n`);
  assert.ok(perRequest <= kBudgetBytesPerRequest, `${perRequest.toFixed(0)} B allocated per request; budget ${kBudgetBytesPerRequest}`);
});

test(`the same over two nbdkit memory legs with inline actors (actor + NBD client send path) allocates under ${kBudgetNbdLegsBytesPerRequest} B per request`, { timeout: 120_000 }, async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const window = await cleanWindow(Number(process.env['ENBD_ALLOC_EXTRA_BYTES_PARENT'] ?? 0), true);
  assert.ok(window.requests >= kWindowRequests, `the window saw ${window.requests} writes`);
  const perRequest = window.allocatedBytes / window.requests;
  process.stderr.write(`hot-path allocation (nbd legs, inline): ${perRequest.toFixed(0)} B per 4 KiB write over ${window.requests} writes\n`);
  assert.ok(perRequest <= kBudgetNbdLegsBytesPerRequest, `${perRequest.toFixed(0)} B allocated per request; budget ${kBudgetNbdLegsBytesPerRequest}`);
});
