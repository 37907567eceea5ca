/**
 * Control socket framing (src/control/frame.ts): property tests with fast-check. Any split of
 * a stream of frames decodes to the same messages in the same order; length prefixes of 0 or
 * above 1 MiB are refused as soon as the 4 prefix bytes are in, whatever the split; garbage
 * only ever raises FrameError; decoded values never alias the input.
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { FrameDecoder, FrameError, encodeFrame, kFrameBodyBytesMax, kFrameHeaderBytes } from '../../../src/control/frame.js';

const kRuns = propertyRuns(300);

/** Values msgpack carries unchanged (no -0, no undefined, no '__proto__' keys). */
const message: fc.Arbitrary<unknown> = fc.letrec((tie) => ({
  value: fc.oneof(
    { depthSize: 'small' },
    fc.constant(null),
    fc.boolean(),
    fc.maxSafeInteger(),
    fc.double({ noNaN: true }).filter((value) => !Object.is(value, -0)),
    fc.string({ unit: 'grapheme', maxLength: 40 }),
    fc.uint8Array({ maxLength: 64 }).map((bytes) => Buffer.from(bytes)), // msgpack bin: decoded as a Buffer
    fc.array(tie('value'), { maxLength: 6 }),
    fc.dictionary(fc.string({ maxLength: 8 }).filter((key) => key !== '__proto__'), tie('value'), { maxKeys: 6, noNullPrototype: true }),
  ),
})).value;

/** Cuts `stream` at the given points (sorted, deduplicated, inside the stream). */
function split(stream: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((cut) => cut % (stream.length + 1)))].sort((left, right) => left - right);
  const pieces: Buffer[] = [];
  let from = 0;
  for (const point of points) {
    pieces.push(stream.subarray(from, point));
    from = point;
  }
  pieces.push(stream.subarray(from));
  return pieces;
}

function decodeAll(pieces: Buffer[]): unknown[] {
  const decoder = new FrameDecoder();
  const out: unknown[] = [];
  for (const piece of pieces) decoder.push(piece, (value) => out.push(value));
  assert.equal(decoder.pendingBytes, 0, 'no bytes left over after whole frames');
  return out;
}

test('random splits of a stream of frames decode to the same messages, in order', () => {
  fc.assert(
    fc.property(fc.array(message, { minLength: 1, maxLength: 12 }), fc.array(fc.nat(), { maxLength: 40 }), (messages, cuts) => {
      const stream = Buffer.concat(messages.map((value) => encodeFrame(value)));
      assert.deepStrictEqual(decodeAll(split(stream, cuts)), messages);
    }),
    { numRuns: kRuns },
  );
});

test('byte-by-byte delivery and one-chunk delivery agree (frames near 1 MiB too)', () => {
  const big = { blob: Buffer.alloc(kFrameBodyBytesMax - 64, 7), id: 1 };
  const messages = [{ id: 0 }, big, 'tail'];
  const stream = Buffer.concat(messages.map((value) => encodeFrame(value)));
  assert.deepStrictEqual(decodeAll([stream]), messages);
  const decoder = new FrameDecoder();
  const out: unknown[] = [];
  for (let at = 0; at < stream.length; at += 4093) decoder.push(stream.subarray(at, at + 4093), (value) => out.push(value));
  assert.deepStrictEqual(out, messages);
});

test('a length prefix above 1 MiB is refused once its 4 bytes are in, at any split', () => {
  fc.assert(
    fc.property(fc.integer({ min: kFrameBodyBytesMax + 1, max: 0xffff_ffff }), fc.array(fc.nat(), { maxLength: 4 }), fc.array(message, { maxLength: 3 }), (length, cuts, before) => {
      const prefix = Buffer.alloc(kFrameHeaderBytes);
      prefix.writeUInt32BE(length, 0);
      const good = Buffer.concat(before.map((value) => encodeFrame(value)));
      const stream = Buffer.concat([good, prefix]);
      const decoder = new FrameDecoder();
      const out: unknown[] = [];
      let error: unknown = null;
      try {
        for (const piece of split(stream, cuts)) decoder.push(piece, (value) => out.push(value));
      } catch (caught) {
        error = caught;
      }
      assert.ok(error instanceof FrameError, 'oversized prefix raises FrameError');
      assert.equal(error.code, 'ENBD_CTL_FRAME_TOO_LARGE');
      assert.deepStrictEqual(out, before, 'frames before the bad one were delivered');
      assert.ok(decoder.pendingBytes <= kFrameHeaderBytes, 'no body byte was buffered');
    }),
    { numRuns: kRuns },
  );
});

test('a zero length prefix is refused', () => {
  const decoder = new FrameDecoder();
  assert.throws(() => decoder.push(Buffer.alloc(4), () => assert.fail('no message')), (error: unknown) => error instanceof FrameError && error.code === 'ENBD_CTL_FRAME_EMPTY');
});

test('an undecodable body raises FrameError and poisons the decoder', () => {
  const truncated = Buffer.from([0, 0, 0, 2, 0xdc, 0x00]); // array16 header cut short
  const decoder = new FrameDecoder();
  assert.throws(() => decoder.push(truncated, () => assert.fail('no message')), (error: unknown) => error instanceof FrameError && error.code === 'ENBD_CTL_FRAME_UNDECODABLE');
  assert.throws(() => decoder.push(Buffer.from([1]), () => undefined), /used after a FrameError/);
});

test('a body nested a million levels deep is undecodable, and the next decoder is unaffected', () => {
  const bomb = Buffer.concat([Buffer.from([0x00, 0x10, 0x00, 0x00]), Buffer.alloc(kFrameBodyBytesMax, 0x91)]);
  assert.throws(() => new FrameDecoder().push(bomb, () => assert.fail('no message')), (error: unknown) => error instanceof FrameError && error.code === 'ENBD_CTL_FRAME_UNDECODABLE');
  assert.deepStrictEqual(decodeAll([encodeFrame({ id: 1, method: 'status' })]), [{ id: 1, method: 'status' }]);
});

test('random garbage raises nothing but FrameError, whatever the split', () => {
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 1, maxLength: 300 }), fc.array(fc.nat(), { maxLength: 8 }), (bytes, cuts) => {
      const decoder = new FrameDecoder();
      try {
        for (const piece of split(Buffer.from(bytes), cuts)) decoder.push(piece, () => undefined);
      } catch (error) {
        assert.ok(error instanceof FrameError, `only FrameError escapes, got ${String(error)}`);
      }
    }),
    { numRuns: kRuns },
  );
});

test('encodeFrame refuses a message larger than 1 MiB', () => {
  assert.throws(() => encodeFrame({ blob: Buffer.alloc(kFrameBodyBytesMax + 1) }), (error: unknown) => error instanceof FrameError && error.code === 'ENBD_CTL_FRAME_TOO_LARGE');
});

test('decoded binary values are copies, not views of the input chunk', () => {
  const frame = encodeFrame({ data: new Uint8Array([1, 2, 3, 4]) });
  const decoder = new FrameDecoder();
  let decoded: unknown = null;
  decoder.push(frame, (value) => (decoded = value));
  frame.fill(0xee);
  assert.deepStrictEqual(decoded, { data: Buffer.from([1, 2, 3, 4]) });
});
