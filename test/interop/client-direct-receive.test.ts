/**
 * NbdClient direct receive (READ data read by the socket straight into its destination, here a
 * SharedArrayBuffer like the ring): byte-correct and zero-copy for large READs, against a
 * scripted fake server that controls every byte and every write boundary (simple replies,
 * structured OFFSET_DATA / OFFSET_HOLE / NONE chunks, an error chunk mid-READ, replies dribbled
 * in hundreds of small writes, a reply cut off mid-data) and against nbdkit pattern (structured
 * and --no-sr). Copies are asserted from the client's own counters (readBytesCopied,
 * readBytesDirect).
 * Threads: test process main thread; the fake server runs in this process, nbdkit as a child.
 *
 * Invariants checked:
 * - Every byte of a READ's destination equals what the server sent for it; bytes outside the
 *   READ's range are untouched.
 * - After the first large READ (its header arrives in a full-buffer read), large READs are
 *   received with 0 bytes copied.
 * - A failure while a read is pointed at a destination (request timeout mid-data) re-points it
 *   first: bytes the server sends after the EIO never land in the destination.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server, type Socket } from 'node:net';
import { setImmediate as yieldTurn } from 'node:timers/promises';
import { NbdClient, type NbdClientOptions } from '../../src/nbd/client/client.js';
import { EnbdError } from '../../src/core/errors.js';
import {
  kEIo,
  kFlagFixedNewstyle,
  kFlagNoZeroes,
  kInfoExport,
  kNbdMagicHigh,
  kNbdMagicLow,
  kIHaveOptHigh,
  kIHaveOptLow,
  kOptGo,
  kOptStructuredReply,
  kRepAck,
  kRepErrUnsup,
  kRepInfo,
  kReplyFlagDone,
  kReplyTypeNone,
  kTxFlagHasFlags,
} from '../../src/nbd/protocol.js';
import { requires, scratch, startNbdkit, unixUri, waitFor } from '../helpers/tools.js';
import { dataChunk, errorChunk, holeChunk, optionReply, simpleReply, structuredChunk, u64 } from '../helpers/nbd-wire.js';

const kMiB = 1024 * 1024;
const kExportBytes = 64 * kMiB;

/** A READ request the fake server received. */
interface ReadRequest {
  cookie: Buffer;
  offsetBytes: number;
  lengthBytes: number;
}

/** The byte the fake server (and the test) has at `offset`: a fixed non-trivial pattern. */
function patternByte(offset: number): number {
  return (offset * 7 + (offset >>> 9)) & 0xff;
}

function patternBytes(offsetBytes: number, lengthBytes: number): Buffer {
  const data = Buffer.allocUnsafe(lengthBytes);
  for (let index = 0; index < lengthBytes; index += 1) data[index] = patternByte(offsetBytes + index);
  return data;
}

/**
 * A scripted NBD server on a Unix socket: fixed newstyle, answers STRUCTURED_REPLY when
 * `structured` (else refuses it), GO with the export size; in transmission it hands every READ
 * to `onRead`, which writes the reply bytes itself (so the test decides every boundary).
 */
class FakeServer {
  readonly socketPath: string;
  private readonly server: Server;
  private readonly sockets: Socket[] = [];
  disconnected = false;
  /** Close the connection when DISC arrives (false: the test closes it). */
  endOnDisc = true;

  private constructor(socketPath: string, server: Server) {
    this.socketPath = socketPath;
    this.server = server;
  }

  static async start(
    socketPath: string,
    structured: boolean,
    onRead: (socket: Socket, request: ReadRequest) => void | Promise<void>,
  ): Promise<FakeServer> {
    const server = createServer({ allowHalfOpen: true });
    const fake = new FakeServer(socketPath, server);
    server.on('connection', (socket) => {
      fake.sockets.push(socket);
      fake.serve(socket, structured, onRead);
    });
    await new Promise<void>((resolve) => server.listen(socketPath, resolve));
    return fake;
  }

  private serve(socket: Socket, structured: boolean, onRead: (socket: Socket, request: ReadRequest) => void | Promise<void>): void {
    let pending = Buffer.alloc(0);
    let handshaking = true;
    let clientFlags = false;
    socket.on('error', () => undefined);
    const greeting = Buffer.alloc(18);
    greeting.writeUInt32BE(kNbdMagicHigh, 0);
    greeting.writeUInt32BE(kNbdMagicLow, 4);
    greeting.writeUInt32BE(kIHaveOptHigh, 8);
    greeting.writeUInt32BE(kIHaveOptLow, 12);
    greeting.writeUInt16BE(kFlagFixedNewstyle | kFlagNoZeroes, 16);
    socket.write(greeting);
    socket.on('data', (data: Buffer) => {
      pending = Buffer.concat([pending, data]);
      for (;;) {
        if (handshaking) {
          if (!clientFlags) {
            if (pending.length < 4) return;
            pending = pending.subarray(4);
            clientFlags = true;
            continue;
          }
          if (pending.length < 16) return;
          const option = pending.readUInt32BE(8);
          const lengthBytes = pending.readUInt32BE(12);
          if (pending.length < 16 + lengthBytes) return;
          pending = pending.subarray(16 + lengthBytes);
          if (option === kOptStructuredReply) {
            socket.write(optionReply(option, structured ? kRepAck : kRepErrUnsup));
          } else if (option === kOptGo) {
            const info = Buffer.alloc(12);
            info.writeUInt16BE(kInfoExport, 0);
            u64(kExportBytes).copy(info, 2);
            info.writeUInt16BE(kTxFlagHasFlags, 10);
            socket.write(optionReply(option, kRepInfo, info));
            socket.write(optionReply(option, kRepAck));
            handshaking = false;
          } else {
            socket.write(optionReply(option, kRepErrUnsup));
          }
          continue;
        }
        if (pending.length < 28) return;
        const command = pending.readUInt16BE(6);
        const request: ReadRequest = {
          cookie: Buffer.from(pending.subarray(8, 16)),
          offsetBytes: Number(pending.readBigUInt64BE(16)),
          lengthBytes: pending.readUInt32BE(24),
        };
        pending = pending.subarray(28);
        if (command === 2) {
          // NBD_CMD_DISC
          this.disconnected = true;
          if (this.endOnDisc) socket.end();
          return;
        }
        void onRead(socket, request);
      }
    });
  }

  async stop(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/** Writes `bytes` in pieces of 1..maxPiece bytes, yielding a turn between pieces. */
async function dribble(socket: Socket, bytes: Buffer, maxPiece: number, seed: number): Promise<void> {
  let state = seed;
  for (let at = 0; at < bytes.length; ) {
    state = (state * 1103515245 + 12345) >>> 0;
    const pieceBytes = Math.min(bytes.length - at, 1 + (state % maxPiece));
    socket.write(bytes.subarray(at, at + pieceBytes));
    at += pieceBytes;
    await yieldTurn();
  }
}

async function fakeSetup(
  t: TestContext,
  structured: boolean,
  onRead: (socket: Socket, request: ReadRequest) => void | Promise<void>,
  options: NbdClientOptions = {},
): Promise<{ server: FakeServer; client: NbdClient }> {
  const dir = scratch('enbd-direct-');
  const server = await FakeServer.start(dir.path('fake.sock'), structured, onRead);
  const client = await NbdClient.connect(unixUri(server.socketPath), { blockStatus: false, ...options });
  t.after(async () => {
    client.destroy();
    await server.stop();
    dir.cleanup();
  });
  assert.equal(client.structuredReplies, structured);
  return { server, client };
}

/** A view of `lengthBytes` in the middle of a fresh SAB, guarded by 0xee bytes on both sides. */
function sabTarget(lengthBytes: number, guardBytes = 4096): { target: Uint8Array; whole: Uint8Array; guardBytes: number } {
  const whole = new Uint8Array(new SharedArrayBuffer(lengthBytes + 2 * guardBytes));
  whole.fill(0xee);
  return { target: whole.subarray(guardBytes, guardBytes + lengthBytes), whole, guardBytes };
}

function assertGuards(whole: Uint8Array, guardBytes: number, lengthBytes: number): void {
  for (let index = 0; index < guardBytes; index += 1) {
    assert.equal(whole[index], 0xee, 'bytes before the destination are untouched');
    assert.equal(whole[guardBytes + lengthBytes + index], 0xee, 'bytes after the destination are untouched');
  }
}

function assertPattern(target: Uint8Array, offsetBytes: number): void {
  const expected = patternBytes(offsetBytes, target.length);
  assert.ok(Buffer.from(target.buffer, target.byteOffset, target.length).equals(expected), `READ at ${offsetBytes} has the server's bytes`);
}

test('simple replies: large READs land in SAB destinations with 0 bytes copied after the first; small ones are copied', async (t) => {
  const { client } = await fakeSetup(t, false, (socket, request) => {
    socket.write(Buffer.concat([simpleReply(request.cookie, 0), patternBytes(request.offsetBytes, request.lengthBytes)]));
  });
  const first = sabTarget(kMiB);
  await client.readInto(0, first.target);
  assertPattern(first.target, 0);
  const copiedAfterFirst = client.readBytesCopied;
  assert.ok(copiedAfterFirst <= 256 * 1024, 'at most one receive buffer of the first READ is copied');
  const sizes = [kMiB, 3 * kMiB + 4096, 64 * 1024, 256 * 1024 + 17];
  let offsetBytes = kMiB;
  let directBefore = client.readBytesDirect;
  for (const lengthBytes of sizes) {
    const { target, whole, guardBytes } = sabTarget(lengthBytes);
    await client.readInto(offsetBytes, target);
    assertPattern(target, offsetBytes);
    assertGuards(whole, guardBytes, lengthBytes);
    assert.equal(client.readBytesDirect - directBefore, lengthBytes, `READ of ${lengthBytes} bytes read straight into its destination`);
    directBefore = client.readBytesDirect;
    offsetBytes += lengthBytes;
  }
  assert.equal(client.readBytesCopied, copiedAfterFirst, 'no byte of the later large READs was copied');
  // Eight large READs in flight at once, answered back to back.
  const targets = Array.from({ length: 8 }, () => sabTarget(kMiB));
  await Promise.all(targets.map(async (each, index) => await client.readInto(index * kMiB, each.target)));
  targets.forEach((each, index) => assertPattern(each.target, index * kMiB));
  assert.equal(client.readBytesCopied, copiedAfterFirst, 'pipelined large READs are not copied either');
  // A small READ after large ones takes the copy path (and ends the lookahead).
  const small = Buffer.alloc(4096);
  await client.readInto(12345, small);
  assertPattern(small, 12345);
  assert.equal(client.readBytesCopied, copiedAfterFirst + 4096);
});

test('replies dribbled in hundreds of 1..3000-byte writes: bytes correct, large data still direct', async (t) => {
  let seed = 1;
  const { client } = await fakeSetup(t, false, async (socket, request) => {
    seed += 1;
    await dribble(socket, Buffer.concat([simpleReply(request.cookie, 0), patternBytes(request.offsetBytes, request.lengthBytes)]), 3000, seed);
  });
  for (const offsetBytes of [0, 5 * kMiB + 3, 9 * kMiB + 511]) {
    const { target, whole, guardBytes } = sabTarget(512 * 1024);
    await client.readInto(offsetBytes, target);
    assertPattern(target, offsetBytes);
    assertGuards(whole, guardBytes, 512 * 1024);
  }
  assert.ok(client.readBytesDirect >= 2 * 512 * 1024, 'the later READs went straight into their destinations');
  assert.equal(client.readBytesCopied + client.readBytesDirect, 3 * 512 * 1024, 'every data byte counted once');
});

test('structured replies: OFFSET_DATA chunks out of order, a hole and a NONE chunk; data direct, hole zero-filled', async (t) => {
  const { client } = await fakeSetup(t, true, async (socket, request) => {
    const { cookie, offsetBytes: base, lengthBytes } = request;
    const quarter = lengthBytes / 4;
    // [3q, 4q) data, [0, q) data, [q, 2q) hole, [2q, 3q) data in a dribble, then NONE + DONE.
    socket.write(dataChunk(cookie, 0, base + 3 * quarter, patternBytes(base + 3 * quarter, quarter)));
    socket.write(dataChunk(cookie, 0, base, patternBytes(base, quarter)));
    socket.write(holeChunk(cookie, 0, base + quarter, quarter));
    await dribble(socket, dataChunk(cookie, 0, base + 2 * quarter, patternBytes(base + 2 * quarter, quarter)), 20_000, base);
    socket.write(structuredChunk(cookie, kReplyFlagDone, kReplyTypeNone));
  });
  const lengthBytes = 2 * kMiB;
  for (const [round, offsetBytes] of [0, 8 * kMiB, 16 * kMiB].entries()) {
    const { target, whole, guardBytes } = sabTarget(lengthBytes);
    const copiedBefore = client.readBytesCopied;
    await client.readInto(offsetBytes, target);
    const quarter = lengthBytes / 4;
    const expected = patternBytes(offsetBytes, lengthBytes);
    expected.fill(0, quarter, 2 * quarter);
    assert.ok(Buffer.from(target.buffer, target.byteOffset, lengthBytes).equals(expected), 'data chunks in place, the hole reads as zeros');
    assertGuards(whole, guardBytes, lengthBytes);
    if (round > 0) assert.equal(client.readBytesCopied, copiedBefore, 'no data byte copied once the lookahead runs');
  }
});

test('structured error chunk mid-READ: the READ fails with its errno, the stream stays framed', async (t) => {
  const { client } = await fakeSetup(t, true, (socket, request) => {
    const { cookie, offsetBytes, lengthBytes } = request;
    if (offsetBytes === 4 * kMiB) {
      socket.write(dataChunk(cookie, 0, offsetBytes, patternBytes(offsetBytes, lengthBytes / 2)));
      socket.write(errorChunk(cookie, kReplyFlagDone, kEIo, 'medium error'));
      return;
    }
    socket.write(dataChunk(cookie, kReplyFlagDone, offsetBytes, patternBytes(offsetBytes, lengthBytes)));
  });
  const good = sabTarget(kMiB);
  await client.readInto(0, good.target);
  assertPattern(good.target, 0);
  const bad = sabTarget(kMiB);
  await assert.rejects(client.readInto(4 * kMiB, bad.target), (error: unknown) => error instanceof EnbdError && error.errno === kEIo);
  assertPattern(bad.target.subarray(0, kMiB / 2), 4 * kMiB);
  const after = sabTarget(kMiB);
  await client.readInto(8 * kMiB, after.target);
  assertPattern(after.target, 8 * kMiB);
  assert.ok(client.isConnected, 'an error chunk does not end the connection');
});

test('a READ cut off mid-data times out: bytes sent after the EIO never land in the destination', async (t) => {
  let socketOf: Socket | null = null;
  let rest: Buffer | null = null;
  const { server, client } = await fakeSetup(t, false, (socket, request) => {
    const reply = Buffer.concat([simpleReply(request.cookie, 0), patternBytes(request.offsetBytes, request.lengthBytes)]);
    if (request.offsetBytes !== 2 * kMiB) {
      socket.write(reply);
      return;
    }
    // Half of the data now; the rest (rewritten as 0x5a) only after the client gave up.
    socketOf = socket;
    const cut = 16 + request.lengthBytes / 2;
    socket.write(reply.subarray(0, cut));
    rest = Buffer.alloc(reply.length - cut, 0x5a);
  }, { requestTimeoutMs: 400 });
  server.endOnDisc = false;
  const warm = sabTarget(kMiB);
  await client.readInto(0, warm.target); // from here on large READs are direct
  const { target, whole, guardBytes } = sabTarget(kMiB);
  const directBefore = client.readBytesDirect;
  await assert.rejects(client.readInto(2 * kMiB, target), (error: unknown) => error instanceof EnbdError && error.errno === kEIo);
  const landed = client.readBytesDirect - directBefore;
  assert.ok(landed > 0, 'part of the cut-off READ was received directly before the timeout');
  assert.equal(client.closeReason?.code, 'ENBD_ERR_TIMEOUT');
  // The client fenced: DISC sent. Now the server sends the rest of the old reply, then closes.
  await waitFor('DISC at the server', () => server.disconnected);
  assert.ok(socketOf !== null && rest !== null);
  (socketOf as Socket).end(rest);
  assert.equal(await client.fence(10_000), true, 'the server closed the fenced connection');
  for (let index = landed; index < kMiB; index += 1) {
    assert.equal(target[index], 0xee, `byte ${index} of the failed READ was written after its EIO`);
  }
  assertPattern(target.subarray(0, landed), 2 * kMiB);
  assertGuards(whole, guardBytes, kMiB);
});

test('directReceive: false copies every byte (the A/B switch)', async (t) => {
  const { client } = await fakeSetup(t, false, (socket, request) => {
    socket.write(Buffer.concat([simpleReply(request.cookie, 0), patternBytes(request.offsetBytes, request.lengthBytes)]));
  }, { directReceive: false });
  for (const offsetBytes of [0, kMiB, 2 * kMiB]) {
    const { target } = sabTarget(kMiB);
    await client.readInto(offsetBytes, target);
    assertPattern(target, offsetBytes);
  }
  assert.equal(client.readBytesDirect, 0);
  assert.equal(client.readBytesCopied, 3 * kMiB);
});

/** nbdkit pattern: every 8-byte word holds its own offset, big-endian. */
function assertNbdkitPattern(target: Uint8Array, offsetBytes: number): void {
  const view = new DataView(target.buffer, target.byteOffset, target.length);
  for (let at = 0; at < target.length; at += 8) {
    assert.equal(Number(view.getBigUint64(at)), offsetBytes + at, `nbdkit pattern at ${offsetBytes + at}`);
  }
}

for (const structured of [true, false]) {
  test(`nbdkit pattern (${structured ? 'structured replies' : '--no-sr, simple replies'}): 64 x 1 MiB READs at queue depth 8 into a SAB, 0 bytes copied after the first`, async (t) => {
    if (!requires(t, 'nbdkit')) return;
    const dir = scratch('enbd-direct-nbdkit-');
    const socketPath = dir.path('pattern.sock');
    const server = await startNbdkit(socketPath, ['pattern', '256M'], structured ? [] : ['--no-sr']);
    const client = await NbdClient.connect(unixUri(socketPath));
    t.after(async () => {
      await client.close();
      await server.stop();
      dir.cleanup();
    });
    assert.equal(client.structuredReplies, structured);
    const ring = new SharedArrayBuffer(8 * kMiB);
    const first = new Uint8Array(ring, 0, kMiB);
    await client.readInto(0, first);
    assertNbdkitPattern(first, 0);
    const copiedAfterFirst = client.readBytesCopied;
    let next = 1;
    const lanes = Array.from({ length: 8 }, async (_, lane) => {
      const target = new Uint8Array(ring, lane * kMiB, kMiB);
      while (next < 64) {
        const index = next++;
        await client.readInto(index * kMiB, target);
        assertNbdkitPattern(target, index * kMiB);
      }
    });
    await Promise.all(lanes);
    assert.equal(client.readBytesCopied, copiedAfterFirst, 'the 63 later READs were not copied');
    assert.equal(client.readBytesDirect + client.readBytesCopied, 64 * kMiB);
  });
}
