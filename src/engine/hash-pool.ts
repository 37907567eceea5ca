/**
 * The verify hash pool: a piscina pool of worker threads (actors/hash-worker.ts) that hash
 * byte ranges of a SharedArrayBuffer in place (the request ring's data SAB, where the leg actors
 * READ into), one digest per piece. The verifier compares equal copies by memcmp and asks for
 * digests only for a unit whose copies differ (the log names them, the repair picks by them).
 *
 * Thread: created and called on the main thread; the hashing runs on the pool's workers.
 *
 * Design notes
 * - Zero copy to the workers: a task carries the SAB itself (shared, never cloned) plus the
 *   offset and length of a ring run; the worker builds a view over the same memory.
 * - Hash: xxh64 by default (xxhash-wasm), picked by measurement (bench/hash.bench.ts, README
 *   "Verify"): ~3x sha256 and ~6x blake2b512 per core here. Verify compares copies that are
 *   not adversarial (md simply memcmp's them), so a 64-bit non-cryptographic hash is enough;
 *   sha256 and blake2b512 stay selectable (`algorithm`) for the bench and the cautious.
 * - Pool size: `threads` (--verify-threads), default min(2, cores); workers start lazily
 *   (minThreads = threads keeps them warm once started) and idle out with the pool's close().
 *
 * Invariants:
 * - The caller keeps the range's slots allocated until the task's promise settled.
 * - Options are validated up front (OptionError ENBD_ERR_OPTION naming the option).
 */
import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';
import { OptionError } from '../core/errors.js';

export const kHashAlgorithms = ['xxh64', 'sha256', 'blake2b512'] as const;
export type HashAlgorithm = (typeof kHashAlgorithms)[number];

/** One task: hash [offsetBytes, offsetBytes + lengthBytes) of `buffer` in pieces. */
export interface HashTask {
  buffer: SharedArrayBuffer;
  offsetBytes: number;
  lengthBytes: number;
  pieceBytes: number;
  algorithm: HashAlgorithm;
}

export interface HashPoolOptions {
  threads?: number;
  algorithm?: HashAlgorithm;
  /**
   * The worker entry (actors/hash-worker.ts compiled; src/cli/actor-entry.ts kHashWorkerEntry):
   * the layer that starts the engine knows where the build put it. Absent: hash() refuses.
   */
  workerEntry?: URL;
}
export const kHashThreadsMax = 64;

export function defaultHashThreads(): number {
  return Math.max(1, Math.min(2, availableParallelism()));
}

export class HashPool {
  readonly threads: number;
  readonly algorithm: HashAlgorithm;
  private pool: Piscina | null = null;
  private closed = false;
  private readonly workerEntry: URL | null;

  constructor(options: HashPoolOptions = {}) {
    const threads = options.threads ?? defaultHashThreads();
    if (!Number.isInteger(threads) || threads < 1 || threads > kHashThreadsMax) {
      throw new OptionError('ENBD_ERR_OPTION', `options.threads must be an integer from 1 to ${kHashThreadsMax}`);
    }
    const algorithm = options.algorithm ?? 'xxh64';
    if (!(kHashAlgorithms as readonly string[]).includes(algorithm)) {
      throw new OptionError('ENBD_ERR_OPTION', `options.algorithm must be one of ${kHashAlgorithms.join(', ')}`);
    }
    this.threads = threads;
    this.algorithm = algorithm;
    this.workerEntry = options.workerEntry ?? null;
  }

  /** One digest per piece of the range (pieces of `pieceBytes`, the last may be shorter). */
  async hash(buffer: SharedArrayBuffer, offsetBytes: number, lengthBytes: number, pieceBytes: number): Promise<string[]> {
    if (this.closed) throw new Error('the hash pool is closed');
    if (lengthBytes <= 0 || pieceBytes <= 0) throw new OptionError('ENBD_ERR_OPTION', 'hash a non-empty range in pieces of at least one byte');
    if (this.workerEntry === null) throw new Error('the hash pool was given no worker entry (options.workerEntry)');
    this.pool ??= new Piscina({
      filename: this.workerEntry.href,
      minThreads: this.threads,
      maxThreads: this.threads,
      idleTimeout: 60_000,
    });
    const task: HashTask = { buffer, offsetBytes, lengthBytes, pieceBytes, algorithm: this.algorithm };
    return (await this.pool.run(task)) as string[];
  }

  /** Stops the workers (tasks in flight are rejected). Idempotent. */
  async close(): Promise<void> {
    this.closed = true;
    const pool = this.pool;
    this.pool = null;
    await pool?.destroy();
  }
}
