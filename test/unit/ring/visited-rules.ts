/**
 * Shared deterministic rules for visited-mask.test.ts and visited-ack.worker.ts: which leg
 * fails which request, with which errno, and the offset the master writes. Not a test file.
 * Threads: any.
 */

export const kStop = 0x7fffffff;

export function legFails(slot: number, generation: number, legIndex: number): boolean {
  return (slot * 7 + generation * 13 + legIndex * 5) % 11 === 0;
}

export function legErrnoFor(legIndex: number): number {
  return 5 + legIndex * 23; // 5 EIO, 28 ENOSPC, 51, 74 ...: distinct per leg
}

export function expectedOffsetBytes(slot: number, generation: number): number {
  return generation * 2 ** 33 + slot * 4096; // exercises the high offset word
}
