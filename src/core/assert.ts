/**
 * Assertions for programmer errors (TigerBeetle style): a failed assert is a bug and
 * crashes the thread that hit it. Operating errors (EOF, ECONNRESET, NBD error replies)
 * are never asserted; they are handled where they occur.
 * Threads: any. Allocation: none unless the assertion fails.
 */
import { EnbdError } from './errors.js';

/** A failed assertion (code ENBD_ERR_ASSERT): a bug, never an operating error. */
export class AssertionError extends EnbdError {
  constructor(message: string) {
    super('ENBD_ERR_ASSERT', message);
    this.name = 'AssertionError';
  }
}

export function assert(condition: unknown, message?: string): asserts condition {
  if (!condition) throw new AssertionError(message ?? 'assertion failed');
}

export function isPowerOfTwo(value: number): boolean {
  return Number.isInteger(value) && value > 0 && (value & (value - 1)) === 0;
}

export function assertSafeInteger(value: number, what: string): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new AssertionError(`${what} must be a non-negative safe integer, got ${value}`);
  }
}
