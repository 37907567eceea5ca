/**
 * ReplyParser (client side): simple and structured replies, fed whole and split at arbitrary
 * boundaries; READ data lands in the destination at the chunk's offset; errors map to NBD
 * errno values; every framing violation is a protocol error. Also the RequestTable's cookies.
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { ReplyParser, type ReplyEvents } from '../../../src/nbd/client/client-replies.js';
import { normalizeErrno } from '../../../src/nbd/protocol-names.js';
import { RequestTable, kRequestSlotsInitial, kRequestSlotsMax } from '../../../src/nbd/client/client-requests.js';
import {
  kCmdBlockStatus,
  kCmdFlush,
  kCmdRead,
  kCmdWrite,
  kEInval,
  kEIo,
  kENoSpc,
  kEPerm,
  kReplyFlagDone,
  kReplyTypeBlockStatus,
  kReplyTypeError,
  kReplyTypeErrorOffset,
  kReplyTypeNone,
  kReplyTypeOffsetHole,
} from '../../../src/nbd/protocol.js';
import { dataChunk, errorChunk, holeChunk, simpleReply as simple, structuredChunk as chunk } from '../../helpers/nbd-wire.js';

interface Recorded {
  done: [number, number][];
  blockStatus: [number, number[]][];
  errors: [number, number, string][];
  protocolErrors: string[];
}

function harness(): { table: RequestTable; parser: ReplyParser; recorded: Recorded } {
  const table = new RequestTable(4);
  const recorded: Recorded = { done: [], blockStatus: [], errors: [], protocolErrors: [] };
  const events: ReplyEvents = {
    onReplyDone: (slot, errno) => {
      recorded.done.push([table.token[slot] as number, errno]);
      table.release(slot);
    },
    onBlockStatus: (slot, view, start, end) => {
      const words: number[] = [];
      for (let at = start; at < end; at += 4) words.push(view.readUInt32BE(at));
      recorded.blockStatus.push([table.token[slot] as number, words]);
    },
    onChunkError: (slot, errno, message) => recorded.errors.push([table.token[slot] as number, errno, message]),
    onProtocolError: (message) => recorded.protocolErrors.push(message),
  };
  return { table, parser: new ReplyParser(table, events), recorded };
}

/** Start a request; returns its cookie halves. */
function start(table: RequestTable, command: number, offsetBytes: number, data: Uint8Array | null, token: number, lengthBytes = data?.length ?? 0): [number, number] {
  const slot = table.acquire();
  assert.ok(slot >= 0);
  table.command[slot] = command;
  table.token[slot] = token;
  table.offsetBytes[slot] = offsetBytes;
  table.lengthBytes[slot] = lengthBytes;
  table.data[slot] = data;
  return [table.generation[slot] as number, slot];
}

function feed(parser: ReplyParser, stream: Buffer, cuts: number[] = []): void {
  const points = [...new Set(cuts.map((cut) => cut % (stream.length + 1)))].sort((a, b) => a - b);
  let position = 0;
  for (const point of [...points, stream.length]) {
    if (point <= position) continue;
    // Copy into a reused-looking buffer at an offset, as onread would deliver it.
    const delivery = Buffer.alloc(point - position + 7, 0xee);
    stream.copy(delivery, 0, position, point);
    parser.push(delivery, 0, point - position);
    delivery.fill(0xdd); // the parser must not keep references into delivered bytes
    position = point;
  }
}

test('simple replies: success, error, and READ data', () => {
  const { table, parser, recorded } = harness();
  const write = start(table, kCmdWrite, 0, null, 10, 512);
  const flush = start(table, kCmdFlush, 0, null, 11);
  const target = new Uint8Array(8);
  const read = start(table, kCmdRead, 4096, target, 12);
  const payload = Buffer.from('abcdefgh');
  feed(parser, Buffer.concat([simple(flush, kEIo), simple(read, 0, payload), simple(write, 0)]));
  assert.deepEqual(recorded.done, [[11, kEIo], [12, 0], [10, 0]]);
  assert.deepEqual(Buffer.from(target), payload);
  assert.deepEqual(recorded.protocolErrors, []);
  assert.ok(parser.isIdle);
  assert.equal(table.inUseCount, 0);
});

test('structured READ: out-of-order data and hole chunks fill the destination', () => {
  const { table, parser, recorded } = harness();
  const target = new Uint8Array(32).fill(0x77);
  const read = start(table, kCmdRead, 1000, target, 5);
  const stream = Buffer.concat([
    dataChunk(read, 0, 1016, Buffer.alloc(16, 0xbb)),
    holeChunk(read, 0, 1008, 8),
    dataChunk(read, 0, 1000, Buffer.alloc(8, 0xaa)),
    chunk(read, kReplyFlagDone, kReplyTypeNone),
  ]);
  feed(parser, stream);
  assert.deepEqual(recorded.done, [[5, 0]]);
  const expected = Buffer.concat([Buffer.alloc(8, 0xaa), Buffer.alloc(8, 0), Buffer.alloc(16, 0xbb)]);
  assert.deepEqual(Buffer.from(target), expected);
});

test('structured READ: the DONE flag may ride on the last data chunk', () => {
  const { table, parser, recorded } = harness();
  const target = new Uint8Array(4);
  const read = start(table, kCmdRead, 0, target, 1);
  feed(parser, dataChunk(read, kReplyFlagDone, 0, Buffer.from([1, 2, 3, 4])));
  assert.deepEqual(recorded.done, [[1, 0]]);
  assert.deepEqual([...target], [1, 2, 3, 4]);
});

test('error chunks fail the request with their errno; unknown values become EINVAL', () => {
  const { table, parser, recorded } = harness();
  const first = start(table, kCmdRead, 0, new Uint8Array(4), 1);
  const second = start(table, kCmdWrite, 0, null, 2, 4);
  const third = start(table, kCmdFlush, 0, null, 3);
  feed(
    parser,
    Buffer.concat([
      errorChunk(first, 0, kEIo, 'disk on fire'),
      chunk(first, kReplyFlagDone, kReplyTypeNone),
      errorChunk(second, kReplyFlagDone, kENoSpc, 'full', kReplyTypeErrorOffset, 2),
      simple(third, 9999),
    ]),
  );
  assert.deepEqual(recorded.done, [[1, kEIo], [2, kENoSpc], [3, kEInval]]);
  assert.deepEqual(recorded.errors, [[1, kEIo, 'disk on fire'], [2, kENoSpc, 'full']]);
  assert.equal(normalizeErrno(kEPerm), kEPerm);
  assert.equal(normalizeErrno(0), kEInval);
  assert.equal(normalizeErrno(4), kEInval);
});

test('an unknown error chunk type fails only that request; the stream continues', () => {
  const { table, parser, recorded } = harness();
  const first = start(table, kCmdFlush, 0, null, 1);
  const second = start(table, kCmdFlush, 0, null, 2);
  feed(parser, Buffer.concat([errorChunk(first, kReplyFlagDone, kEPerm, 'nope', 0x8123), simple(second, 0)]));
  assert.deepEqual(recorded.done, [[1, kEPerm], [2, 0]]);
  assert.deepEqual(recorded.protocolErrors, []);
});

test('BLOCK_STATUS chunks are handed over as views', () => {
  const { table, parser, recorded } = harness();
  const status = start(table, kCmdBlockStatus, 0, null, 9, 1 << 20);
  const payload = Buffer.alloc(4 + 16);
  payload.writeUInt32BE(1, 0);
  payload.writeUInt32BE(4096, 4);
  payload.writeUInt32BE(0, 8);
  payload.writeUInt32BE(1 << 20, 12);
  payload.writeUInt32BE(3, 16);
  feed(parser, chunk(status, kReplyFlagDone, kReplyTypeBlockStatus, payload), [3, 21, 30]);
  assert.deepEqual(recorded.blockStatus, [[9, [1, 4096, 0, 1 << 20, 3]]]);
  assert.deepEqual(recorded.done, [[9, 0]]);
});

interface BadCase {
  name: string;
  build: (table: RequestTable) => Buffer;
  message: RegExp;
}

const badCases: BadCase[] = [
  { name: 'bad magic', build: () => Buffer.alloc(20, 0x11), message: /bad reply magic/ },
  { name: 'unknown cookie', build: () => simple([0, 3], 0), message: /unknown cookie/ },
  {
    name: 'stale generation',
    build: (table) => {
      const cookie = start(table, kCmdFlush, 0, null, 1);
      table.release(cookie[1]);
      start(table, kCmdFlush, 0, null, 2);
      return simple(cookie, 0);
    },
    message: /unknown cookie/,
  },
  {
    name: 'unknown non-error chunk type',
    build: (table) => chunk(start(table, kCmdFlush, 0, null, 1), kReplyFlagDone, 77),
    message: /unknown structured reply chunk type 77/,
  },
  {
    name: 'data chunk past the request',
    build: (table) => dataChunk(start(table, kCmdRead, 100, new Uint8Array(8), 1), kReplyFlagDone, 104, Buffer.alloc(8)),
    message: /outside the request/,
  },
  {
    name: 'data chunk before the request',
    build: (table) => dataChunk(start(table, kCmdRead, 100, new Uint8Array(8), 1), kReplyFlagDone, 96, Buffer.alloc(4)),
    message: /outside the request/,
  },
  {
    name: 'READ not fully covered',
    build: (table) => dataChunk(start(table, kCmdRead, 0, new Uint8Array(8), 1), kReplyFlagDone, 0, Buffer.alloc(4)),
    message: /covered 4 of 8/,
  },
  {
    name: 'overlapping chunks',
    build: (table) => {
      const read = start(table, kCmdRead, 0, new Uint8Array(8), 1);
      return Buffer.concat([holeChunk(read, 0, 0, 8), holeChunk(read, 0, 4, 4)]);
    },
    message: /cover more than/,
  },
  {
    name: 'data chunk for a WRITE',
    build: (table) => dataChunk(start(table, kCmdWrite, 0, null, 1, 8), kReplyFlagDone, 0, Buffer.alloc(8)),
    message: /OFFSET_DATA chunk for command 1/,
  },
  {
    name: 'short hole chunk',
    build: (table) => chunk(start(table, kCmdRead, 0, new Uint8Array(8), 1), kReplyFlagDone, kReplyTypeOffsetHole, Buffer.alloc(8)),
    message: /OFFSET_HOLE chunk of 8 bytes/,
  },
  {
    name: 'NONE without DONE',
    build: (table) => chunk(start(table, kCmdFlush, 0, null, 1), 0, kReplyTypeNone),
    message: /without the DONE flag/,
  },
  {
    name: 'NONE with payload',
    build: (table) => chunk(start(table, kCmdFlush, 0, null, 1), kReplyFlagDone, kReplyTypeNone, Buffer.alloc(2)),
    message: /NONE chunk with 2 payload bytes/,
  },
  {
    name: 'error message longer than its chunk',
    build: (table) => {
      const frame = errorChunk(start(table, kCmdFlush, 0, null, 1), kReplyFlagDone, kEIo, 'abc');
      frame.writeUInt16BE(50, 24);
      return frame;
    },
    message: /does not fit/,
  },
  {
    name: 'error chunk shorter than 6 bytes',
    build: (table) => chunk(start(table, kCmdFlush, 0, null, 1), kReplyFlagDone, kReplyTypeError, Buffer.alloc(4)),
    message: /error chunk type 0x8001 of 4 bytes/,
  },
  {
    name: 'block status with a ragged length',
    build: (table) => chunk(start(table, kCmdBlockStatus, 0, null, 1, 8), kReplyFlagDone, kReplyTypeBlockStatus, Buffer.alloc(14)),
    message: /BLOCK_STATUS chunk of 14 bytes/,
  },
  {
    name: 'simple success for BLOCK_STATUS',
    build: (table) => simple(start(table, kCmdBlockStatus, 0, null, 1, 8), 0),
    message: /status chunks are required/,
  },
];

for (const bad of badCases) {
  test(`protocol error: ${bad.name} (reported once, then nothing is parsed)`, () => {
    const { table, parser, recorded } = harness();
    const frame = bad.build(table);
    const after = start(table, kCmdFlush, 0, null, 99);
    feed(parser, Buffer.concat([frame, simple(after, 0)]));
    assert.equal(recorded.protocolErrors.length, 1);
    assert.match(recorded.protocolErrors[0] as string, bad.message);
    assert.ok(parser.isDead);
    assert.ok(!recorded.done.some(([token]) => token === 99), 'nothing parsed after the error');
  });
}

test('property: any split of a reply stream gives the same results as the whole stream', () => {
  const requestArbitrary = fc.record({
    kind: fc.constantFrom('simple-read', 'chunked-read', 'write', 'error'),
    lengthBytes: fc.integer({ min: 1, max: 300 }),
    pieces: fc.integer({ min: 1, max: 4 }),
    seed: fc.integer({ min: 0, max: 255 }),
  });
  fc.assert(
    fc.property(fc.array(requestArbitrary, { minLength: 1, maxLength: 12 }), fc.array(fc.nat(), { maxLength: 30 }), (requests, cuts) => {
      const { table, parser, recorded } = harness();
      const frames: Buffer[] = [];
      const expectations: { target: Uint8Array | null; content: Buffer | null }[] = [];
      requests.forEach((request, token) => {
        const content = Buffer.alloc(request.lengthBytes, 0);
        for (let index = 0; index < content.length; index++) content[index] = (request.seed + index * 31) & 0xff;
        const offsetBytes = 4096 * token;
        if (request.kind === 'write' || request.kind === 'error') {
          const cookie = start(table, kCmdWrite, offsetBytes, null, token, request.lengthBytes);
          frames.push(request.kind === 'write' ? simple(cookie, 0) : errorChunk(cookie, kReplyFlagDone, kEIo, `e${token}`));
          expectations.push({ target: null, content: null });
          return;
        }
        const target = new Uint8Array(request.lengthBytes).fill(0x5a);
        const cookie = start(table, kCmdRead, offsetBytes, target, token);
        expectations.push({ target, content });
        if (request.kind === 'simple-read') {
          frames.push(simple(cookie, 0, content));
          return;
        }
        // Cut the range into pieces; zero pieces are sent as holes, in reverse order.
        const step = Math.max(1, Math.ceil(request.lengthBytes / request.pieces));
        const parts: Buffer[] = [];
        for (let at = 0; at < request.lengthBytes; at += step) {
          const piece = content.subarray(at, Math.min(at + step, request.lengthBytes));
          if ((at / step) % 2 === 1) {
            piece.fill(0);
            parts.push(holeChunk(cookie, 0, offsetBytes + at, piece.length));
          } else {
            parts.push(dataChunk(cookie, 0, offsetBytes + at, piece));
          }
        }
        frames.push(...parts.reverse(), chunk(cookie, kReplyFlagDone, kReplyTypeNone));
      });
      feed(parser, Buffer.concat(frames), cuts);
      assert.deepEqual(recorded.protocolErrors, []);
      assert.equal(recorded.done.length, requests.length);
      for (const [token, errno] of recorded.done) {
        assert.equal(errno, requests[token]?.kind === 'error' ? kEIo : 0);
        const { target, content } = expectations[token] ?? { target: null, content: null };
        if (target !== null && content !== null) assert.deepEqual(Buffer.from(target), content);
      }
      assert.equal(table.inUseCount, 0);
      assert.ok(parser.isIdle);
    }),
    { numRuns: propertyRuns(500) },
  );
});

test('property: direct receive (directTarget/directReceived, wantBytes lookahead) gives the same bytes as push, and counts each data byte once', () => {
  const requestArbitrary = fc.record({
    kind: fc.constantFrom('simple-read', 'chunked-read', 'write'),
    lengthBytes: fc.integer({ min: 1, max: 400 }),
    pieces: fc.integer({ min: 1, max: 4 }),
    seed: fc.integer({ min: 0, max: 255 }),
  });
  fc.assert(
    fc.property(fc.array(requestArbitrary, { minLength: 1, maxLength: 10 }), fc.array(fc.integer({ min: 1, max: 97 }), { minLength: 1, maxLength: 40 }), fc.integer({ min: 1, max: 64 }), fc.boolean(), (requests, reads, minBytes, structuredHint) => {
      const { table, parser, recorded } = harness();
      const frames: Buffer[] = [];
      const expectations: { target: Uint8Array | null; content: Buffer | null }[] = [];
      let dataBytes = 0;
      requests.forEach((request, token) => {
        const content = Buffer.alloc(request.lengthBytes);
        for (let index = 0; index < content.length; index++) content[index] = (request.seed + index * 29) & 0xff;
        const offsetBytes = 4096 * token;
        if (request.kind === 'write') {
          frames.push(simple(start(table, kCmdWrite, offsetBytes, null, token, request.lengthBytes), 0));
          expectations.push({ target: null, content: null });
          return;
        }
        const target = new Uint8Array(new SharedArrayBuffer(request.lengthBytes)).fill(0x5a);
        const cookie = start(table, kCmdRead, offsetBytes, target, token);
        expectations.push({ target, content });
        dataBytes += request.lengthBytes;
        if (request.kind === 'simple-read') {
          frames.push(simple(cookie, 0, content));
          return;
        }
        const step = Math.max(1, Math.ceil(request.lengthBytes / request.pieces));
        const parts: Buffer[] = [];
        for (let at = 0; at < request.lengthBytes; at += step) {
          const piece = content.subarray(at, Math.min(at + step, request.lengthBytes));
          parts.push(dataChunk(cookie, 0, offsetBytes + at, piece));
        }
        frames.push(...parts.reverse(), chunk(cookie, kReplyFlagDone, kReplyTypeNone));
      });
      // Drive the parser like NbdClient's onread: a direct target when offered, else a
      // lookahead read of wantBytes (every other time) or a read of the next size in `reads`.
      const stream = Buffer.concat(frames);
      let position = 0;
      let step = 0;
      while (position < stream.length) {
        const size = reads[step % reads.length] as number;
        step += 1;
        const target = parser.directTarget(minBytes);
        if (target !== null) {
          const count = Math.min(size, target.length, stream.length - position);
          target.set(stream.subarray(position, position + count));
          parser.directReceived(count);
          position += count;
          continue;
        }
        const want = step % 2 === 0 ? parser.wantBytes(structuredHint) : size;
        assert.ok(want > 0, 'a live parser always wants bytes');
        const count = Math.min(want, stream.length - position);
        const delivery = Buffer.alloc(count);
        stream.copy(delivery, 0, position, position + count);
        parser.push(delivery, 0, count);
        delivery.fill(0xdd);
        position += count;
      }
      assert.deepEqual(recorded.protocolErrors, []);
      assert.equal(recorded.done.length, requests.length);
      for (const [token, errno] of recorded.done) {
        assert.equal(errno, 0);
        const { target, content } = expectations[token] ?? { target: null, content: null };
        if (target !== null && content !== null) assert.ok(Buffer.from(target.buffer as SharedArrayBuffer).equals(content));
      }
      assert.equal(parser.dataBytesCopied + parser.dataBytesDirect, dataBytes);
      assert.equal(table.inUseCount, 0);
      assert.ok(parser.isIdle);
    }),
    { numRuns: propertyRuns(300) },
  );
});

test('wantBytes: exact header sizes at a reply boundary, then what finishes the header or payload', () => {
  const { table, parser } = harness();
  assert.equal(parser.wantBytes(false), 16);
  assert.equal(parser.wantBytes(true), 28, 'a structured chunk header and an OFFSET_DATA offset');
  const target = new Uint8Array(100_000);
  const cookie = start(table, kCmdRead, 0, target, 1);
  const frame = dataChunk(cookie, kReplyFlagDone, 0, Buffer.alloc(100_000, 7));
  parser.push(frame, 0, 3);
  assert.equal(parser.wantBytes(true), 17, 'the rest of a 20-byte header');
  parser.push(frame, 3, 20);
  assert.equal(parser.wantBytes(true), 8, 'the data chunk offset');
  assert.equal(parser.directTarget(1), null, 'no data state yet');
  parser.push(frame, 20, 28);
  assert.equal(parser.wantBytes(true), 100_000);
  assert.equal(parser.directTarget(100_001), null, 'below the minimum before any direct byte');
  const whole = parser.directTarget(65_536);
  assert.equal(whole, target, 'all of it left: the destination itself, no view');
  frame.copy(target, 0, 28, 28 + 40_000);
  parser.directReceived(40_000);
  const rest = parser.directTarget(65_536);
  assert.ok(rest !== null && rest.length === 60_000 && rest.byteOffset === 40_000, 'once direct, the tail stays direct below the minimum');
  frame.copy(rest, 0, 28 + 40_000);
  parser.directReceived(60_000);
  assert.ok(parser.isIdle);
  assert.equal(parser.dataBytesDirect, 100_000);
  assert.equal(parser.dataBytesCopied, 0);
  assert.ok(target.every((byte) => byte === 7));
});

test('property: random bytes never crash the parser (protocol error or nothing)', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 200 }), fc.array(fc.nat(), { maxLength: 10 }), (bytes, cuts) => {
      const { table, parser, recorded } = harness();
      start(table, kCmdRead, 0, new Uint8Array(64), 1);
      start(table, kCmdBlockStatus, 0, null, 2, 64);
      feed(parser, Buffer.from(bytes), cuts);
      assert.ok(recorded.protocolErrors.length <= 1);
    }),
    { numRuns: propertyRuns(1000) },
  );
});

test('RequestTable: grows by doubling, recycles slots with a new generation, stops at the bound', () => {
  const table = new RequestTable();
  assert.equal(table.capacity, kRequestSlotsInitial);
  const slots: number[] = [];
  for (let index = 0; index < kRequestSlotsInitial + 1; index++) slots.push(table.acquire());
  assert.equal(table.capacity, kRequestSlotsInitial * 2);
  assert.equal(new Set(slots).size, slots.length);
  const slot = slots[3] as number;
  const generation = table.generation[slot] as number;
  assert.equal(table.lookup(generation, slot), slot);
  table.release(slot);
  assert.equal(table.lookup(generation, slot), -1);
  assert.equal(table.acquire(), slot);
  assert.equal(table.lookup(generation + 1, slot), slot);
  assert.equal(table.lookup(0, 1_000_000), -1);
  while (table.inUseCount < kRequestSlotsMax) assert.ok(table.acquire() >= 0);
  assert.equal(table.acquire(), -1);
  assert.equal(table.capacity, kRequestSlotsMax);
});
