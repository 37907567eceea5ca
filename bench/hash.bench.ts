/**
 * Micro-benchmark behind the verify hash choice (issue 14): single-thread throughput of each
 * candidate over 1 MiB pieces of a SharedArrayBuffer (what a hash worker sees: a view over the
 * ring's data SAB), plus the pool (src/engine/hash-pool.ts) at 1, 2 and 4 threads hashing
 * in place, 64 KiB digests per 1 MiB task (the verifier's shape).
 * Candidates: node:crypto sha256 and blake2b512 (native, read the view directly) and xxh64 from
 * xxhash-wasm (WASM; copies each piece into its memory as it hashes, inside the worker).
 * Back-of-envelope: sha256 with SHA-NI ~1.5 GB/s, blake2b512 ~0.7 GB/s, xxh64 several GB/s even
 * with the copy: verify needs > 2x the leg read rate (two copies hashed per device byte), so
 * only xxh64 leaves a core mostly free at ~500 MiB/s of device.
 * Run: node dist/bench/hash.bench.js (never run by tests). Threads: main + the pool's workers.
 */
import { createHash } from 'node:crypto';
import { pathToFileURL } from 'node:url';
import xxhash from 'xxhash-wasm';
import { HashPool, kHashAlgorithms, type HashAlgorithm } from '../src/engine/hash-pool.js';
import { kHashWorkerEntry } from '../src/cli/actor-entry.js';

const kPieceBytes = 1024 * 1024;
const kBufferBytes = 64 * kPieceBytes;
const kRunMs = 1000;

export interface HashBenchResult {
  singleThreadBytesPerSecond: Record<HashAlgorithm, number>;
  /** Pool throughput (bytes/s) by algorithm and thread count. */
  poolBytesPerSecond: Array<{ algorithm: HashAlgorithm; threads: number; bytesPerSecond: number }>;
}

function filled(): Uint8Array {
  const view = new Uint8Array(new SharedArrayBuffer(kBufferBytes));
  for (let at = 0; at < view.length; at += 1) view[at] = (at * 2654435761) >>> 24;
  return view;
}

async function singleThread(view: Uint8Array): Promise<Record<HashAlgorithm, number>> {
  const xx = await xxhash();
  const digest: Record<HashAlgorithm, (piece: Uint8Array) => unknown> = {
    xxh64: (piece) => xx.create64().update(piece).digest(),
    sha256: (piece) => createHash('sha256').update(piece).digest(),
    blake2b512: (piece) => createHash('blake2b512').update(piece).digest(),
  };
  const out = {} as Record<HashAlgorithm, number>;
  for (const algorithm of kHashAlgorithms) {
    const started = performance.now();
    let bytes = 0;
    while (performance.now() - started < kRunMs) {
      for (let at = 0; at < view.length; at += kPieceBytes) {
        digest[algorithm](view.subarray(at, at + kPieceBytes));
        bytes += kPieceBytes;
      }
    }
    out[algorithm] = bytes / ((performance.now() - started) / 1000);
  }
  return out;
}

async function pooled(view: Uint8Array, algorithm: HashAlgorithm, threads: number): Promise<number> {
  const pool = new HashPool({ threads, algorithm, workerEntry: kHashWorkerEntry });
  try {
    const buffer = view.buffer as SharedArrayBuffer;
    await pool.hash(buffer, 0, kPieceBytes, 64 * 1024); // start the workers
    const started = performance.now();
    let bytes = 0;
    while (performance.now() - started < kRunMs) {
      const tasks: Promise<string[]>[] = [];
      for (let at = 0; at < view.length; at += kPieceBytes) tasks.push(pool.hash(buffer, at, kPieceBytes, 64 * 1024));
      await Promise.all(tasks);
      bytes += view.length;
    }
    return bytes / ((performance.now() - started) / 1000);
  } finally {
    await pool.close();
  }
}

export async function runHashBench(): Promise<HashBenchResult> {
  const view = filled();
  const singleThreadBytesPerSecond = await singleThread(view);
  const poolBytesPerSecond: HashBenchResult['poolBytesPerSecond'] = [];
  for (const algorithm of kHashAlgorithms) {
    for (const threads of [1, 2, 4]) poolBytesPerSecond.push({ algorithm, threads, bytesPerSecond: await pooled(view, algorithm, threads) });
  }
  return { singleThreadBytesPerSecond, poolBytesPerSecond };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const result = await runHashBench();
  const mib = (value: number): string => `${(value / 2 ** 20).toFixed(0)} MiB/s`;
  for (const algorithm of kHashAlgorithms) process.stdout.write(`single thread  ${algorithm.padEnd(10)} ${mib(result.singleThreadBytesPerSecond[algorithm])}\n`);
  for (const entry of result.poolBytesPerSecond) process.stdout.write(`pool ${entry.threads} thread(s) ${entry.algorithm.padEnd(10)} ${mib(entry.bytesPerSecond)}\n`);
}
