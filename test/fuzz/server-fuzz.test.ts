/**
 * Fuzz the in-process NBD server (createNbdServer over a MemoryDevice, Unix socket) with
 * random and mutated byte streams: pure noise, valid handshake prefixes with random option
 * tails, valid negotiations followed by requests with mutated fields, and bit-flipped /
 * truncated versions of all of them, sent in chunks split at random boundaries.
 *
 * Properties (each run):
 * - the server never throws out of a socket callback (an uncaught exception kills this test
 *   process) and never submits an unvalidated request (MemoryDevice.rejectedCount stays 0);
 * - every connection gets the greeting and is closed by the server once the client half-closes
 *   (bounded wait);
 * - a well-formed negotiation, then well-formed requests mixed with drawn (maybe malformed)
 *   ones and NBD_CMD_DISC: every final reply carries the cookie of a request, at most one per
 *   request; every well-formed request is answered unless a malformed one ended the connection;
 * - three targets: a plain MemoryDevice, a buffer-lending PooledMemoryDevice (acquireBuffer
 *   path, a small pool that is often empty, and refusals now and then), and the same with
 *   direct receive (`--receive direct`); lent buffers all come back, none twice.
 * After all runs: no connection is left open, and a well-formed client reads back what it wrote.
 *
 * Runs: ENBD_FUZZ_RUNS (default 3000 for the first target's streams, a third for the other
 * targets, a sixth for each reply exchange; `npm run fuzz:long` uses 200000).
 * Threads: test process main thread (server and clients share the event loop).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../helpers/runs.js';
import { connect } from 'node:net';
import { setImmediate as yieldToLoop, setTimeout as sleep } from 'node:timers/promises';
import { createNbdServer, type NbdServer } from '../../src/nbd/server/server.js';
import { createLogger } from '../../src/core/log.js';
import * as p from '../../src/nbd/protocol.js';
import { commandNames } from '../../src/nbd/protocol-names.js';
import { MemoryDevice, PooledMemoryDevice } from '../helpers/memory-device.js';
import { NbdProbe, assembleRead } from '../helpers/nbd-probe.js';
import { scratch, waitFor, type Scratch } from '../helpers/tools.js';

const kRuns = propertyRuns(3000);
const kSeed = process.env['ENBD_FUZZ_SEED'] === undefined ? undefined : Number(process.env['ENBD_FUZZ_SEED']);
const kSizeBytes = 1024 * 1024;
const kMaxPayloadBytes = 65536;
const kExportName = 'fuzz';
const kCloseWaitMs = 5000;
const kPayloadCapBytes = 8192;

// ---- byte-stream building blocks ----

function u32(value: number): Buffer {
  const bytes = Buffer.alloc(4);
  bytes.writeUInt32BE(value >>> 0, 0);
  return bytes;
}

function option(code: number, data: Buffer, declaredLength = data.length): Buffer {
  const header = Buffer.alloc(16);
  header.writeUInt32BE(p.kIHaveOptHigh, 0);
  header.writeUInt32BE(p.kIHaveOptLow, 4);
  header.writeUInt32BE(code >>> 0, 8);
  header.writeUInt32BE(declaredLength >>> 0, 12);
  return Buffer.concat([header, data]);
}

const nameArb = fc.oneof(
  fc.constantFrom('', kExportName, 'bogus', 'x'.repeat(300)),
  fc.string({ maxLength: 16 }),
);
const queryArb = fc.oneof(
  fc.constantFrom('base:allocation', 'base:', 'qemu:dirty-bitmap:x', '', 'base:allocation2'),
  fc.string({ maxLength: 12 }),
);
const bytesArb = (maxLength: number) => fc.uint8Array({ maxLength }).map((array) => Buffer.from(array));

/** One option request: well-formed data for its code, or random data; sometimes a lying length. */
const optionArb = fc
  .record({
    code: fc.oneof(fc.integer({ min: 0, max: 12 }), fc.constantFrom(99, 0x80000001), fc.nat()),
    name: nameArb,
    infos: fc.array(fc.integer({ min: 0, max: 5 }), { maxLength: 4 }),
    queries: fc.array(queryArb, { maxLength: 3 }),
    random: bytesArb(48),
    form: fc.constantFrom('well-formed', 'well-formed', 'random', 'empty'),
    lie: fc.oneof({ weight: 6, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: -8, max: 8 }) }),
  })
  .map(({ code, name, infos, queries, random, form, lie }) => {
    let data: Buffer;
    if (form === 'empty') data = Buffer.alloc(0);
    else if (form === 'random') data = random;
    else if (code === p.kOptInfo || code === p.kOptGo) data = NbdProbe.infoData(name, infos);
    else if (code === p.kOptListMetaContext || code === p.kOptSetMetaContext) data = NbdProbe.metaContextData(name, queries);
    else if (code === p.kOptExportName) data = Buffer.from(name, 'utf8');
    else data = Buffer.alloc(0);
    return option(code, data, Math.max(0, data.length + lie));
  });

/** A client-flags word: mostly valid, sometimes with unknown bits. */
const clientFlagsArb = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom(3, 1) },
  { weight: 1, arbitrary: fc.constantFrom(0, 2) },
  { weight: 1, arbitrary: fc.nat() },
);

/** Negotiation prefix through GO with structured replies and base:allocation (well-formed). */
function negotiation(structured: boolean, exportName: string): Buffer {
  const parts = [u32(3)];
  if (structured) {
    parts.push(option(p.kOptStructuredReply, Buffer.alloc(0)));
    parts.push(option(p.kOptSetMetaContext, NbdProbe.metaContextData(exportName, ['base:allocation'])));
  }
  parts.push(option(p.kOptGo, NbdProbe.infoData(exportName, [p.kInfoBlockSize])));
  return Buffer.concat(parts);
}

const offsetArb = fc.oneof(
  fc.integer({ min: 0, max: kSizeBytes - 1 }).map(BigInt),
  fc.integer({ min: 0, max: 255 }).map((k) => BigInt(k * 4096)),
  fc.integer({ min: 0, max: 8192 }).map((back) => BigInt(kSizeBytes - back)),
  fc.constantFrom(BigInt(kSizeBytes), 1n << 40n, (1n << 63n) - 1n, (1n << 64n) - 1n, 1n << 53n),
  fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
);
const lengthArb = fc.oneof(
  fc.integer({ min: 0, max: 8192 }),
  fc.constantFrom(0, 1, 4096, kMaxPayloadBytes, kMaxPayloadBytes + 1, 0xffffffff),
  fc.nat(),
);

/** One transmission request's fields, drawn around the interesting edges. */
const requestFieldsArb = fc
  .record({
    type: fc.oneof({ weight: 8, arbitrary: fc.integer({ min: 0, max: 8 }) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) }),
    flags: fc.oneof(
      { weight: 4, arbitrary: fc.constant(0) },
      { weight: 4, arbitrary: fc.constantFrom(1, 2, 4, 8, 0x10, 0x20, 0x12, 0x40) },
      { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) },
    ),
    cookie: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
    offset: offsetArb,
    length: lengthArb,
    magicOk: fc.oneof({ weight: 30, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
    payloadFill: fc.integer({ min: 0, max: 255 }),
  });

interface RequestDraw {
  type: number;
  flags: number;
  cookie: bigint;
  offset: bigint;
  length: number;
  magicOk: boolean;
  payloadFill: number;
}

function encodeRequest({ type, flags, cookie, offset, length, magicOk, payloadFill }: RequestDraw): Buffer {
    const payloadBytes = type === p.kCmdWrite ? Math.min(length, kPayloadCapBytes) : 0;
    return NbdProbe.request({
      magic: magicOk ? p.kRequestMagic : 0x25609514,
      type,
      flags,
      cookie,
      offset,
      length,
      payload: payloadBytes > 0 ? Buffer.alloc(payloadBytes, payloadFill) : undefined,
    });
}

/** One transmission request with fields drawn around the interesting edges. */
const requestArb = requestFieldsArb.map(encodeRequest);

/** Scenario byte streams. */
const streamArb = fc.oneof(
  bytesArb(256),
  fc
    .tuple(clientFlagsArb, fc.array(optionArb, { maxLength: 6 }), bytesArb(32))
    .map(([flags, options, tail]) => Buffer.concat([u32(flags), ...options, tail])),
  fc
    .tuple(fc.boolean(), fc.constantFrom('', kExportName), fc.array(requestArb, { maxLength: 8 }), bytesArb(16))
    .map(([structured, name, requests, tail]) => Buffer.concat([negotiation(structured, name), ...requests, tail])),
);

/** Mutations: flip bytes, truncate, or duplicate a slice of a stream. */
const mutatedStreamArb = fc
  .tuple(
    streamArb,
    fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { maxLength: 4 }),
    fc.option(fc.nat(), { nil: undefined }),
  )
  .map(([stream, flips, cut]) => {
    const out = Buffer.from(stream);
    if (out.length === 0) return out;
    for (const [position, mask] of flips) {
      const at = position % out.length;
      out[at] = (out[at] ?? 0) ^ mask;
    }
    return cut === undefined ? out : out.subarray(0, cut % (out.length + 1));
  });

const caseArb = fc.record({
  stream: fc.oneof(streamArb, mutatedStreamArb),
  splits: fc.array(fc.nat(), { maxLength: 6 }),
  yieldBetween: fc.boolean(),
});

function splitAt(stream: Buffer, splits: number[]): Buffer[] {
  if (stream.length === 0) return [];
  const points = [...new Set(splits.map((split) => split % stream.length))].sort((a, b) => a - b);
  const chunks: Buffer[] = [];
  let start = 0;
  for (const point of points) {
    if (point > start) chunks.push(stream.subarray(start, point));
    start = Math.max(start, point);
  }
  chunks.push(stream.subarray(start));
  return chunks;
}

interface Outcome {
  received: Buffer;
  closed: boolean;
}

/** Sends the chunks, half-closes, and waits (bounded) for the server to close. */
async function feed(socketPath: string, chunks: Buffer[], yieldBetween: boolean): Promise<Outcome> {
  const socket = connect(socketPath);
  const received: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => received.push(chunk));
  socket.on('error', () => undefined); // EPIPE/ECONNRESET once the server hung up: expected.
  const closed = new Promise<boolean>((resolveClosed) => socket.once('close', () => resolveClosed(true)));
  await new Promise<void>((resolveConnect) => {
    socket.once('connect', () => resolveConnect());
    socket.once('error', () => resolveConnect());
  });
  for (const chunk of chunks) {
    if (socket.destroyed) break;
    socket.write(chunk);
    if (yieldBetween) await yieldToLoop();
  }
  socket.end();
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<boolean>((resolveTimeout) => (timer = setTimeout(() => resolveTimeout(false), kCloseWaitMs)));
  const wasClosed = await Promise.race([closed, timedOut]);
  clearTimeout(timer);
  if (!wasClosed) socket.destroy();
  return { received: Buffer.concat(received), closed: wasClosed };
}

// ---- one reply per request ----

/** A request the server must serve: in range, a known command, a payload it accepts. */
const goodRequestArb = (structured: boolean) =>
  fc
    .record({
      type: fc.constantFrom(p.kCmdRead, p.kCmdWrite, p.kCmdFlush, p.kCmdTrim, p.kCmdWriteZeroes, ...(structured ? [p.kCmdBlockStatus] : [])),
      fua: fc.boolean(),
      block: fc.integer({ min: 0, max: kSizeBytes / 4096 - 4 }),
      length: fc.oneof(fc.constantFrom(4096, 8192), fc.integer({ min: 1, max: kPayloadCapBytes })),
      payloadFill: fc.integer({ min: 0, max: 255 }),
    })
    .map(({ type, fua, block, length, payloadFill }): RequestDraw => ({
      type,
      flags: fua && type !== p.kCmdRead && type !== p.kCmdBlockStatus ? p.kCmdFlagFua : 0,
      cookie: 0n,
      offset: BigInt(block * 4096),
      length: type === p.kCmdFlush ? 0 : length,
      magicOk: true,
      payloadFill,
    }));

interface Sent {
  good: boolean;
  type: number;
  length: number;
}

/** Well-formed negotiation, then good requests mixed with drawn (maybe malformed) ones. */
const exchangeArb = fc.boolean().chain((structured) =>
  fc.record({
    structured: fc.constant(structured),
    requests: fc.array(
      fc.oneof(
        { weight: 5, arbitrary: goodRequestArb(structured).map((draw) => ({ good: true, draw })) },
        { weight: 1, arbitrary: requestFieldsArb.map((draw) => ({ good: false, draw })) },
      ),
      { minLength: 1, maxLength: 12 },
    ),
    splits: fc.array(fc.nat(), { maxLength: 4 }),
  }),
);

/** Offset just past the greeting and the option replies of `negotiation()` (count ACKs). */
function skipNegotiation(received: Buffer, structured: boolean): number {
  const acks = structured ? 3 : 1;
  let at = p.kGreetingBytes;
  let seen = 0;
  while (seen < acks) {
    if (received.length < at + 20) throw new Error(`negotiation replies cut short at ${at} of ${received.length} bytes`);
    const type = received.readUInt32BE(at + 12);
    const length = received.readUInt32BE(at + 16);
    if ((type & 0x80000000) !== 0) throw new Error(`the well-formed negotiation was refused (option reply type 0x${type.toString(16)})`);
    if (type === p.kRepAck) seen += 1;
    at += 20 + length;
  }
  return at;
}

/**
 * The cookies of the final replies in the transmission phase, in order. A reply cut short at
 * the end (the server closed mid-reply) is `truncated`.
 */
function finalReplies(received: Buffer, at: number, sent: Map<bigint, Sent>): { cookies: bigint[]; truncated: boolean } {
  const cookies: bigint[] = [];
  while (at < received.length) {
    if (received.length < at + 4) return { cookies, truncated: true };
    const magic = received.readUInt32BE(at);
    if (magic === p.kSimpleReplyMagic) {
      if (received.length < at + 16) return { cookies, truncated: true };
      const errno = received.readUInt32BE(at + 4);
      const cookie = received.readBigUInt64BE(at + 8);
      const request = sent.get(cookie);
      at += 16 + (errno === 0 && request?.type === p.kCmdRead ? request.length : 0);
      if (at > received.length) return { cookies, truncated: true };
      cookies.push(cookie);
    } else if (magic === p.kStructuredReplyMagic) {
      if (received.length < at + 20) return { cookies, truncated: true };
      const flags = received.readUInt16BE(at + 4);
      const cookie = received.readBigUInt64BE(at + 8);
      at += 20 + received.readUInt32BE(at + 16);
      if (at > received.length) return { cookies, truncated: true };
      if ((flags & p.kReplyFlagDone) !== 0) cookies.push(cookie);
    } else {
      throw new Error(`reply magic 0x${magic.toString(16)} at ${at}`);
    }
  }
  return { cookies, truncated: false };
}

interface FuzzTarget {
  label: string;
  device(): MemoryDevice;
  directReceive: boolean;
  /**
   * Every well-formed request is answered unless a malformed one ended the connection. This
   * fuzzer once found the buffer-lending targets dropping a request still waiting for a
   * buffer when NBD_CMD_DISC (and the client's EOF) arrived; the server now drains it, so
   * every target answers all (test/unit/nbd/server-disc-drain.test.ts pins that case).
   */
  answersAll: boolean;
}

const kTargets: FuzzTarget[] = [
  { label: 'memory device', device: () => new MemoryDevice({ sizeBytes: kSizeBytes, completion: 'shuffled' }), directReceive: false, answersAll: true },
  {
    label: 'buffer-lending device (sometimes none free)',
    device: () => new PooledMemoryDevice({ sizeBytes: kSizeBytes, completion: 'shuffled', poolBytes: kMaxPayloadBytes, unitBytes: 4096, refuseEvery: 7 }),
    directReceive: false,
    answersAll: true,
  },
  {
    label: 'buffer-lending device, direct receive',
    device: () => new PooledMemoryDevice({ sizeBytes: kSizeBytes, completion: 'shuffled', poolBytes: kMaxPayloadBytes, unitBytes: 4096, refuseEvery: 5 }),
    directReceive: true,
    answersAll: true,
  },
  {
    // the server gives every buffer back itself (a device without writeBuffersReturnAtCompletion)
    label: 'buffer-lending device, server releases WRITE buffers',
    device: () => new PooledMemoryDevice({ sizeBytes: kSizeBytes, completion: 'shuffled', poolBytes: kMaxPayloadBytes, unitBytes: 4096, refuseEvery: 6, returnWritesAtCompletion: false }),
    directReceive: true,
    answersAll: true,
  },
];

async function checkProperty<T>(arbitrary: fc.Arbitrary<T>, runs: number, predicate: (value: T) => Promise<void>, describeExample: (value: T) => string): Promise<void> {
  const details = await fc.check(fc.asyncProperty(arbitrary, predicate), { numRuns: runs, endOnFailure: true, ...(kSeed === undefined ? {} : { seed: kSeed }) });
  if (details.failed) {
    const example = details.counterexample?.[0];
    const cause = details.errorInstance instanceof Error ? details.errorInstance.message : String(details.errorInstance);
    assert.fail(`fuzz property failed after ${details.numRuns} runs (replay: ENBD_FUZZ_SEED=${details.seed}): ${cause}\n${example === undefined ? '' : describeExample(example)}`);
  }
}

for (const [targetIndex, target] of kTargets.entries()) describe(`NBD server fuzz (in-process, ${target.label})`, () => {
  // the first target gets the full run count; the others a third each (npm test stays fast)
  const streamRuns = targetIndex === 0 ? kRuns : Math.ceil(kRuns / 3);
  const exchangeRuns = Math.ceil(kRuns / 6);
  let dir: Scratch;
  let device: MemoryDevice;
  let server: NbdServer;
  let socketPath: string;

  before(async () => {
    dir = scratch('enbd-fuzz-');
    socketPath = dir.path('fuzz.sock');
    device = target.device();
    server = createNbdServer({
      device,
      exportName: kExportName,
      description: 'fuzz target',
      logger: createLogger({ level: 'silent', pretty: false }),
      maximumPayloadBytes: kMaxPayloadBytes,
      directReceive: target.directReceive,
    });
    await server.listenUnix(socketPath);
  });

  after(async () => {
    try {
      // Bounded: a server bug that leaves a connection stuck must not leak the scratch dir.
      await Promise.race([server?.close(), sleep(kCloseWaitMs)]);
      await device?.close();
    } finally {
      dir?.cleanup();
    }
  });

  /** Device-side checks after every run: validated requests only, buffers lent and returned. */
  function assertDeviceSane(): void {
    assert.equal(device.rejectedCount, 0, `server submitted what it should have refused: ${device.rejections.join('; ')}`);
    if (device instanceof PooledMemoryDevice) assert.deepEqual(device.bufferErrors, [], 'buffer lending misuse');
  }

  test(`random and mutated byte streams (${streamRuns} runs)`, async () => {
    await checkProperty(caseArb, streamRuns, async ({ stream, splits, yieldBetween }) => {
      const outcome = await feed(socketPath, splitAt(stream, splits), yieldBetween);
      assert.ok(outcome.closed, 'server kept the connection open after the client half-closed');
      assert.ok(outcome.received.length >= p.kGreetingBytes, 'greeting received');
      assert.equal(outcome.received.readUInt32BE(0), p.kNbdMagicHigh);
      assert.equal(outcome.received.readUInt32BE(8), p.kIHaveOptHigh);
      assertDeviceSane();
    }, (example) => {
      const stream = example.stream.toString('hex');
      return `splits ${JSON.stringify(example.splits)} yield ${String(example.yieldBetween)}\n` +
        `stream (${stream.length / 2} bytes) ${stream.slice(0, 2048)}${stream.length > 2048 ? '...' : ''}`;
    });
    await waitFor('all fuzz connections to close', () => server.connectionCount === 0, kCloseWaitMs);
  });

  test(`one final reply per request, cookies matching, well-formed and malformed mixed (${exchangeRuns} runs)`, async () => {
    await checkProperty(exchangeArb, exchangeRuns, async ({ structured, requests, splits }) => {
      const sent = new Map<bigint, Sent>();
      const order: bigint[] = [];
      const parts = [negotiation(structured, kExportName)];
      requests.forEach(({ good, draw }, index) => {
        const cookie = BigInt(index + 1) * 0x1_0000_0001n;
        sent.set(cookie, { good, type: draw.type, length: draw.length });
        order.push(cookie);
        parts.push(encodeRequest({ ...draw, cookie }));
      });
      // NBD_CMD_DISC ends the exchange the well-formed way: the server answers what is in
      // flight first (a bare half-close may drop those replies)
      parts.push(encodeRequest({ type: p.kCmdDisc, flags: 0, cookie: 0n, offset: 0n, length: 0, magicOk: true, payloadFill: 0 }));
      const outcome = await feed(socketPath, splitAt(Buffer.concat(parts), splits), false);
      assert.ok(outcome.closed, 'server kept the connection open after the client half-closed');
      const { cookies, truncated } = finalReplies(outcome.received, skipNegotiation(outcome.received, structured), sent);
      const replied = new Set<bigint>();
      for (const cookie of cookies) {
        assert.ok(sent.has(cookie), `a reply carries cookie ${cookie}, which no request did`);
        assert.ok(!replied.has(cookie), `a second final reply to cookie ${cookie}`);
        replied.add(cookie);
      }
      // A malformed request may end the connection (the replies of requests still in flight
      // then, and of all after it, are not sent): so an unanswered well-formed request, or a
      // reply cut short, needs a malformed request at or after the last answered one.
      let lastReplied = -1;
      order.forEach((cookie, index) => {
        if (replied.has(cookie)) lastReplied = index;
      });
      const unanswered = order.findIndex((cookie) => !replied.has(cookie) && sent.get(cookie)?.good === true);
      if ((unanswered >= 0 && target.answersAll) || truncated) {
        const ender = order.findIndex((cookie, index) => index >= lastReplied && sent.get(cookie)?.good === false);
        const request = sent.get(order[Math.max(unanswered, 0)] ?? 0n);
        const what = truncated ? 'a reply was cut short' : `well-formed request ${unanswered} (${commandNames[request?.type ?? -1] ?? '?'}) got no reply`;
        assert.ok(ender >= 0, `${what}, and no malformed request at or after the last answered one (${lastReplied}) ended the connection`);
      }
      assertDeviceSane();
    }, (example) => `structured ${String(example.structured)} splits ${JSON.stringify(example.splits)}\n` +
      example.requests.map(({ good, draw }) => `${good ? 'good' : 'drawn'} ${JSON.stringify(draw, (_key, value: unknown) => (typeof value === 'bigint' ? value.toString() : value))}`).join('\n'));
    await waitFor('all fuzz connections to close', () => server.connectionCount === 0, kCloseWaitMs);
    if (device instanceof PooledMemoryDevice) {
      assert.equal(device.lentCount, 0, 'every lent buffer came back');
      assert.ok(device.acquiredCount > 0 && device.refusedCount > 0, `the server used the lent buffers (${device.acquiredCount}) and met none free (${device.refusedCount})`);
      if (device.writeBuffersReturnAtCompletion) assert.ok(device.returnedAtCompletion > 0, 'WRITE buffers came back at completion');
      else assert.equal(device.returnedAtCompletion, 0, 'the server released every buffer itself');
    }
  });

  test('after fuzzing, a well-formed client writes and reads back', async () => {
    for (const structured of [true, false]) {
      const probe = await NbdProbe.connect({ path: socketPath });
      try {
        const negotiated = await probe.negotiate({ exportName: kExportName, structured });
        assert.equal(negotiated.sizeBytes, BigInt(kSizeBytes));
        const data = Buffer.alloc(8192);
        for (let index = 0; index < data.length; index += 1) data[index] = (index * 31 + (structured ? 7 : 3)) & 0xff;
        const offset = 123 * 4096 + 17;
        probe.sendRequest({ type: p.kCmdWrite, flags: p.kCmdFlagFua, cookie: 1n, offset, length: data.length, payload: data });
        const [written] = await probe.readReplyChunks();
        assert.equal(written?.errno, 0);
        probe.sendRequest({ type: p.kCmdRead, cookie: 2n, offset, length: data.length });
        const chunks = await probe.readReplyChunks(data.length);
        for (const chunk of chunks) assert.equal(chunk.errno, 0);
        assert.ok(assembleRead(chunks, BigInt(offset), data.length).equals(data), 'read back what was written');
        assert.ok(Buffer.from(device.bytes.subarray(offset, offset + data.length)).equals(data), 'device holds the data');
      } finally {
        probe.destroy();
      }
    }
    await waitFor('probe connections to close', () => server.connectionCount === 0, kCloseWaitMs);
  });
});
