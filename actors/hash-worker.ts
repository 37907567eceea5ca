/**
 * Piscina worker of the verify hash pool (src/engine/hash-pool.ts): hashes pieces of a ring
 * run in place and answers one digest per piece.
 *
 * Thread: a piscina worker thread (never the main thread).
 *
 * Design notes
 * - The task names a SharedArrayBuffer (the request ring's data SAB) and a byte range in it.
 *   A SAB crosses postMessage by reference, so the bytes are never copied to reach this thread;
 *   the view below is made over the same memory the connection actors READ into.
 * - xxh64 (xxhash-wasm) copies each piece into its WASM memory as it hashes (inside this
 *   worker, at memcpy speed); node:crypto's sha256/blake2b512 read the view directly.
 * - The digest is a hex string: small (16 or 64 characters per piece), cloned back cheaply.
 *
 * Invariants:
 * - The master does not free or reuse the run until this task answered (it awaits it), so the
 *   bytes cannot change under the hash.
 * - Pieces tile [offsetBytes, offsetBytes + lengthBytes); the last may be shorter.
 */
import { createHash } from 'node:crypto';
import xxhash from 'xxhash-wasm';
import type { XXHashAPI } from 'xxhash-wasm';
import type { HashAlgorithm, HashTask } from '../src/engine/hash-pool.js';

let xx: XXHashAPI | null = null;
const xxReady: Promise<XXHashAPI> = xxhash().then((api) => (xx = api));

function digestOf(algorithm: HashAlgorithm, view: Uint8Array): string {
  if (algorithm === 'xxh64') {
    const api = xx as XXHashAPI;
    return api.create64().update(view).digest().toString(16).padStart(16, '0');
  }
  return createHash(algorithm).update(view).digest('hex');
}

export default async function hashPieces(task: HashTask): Promise<string[]> {
  if (task.algorithm === 'xxh64' && xx === null) await xxReady;
  if (!(task.buffer instanceof SharedArrayBuffer)) throw new TypeError('task.buffer must be a SharedArrayBuffer');
  if (task.pieceBytes <= 0 || task.offsetBytes < 0 || task.offsetBytes + task.lengthBytes > task.buffer.byteLength) {
    throw new RangeError('task range must lie inside the buffer, with pieces of at least one byte');
  }
  const data = new Uint8Array(task.buffer, task.offsetBytes, task.lengthBytes);
  const digests: string[] = [];
  for (let at = 0; at < task.lengthBytes; at += task.pieceBytes) {
    digests.push(digestOf(task.algorithm, data.subarray(at, Math.min(task.lengthBytes, at + task.pieceBytes))));
  }
  return digests;
}
