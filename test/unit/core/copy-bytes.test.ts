/**
 * CongruentCopier / copyBytes (src/core/copy-bytes.ts): every source/target kind (shared or
 * plain), every alignment pair mod 8, lengths around the staging threshold and past the scratch
 * size: the target holds exactly what TypedArray.set would have put there, nothing outside the
 * range changes, and the non-congruent shared/plain pairs really take the staged path.
 * Thread: the test runner's main thread.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CongruentCopier, copyBytes, stagedCopyCount } from '../../../src/core/copy-bytes.js';

const kLengths = [0, 1, 255, 256, 4096, 4097, 65536 + 13, 200_000];

function filled(bytes: Uint8Array, seed: number): Uint8Array {
  for (let index = 0; index < bytes.length; index += 1) bytes[index] = (index * 31 + seed) & 0xff;
  return bytes;
}

function region(shared: boolean, bytes: number): Uint8Array {
  return new Uint8Array(shared ? new SharedArrayBuffer(bytes) : new ArrayBuffer(bytes));
}

test('copies equal TypedArray.set for every kind, alignment and length', () => {
  const copier = new CongruentCopier();
  const space = 200_000 + 64;
  for (const sourceShared of [false, true]) {
    for (const targetShared of [false, true]) {
      const source = filled(region(sourceShared, space), 7);
      for (const length of kLengths) {
        for (let sourceStart = 0; sourceStart < 8; sourceStart += 1) {
          for (let targetOffset = 0; targetOffset < 8; targetOffset += 3) {
            const target = filled(region(targetShared, space), 99);
            const expected = filled(new Uint8Array(space), 99);
            expected.set(source.subarray(sourceStart, sourceStart + length), targetOffset);
            copier.copy(target, targetOffset, source, sourceStart, sourceStart + length);
            assert.ok(Buffer.from(target.buffer).equals(Buffer.from(expected.buffer)),
              `source ${sourceShared ? 'shared' : 'plain'}+${sourceStart} -> target ${targetShared ? 'shared' : 'plain'}+${targetOffset}, ${length} bytes`);
          }
        }
      }
    }
  }
});

test('views with their own byteOffset: congruence is taken from the real addresses', () => {
  const copier = new CongruentCopier();
  const slotData = new SharedArrayBuffer(1 << 16);
  const slot = new Uint8Array(slotData, 8192, 4096);
  const receive = filled(Buffer.allocUnsafeSlow(16384), 3);
  for (let position = 0; position < 40; position += 1) {
    slot.fill(0);
    copier.copy(slot, 0, receive, position, position + 4096);
    assert.ok(Buffer.from(slot.buffer, slot.byteOffset, 4096).equals(receive.subarray(position, position + 4096)), `receive position ${position}`);
  }
  const arena = Buffer.allocUnsafeSlow(32768);
  for (let at = 0; at < 40; at += 1) {
    filled(slot, at);
    copier.copy(arena, at, slot, 0, 4096);
    assert.ok(arena.subarray(at, at + 4096).equals(Buffer.from(slot.buffer, slot.byteOffset, 4096)), `arena position ${at}`);
  }
});

test('non-congruent shared/plain pairs are staged; congruent, small and plain pairs are not', () => {
  const copier = new CongruentCopier();
  const shared = filled(region(true, 16384), 1);
  const plain = filled(region(false, 16384), 2);
  copier.copy(plain, 28, shared, 0, 4096);
  copier.copy(shared, 0, plain, 4, 4100);
  assert.equal(copier.stagedCopies, 2);
  copier.copy(plain, 32, shared, 0, 4096);
  copier.copy(shared, 8, plain, 0, 4096);
  copier.copy(plain, 1, shared, 0, 100);
  copier.copy(plain, 3, filled(region(false, 8192), 5), 0, 4096);
  assert.equal(copier.stagedCopies, 2);
  const before = stagedCopyCount();
  copyBytes(plain, 28, shared, 0, 4096);
  assert.equal(stagedCopyCount(), before + 1);
});

test('a range outside either buffer is a programmer error', () => {
  const copier = new CongruentCopier();
  const plain = new Uint8Array(16);
  assert.throws(() => copier.copy(plain, 8, new Uint8Array(16), 0, 16));
  assert.throws(() => copier.copy(plain, 0, new Uint8Array(16), 4, 24));
});
