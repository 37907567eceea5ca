/**
 * NbdClient against real NBD servers: nbdkit (memory, file, --no-sr, -r, error and delay
 * filters, exportname filter) over Unix and TCP, and qemu-nbd. Data written is read back
 * (and checked once through the backing file and once through nbdsh); NBD errno values are
 * asserted exactly; connection loss, timeouts and refusals produce the documented error codes.
 * Threads: test process main thread; servers are child processes stopped after each test.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, rmSync, writeFileSync, truncateSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { NbdClient, type NbdClientOptions } from '../../src/nbd/client/client.js';
import { EnbdError } from '../../src/core/errors.js';
import {
  kCmdFlagFua,
  kCmdRead,
  kCmdTrim,
  kCmdWrite,
  kEIo,
  kEPerm,
  kStateHole,
  kStateZero,
} from '../../src/nbd/protocol.js';
import {
  freePort,
  requires,
  runOk,
  scratch,
  startChild,
  startNbdkit,
  unixUri,
  waitFor,
  waitForUnixListener,
  type Child,
  type Scratch,
} from '../helpers/tools.js';

const kMiB = 1024 * 1024;

interface Server {
  uri: string;
  child: Child;
  dir: Scratch;
}

/** Register cleanup for a server and the clients of a test. */
function cleanupAfter(t: TestContext, server: Server, clients: NbdClient[]): void {
  t.after(async () => {
    for (const client of clients) client.destroy();
    await server.child.stop('SIGKILL');
    server.dir.cleanup();
  });
}

async function nbdkitUnix(t: TestContext, pluginArgs: string[], extraArgs: string[] = [], clients: NbdClient[] = []): Promise<Server> {
  const dir = scratch('enbd-client-');
  const socketPath = dir.path('nbdkit.sock');
  let child: Child;
  try {
    child = await startNbdkit(socketPath, pluginArgs, extraArgs);
  } catch (error) {
    dir.cleanup();
    throw error;
  }
  const server = { uri: unixUri(socketPath), child, dir };
  cleanupAfter(t, server, clients);
  return server;
}

/** nbdkit listening on 127.0.0.1:PORT (foreground child); resolves once the pidfile exists. */
async function nbdkitTcp(t: TestContext, pluginArgs: string[], clients: NbdClient[]): Promise<Server> {
  const dir = scratch('enbd-client-tcp-');
  const port = await freePort();
  const pidfile = dir.path('nbdkit.pid');
  const child = startChild('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), '--pidfile', pidfile, ...pluginArgs]);
  const server = { uri: `nbd://127.0.0.1:${port}/`, child, dir };
  cleanupAfter(t, server, clients);
  await waitFor('nbdkit pidfile', () => existsSync(pidfile) || child.process.exitCode !== null);
  assert.equal(child.process.exitCode, null, `nbdkit exited: ${child.output()}`);
  return server;
}

async function qemuNbd(t: TestContext, image: string, name: string, clients: NbdClient[], dir: Scratch): Promise<Server> {
  const socketPath = dir.path('qemu.sock');
  const child = startChild('qemu-nbd', ['-k', socketPath, '-f', 'raw', '-x', name, '--persistent', '--shared=4', image]);
  const server = { uri: unixUri(socketPath, name), child, dir };
  cleanupAfter(t, server, clients);
  await waitForUnixListener('qemu-nbd', socketPath, child);
  return server;
}

/** Connect, retrying briefly while a just-started server may not accept yet. */
async function connect(uri: string, clients: NbdClient[], options: NbdClientOptions = {}): Promise<NbdClient> {
  for (let attempt = 0; ; attempt++) {
    try {
      const client = await NbdClient.connect(uri, options);
      clients.push(client);
      return client;
    } catch (error) {
      if (!(error instanceof EnbdError) || error.code !== 'ENBD_ERR_CONNECT' || attempt >= 50) throw error;
      await sleep(50);
    }
  }
}

interface RawRequest {
  command: number;
  flags?: number;
  offsetBytes: number;
  lengthBytes: number;
  data: Uint8Array | null;
}

/** Submit through the hot path (tokens 0..n-1), resolve with each token's errno. */
function submitAll(client: NbdClient, requests: RawRequest[]): { done: Promise<number[]>; submittedInFlight: number } {
  const errnos = new Array<number>(requests.length).fill(-1);
  let remaining = requests.length;
  let resolveDone: (value: number[]) => void = () => undefined;
  const done = new Promise<number[]>((resolve) => (resolveDone = resolve));
  client.setCompletionHandler((token, errno) => {
    assert.equal(errnos[token], -1, `token ${token} completed once`);
    errnos[token] = errno;
    remaining -= 1;
    if (remaining === 0) resolveDone(errnos);
  });
  requests.forEach((request, token) =>
    client.submit(request.command, request.flags ?? 0, request.offsetBytes, request.lengthBytes, request.data, token),
  );
  return { done, submittedInFlight: client.inFlight };
}

/** Deterministic PRNG so failures reproduce. */
function prng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let value = state;
    value = Math.imul(value ^ (value >>> 15), value | 1);
    value ^= value + Math.imul(value ^ (value >>> 7), value | 61);
    return ((value ^ (value >>> 14)) >>> 0) / 2 ** 32;
  };
}

/** Random writes (any alignment) checked against a local model, then a full read-back. */
async function randomWriteReadBack(client: NbdClient, seed: number): Promise<void> {
  const random = prng(seed);
  const model = Buffer.alloc(client.sizeBytes);
  for (let index = 0; index < 60; index++) {
    const lengthBytes = 1 + Math.floor(random() * 256 * 1024);
    const offsetBytes = Math.floor(random() * (client.sizeBytes - lengthBytes));
    const data = randomBytes(lengthBytes);
    await client.write(offsetBytes, data);
    data.copy(model, offsetBytes);
    if (index % 10 === 9) {
      const checkOffset = Math.floor(random() * (client.sizeBytes - 4096));
      assert.deepEqual(await client.read(checkOffset, 4096), model.subarray(checkOffset, checkOffset + 4096));
    }
  }
  const all = await client.read(0, client.sizeBytes);
  assert.ok(all.equals(model), 'the whole export equals the model');
}

test('nbdkit memory over a Unix socket: features, random writes read back', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '16M'], [], clients);
  const client = await connect(server.uri, clients);
  assert.equal(client.sizeBytes, 16 * kMiB);
  assert.equal(client.structuredReplies, true);
  assert.equal(client.features.readOnly, false);
  assert.equal(client.features.flush, true);
  assert.equal(client.features.fua, true);
  assert.equal(client.features.trim, true);
  assert.equal(client.features.writeZeroes, true);
  assert.equal(client.features.blockStatus, true);
  assert.equal(client.transmissionFlags & 1, 1);
  assert.deepEqual(client.blockSizes, { minimumBytes: 1, preferredBytes: 4096, maximumBytes: 32 * kMiB });
  assert.ok(client.isConnected);
  await randomWriteReadBack(client, 1);
  await client.disconnect();
  assert.equal(client.isConnected, false);
  assert.equal(client.closeReason, null);
});

test('nbdkit memory over TCP: random writes read back', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitTcp(t, ['memory', '16M'], clients);
  const client = await connect(server.uri, clients);
  assert.equal(client.sizeBytes, 16 * kMiB);
  await randomWriteReadBack(client, 2);
});

test('256 pipelined writes then 256 pipelined reads, all in flight at once', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '16M'], [], clients);
  const client = await connect(server.uri, clients);
  const count = 256;
  const sources = Array.from({ length: count }, () => randomBytes(4096 + 512));
  const writes = submitAll(
    client,
    sources.map((data, index) => ({ command: kCmdWrite, offsetBytes: index * 8192 + 7, lengthBytes: data.length, data })),
  );
  assert.equal(writes.submittedInFlight, count);
  assert.deepEqual(await writes.done, new Array<number>(count).fill(0));
  assert.equal(client.inFlight, 0);
  const targets = sources.map((data) => Buffer.alloc(data.length, 0xee));
  const reads = submitAll(
    client,
    targets.map((data, index) => ({ command: kCmdRead, offsetBytes: index * 8192 + 7, lengthBytes: data.length, data })),
  );
  assert.equal(reads.submittedInFlight, count);
  assert.deepEqual(await reads.done, new Array<number>(count).fill(0));
  targets.forEach((target, index) => assert.ok(target.equals(sources[index] as Buffer), `read ${index} matches`));
});

test('thousands of requests: table growth, header arena overflow and wrap-around stay correct', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '16M'], [], clients);
  const client = await connect(server.uri, clients);
  // 3000 headers in one turn: more than the initial table and than the header arena holds.
  const count = 3000;
  const sources = Array.from({ length: count }, (_, index) => Buffer.alloc(512, index % 251));
  const burst = submitAll(
    client,
    sources.map((data, index) => ({ command: kCmdWrite, offsetBytes: index * 512, lengthBytes: 512, data })),
  );
  assert.equal(burst.submittedInFlight, count);
  assert.deepEqual(await burst.done, new Array<number>(count).fill(0));
  // Sustained queue depth 48 for many turns: the arena wraps many times.
  const total = 20_000;
  const depth = 48;
  const targets = Array.from({ length: depth }, () => Buffer.alloc(512));
  let submitted = 0;
  let completed = 0;
  let mismatches = 0;
  await new Promise<void>((resolve, reject) => {
    const next = (token: number): void => {
      const index = submitted % count;
      submitted += 1;
      client.submit(kCmdRead, 0, index * 512, 512, targets[token] as Buffer, token * count + index);
    };
    client.setCompletionHandler((token, errno) => {
      if (errno !== 0) return reject(new Error(`errno ${errno}`));
      const slotToken = Math.floor(token / count);
      const index = token % count;
      if (!(targets[slotToken] as Buffer).equals(sources[index] as Buffer)) mismatches += 1;
      completed += 1;
      if (completed === total) resolve();
      else if (submitted < total) next(slotToken);
    });
    for (let token = 0; token < depth; token++) next(token);
  });
  assert.equal(mismatches, 0);
  assert.equal(client.inFlight, 0);
});

test('a 32 MiB write and a 32 MiB read', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '64M'], [], clients);
  const client = await connect(server.uri, clients);
  const data = randomBytes(32 * kMiB);
  await client.write(16 * kMiB, data);
  const back = await client.read(16 * kMiB, 32 * kMiB);
  assert.ok(back.equals(data));
});

test('fresh memory reads as zeros; flush, trim, write zeroes, FUA write', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '16M'], [], clients);
  const client = await connect(server.uri, clients);
  const target = Buffer.alloc(kMiB, 0xff);
  await client.readInto(3 * kMiB, target);
  assert.ok(target.every((byte) => byte === 0), 'sparse read is all zeros');

  const data = randomBytes(256 * 1024);
  await client.write(0, data, kCmdFlagFua);
  await client.flush();
  assert.ok((await client.read(0, data.length)).equals(data));

  await client.writeZeroes(4096, 8192);
  const expected = Buffer.from(data);
  expected.fill(0, 4096, 4096 + 8192);
  assert.ok((await client.read(0, data.length)).equals(expected), 'write zeroes reads back as zeros');

  await client.trim(0, 64 * 1024);
  await client.cache(0, 64 * 1024);
  // nbdkit memory discards trimmed ranges: they read back as zeros.
  expected.fill(0, 0, 64 * 1024);
  assert.ok((await client.read(0, data.length)).equals(expected), 'trimmed range reads as zeros');
});

test('getExtents: fresh memory is one hole+zero extent; written data shows as data', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '16M'], [], clients);
  const client = await connect(server.uri, clients);
  const fresh = await client.getExtents(0, client.sizeBytes);
  assert.deepEqual(fresh, [{ lengthBytes: 16 * kMiB, flags: kStateHole | kStateZero }]);
  await client.write(0, randomBytes(64 * 1024));
  const after = await client.getExtents(0, client.sizeBytes);
  assert.ok(after.length >= 2, JSON.stringify(after));
  assert.equal(after[0]?.flags, 0, 'the first extent is data');
  assert.ok((after[0]?.lengthBytes ?? 0) >= 64 * 1024);
  assert.equal(after.at(-1)?.flags, kStateHole | kStateZero);
  assert.equal(
    after.reduce((sum, extent) => sum + extent.lengthBytes, 0),
    16 * kMiB,
  );
});

test('nbdkit --no-sr: simple replies only, no block status', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '16M'], ['--no-sr'], clients);
  const client = await connect(server.uri, clients);
  assert.equal(client.structuredReplies, false);
  assert.equal(client.features.blockStatus, false);
  await randomWriteReadBack(client, 3);
  assert.deepEqual(await client.getExtents(4096, 8192), [{ lengthBytes: 8192, flags: 0 }]);
});

test('nbdkit --mask-handshake=0 (plain newstyle): EXPORT_NAME path works', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '4M'], ['--mask-handshake=0'], clients);
  const client = await connect(server.uri, clients);
  assert.equal(client.structuredReplies, false);
  assert.equal(client.sizeBytes, 4 * kMiB);
  const data = randomBytes(100_000);
  await client.write(777, data);
  assert.ok((await client.read(777, data.length)).equals(data));
});

test('nbdkit -o (oldstyle) is refused with ENBD_ERR_HANDSHAKE', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '4M'], ['-o'], clients);
  await assert.rejects(connect(server.uri, clients), (error: unknown) => {
    assert.ok(error instanceof EnbdError);
    assert.equal(error.code, 'ENBD_ERR_HANDSHAKE');
    assert.match(error.message, /oldstyle/);
    return true;
  });
});

test('nbdkit -r: read-only flag, a WRITE sent anyway fails with EPERM', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '1M'], ['-r'], clients);
  const client = await connect(server.uri, clients);
  assert.equal(client.features.readOnly, true);
  const { done } = submitAll(client, [
    { command: kCmdWrite, offsetBytes: 0, lengthBytes: 4096, data: Buffer.alloc(4096, 1) },
    { command: kCmdRead, offsetBytes: 0, lengthBytes: 4096, data: Buffer.alloc(4096) },
  ]);
  assert.deepEqual(await done, [kEPerm, 0]);
  await assert.rejects(client.write(0, Buffer.alloc(512)), (error: unknown) => {
    assert.ok(error instanceof EnbdError);
    assert.equal(error.code, 'ENBD_ERR_NBD_REPLY');
    assert.equal(error.errno, kEPerm);
    assert.equal(error.message, 'WRITE at 0+512 failed: EPERM');
    return true;
  });
  assert.ok(client.isConnected, 'an error reply does not end the connection');
});

test('error filter: after the trigger appears a READ fails with EIO, and recovers', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const dir = scratch('enbd-client-trigger-');
  t.after(() => dir.cleanup());
  const trigger = dir.path('trigger');
  const server = await nbdkitUnix(
    t,
    ['memory', '16M', 'error=EIO', 'error-rate=100%', `error-file=${trigger}`],
    ['--filter=error'],
    clients,
  );
  const client = await connect(server.uri, clients);
  await client.read(0, 4096);
  writeFileSync(trigger, '');
  const { done } = submitAll(client, [{ command: kCmdRead, offsetBytes: 0, lengthBytes: 4096, data: Buffer.alloc(4096) }]);
  assert.deepEqual(await done, [kEIo]);
  await assert.rejects(client.read(8192, 4096), /READ at 8192\+4096 failed: EIO/);
  rmSync(trigger);
  assert.equal((await client.read(0, 4096)).length, 4096);
});

test('server killed: in-flight and later requests complete with EIO, onClose fires', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '16M', 'delay-read=20'], ['--filter=delay'], clients);
  const client = await connect(server.uri, clients);
  const reasons: (EnbdError | null)[] = [];
  client.onClose = (reason) => reasons.push(reason);
  const requests = Array.from({ length: 8 }, (_, index) => ({
    command: kCmdRead,
    offsetBytes: index * 4096,
    lengthBytes: 4096,
    data: Buffer.alloc(4096),
  }));
  const { done, submittedInFlight } = submitAll(client, requests);
  assert.equal(submittedInFlight, 8);
  await sleep(100);
  server.child.process.kill('SIGKILL');
  assert.deepEqual(await done, new Array<number>(8).fill(kEIo));
  assert.equal(reasons.length, 1);
  assert.equal(reasons[0]?.code, 'ENBD_ERR_CLOSED');
  assert.equal(client.isConnected, false);
  assert.equal(client.closeReason?.code, 'ENBD_ERR_CLOSED');

  const later: number[] = [];
  client.setCompletionHandler((token, errno) => later.push(token, errno));
  client.submit(kCmdWrite, 0, 0, 512, Buffer.alloc(512), 77);
  assert.deepEqual(later, [], 'never completed re-entrantly inside submit');
  assert.equal(client.inFlight, 1);
  await waitFor('EIO completion after close', () => later.length > 0);
  assert.deepEqual(later, [77, kEIo]);
  assert.equal(client.inFlight, 0);
  await assert.rejects(client.read(0, 512), (error: unknown) => error instanceof EnbdError && error.errno === kEIo);
  await client.close();
  assert.equal(reasons.length, 1, 'onClose fires once');
});

test('requestTimeoutMs: a request the server sits on fails the connection with ENBD_ERR_TIMEOUT', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '16M', 'delay-read=20'], ['--filter=delay'], clients);
  const client = await connect(server.uri, clients, { requestTimeoutMs: 300 });
  const reasons: (EnbdError | null)[] = [];
  client.onClose = (reason) => reasons.push(reason);
  await client.write(0, Buffer.alloc(4096, 3));
  await assert.rejects(client.read(0, 4096), (error: unknown) => error instanceof EnbdError && error.errno === kEIo);
  assert.equal(reasons[0]?.code, 'ENBD_ERR_TIMEOUT');
  assert.match(reasons[0]?.message ?? '', /did not answer READ at 0\+4096 within 300 ms/);
  assert.equal(client.isConnected, false);
});

test('disconnect waits for requests in flight, then closes cleanly', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '16M', 'delay-read=200ms'], ['--filter=delay'], clients);
  const client = await connect(server.uri, clients);
  const reasons: (EnbdError | null)[] = [];
  client.onClose = (reason) => reasons.push(reason);
  const targets = Array.from({ length: 4 }, () => Buffer.alloc(4096, 0xff));
  const { done } = submitAll(
    client,
    targets.map((data, index) => ({ command: kCmdRead, offsetBytes: index * 4096, lengthBytes: 4096, data })),
  );
  await client.disconnect();
  assert.deepEqual(await done, [0, 0, 0, 0]);
  assert.ok(targets.every((target) => target.every((byte) => byte === 0)));
  assert.deepEqual(reasons, [null]);
  assert.equal(client.isConnected, false);
  const after = submitAll(client, [{ command: kCmdTrim, offsetBytes: 0, lengthBytes: 4096, data: null }]);
  assert.deepEqual(await after.done, [kEIo]);
});

test('nbdkit file: data written by the client is in the backing file', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  const dir = scratch('enbd-client-file-');
  t.after(() => dir.cleanup());
  const image = dir.path('disk.img');
  writeFileSync(image, '');
  truncateSync(image, 8 * kMiB);
  const server = await nbdkitUnix(t, ['file', image], [], clients);
  const client = await connect(server.uri, clients);
  assert.equal(client.sizeBytes, 8 * kMiB);
  const data = randomBytes(3 * kMiB + 123);
  await client.write(kMiB + 5, data);
  await client.flush();
  const onDisk = readFileSync(image);
  assert.ok(onDisk.subarray(kMiB + 5, kMiB + 5 + data.length).equals(data), 'backing file holds the data');
  assert.ok(onDisk.subarray(0, kMiB + 5).every((byte) => byte === 0));
  await client.disconnect();
});

test('nbdsh reads back what the client wrote', async (t) => {
  if (!requires(t, 'nbdkit', 'nbdsh')) return;
  const clients: NbdClient[] = [];
  const server = await nbdkitUnix(t, ['memory', '16M'], [], clients);
  const client = await connect(server.uri, clients);
  await client.write(12345, Buffer.alloc(4096, 0x5a));
  await client.flush();
  await runOk('nbdsh', ['-u', server.uri, '-c', 'assert h.pread(4096, 12345) == b"\\x5a" * 4096', '-c', 'assert h.pread(1, 12344) == b"\\x00"']);
});

test('qemu-nbd: block sizes from NBD_INFO_BLOCK_SIZE, holes read as zeros, random writes read back', async (t) => {
  if (!requires(t, 'qemu-nbd')) return;
  const clients: NbdClient[] = [];
  const dir = scratch('enbd-client-qemu-');
  const image = dir.path('disk.img');
  writeFileSync(image, '');
  truncateSync(image, 16 * kMiB);
  const server = await qemuNbd(t, image, 'qq', clients, dir);
  const client = await connect(server.uri, clients);
  assert.equal(client.sizeBytes, 16 * kMiB);
  assert.deepEqual(client.blockSizes, { minimumBytes: 1, preferredBytes: 4096, maximumBytes: 32 * kMiB });
  // qemu-nbd answers reads of unallocated ranges with OFFSET_HOLE chunks.
  await client.write(kMiB, Buffer.alloc(4096, 9));
  const target = Buffer.alloc(2 * kMiB, 0xff);
  await client.readInto(0, target);
  const expected = Buffer.alloc(2 * kMiB);
  expected.fill(9, kMiB, kMiB + 4096);
  assert.ok(target.equals(expected), 'hole and data chunks assembled');
  await randomWriteReadBack(client, 4);
  await client.flush();
  await client.disconnect();
  const again = await connect(server.uri, clients);
  const served = await again.read(0, again.sizeBytes);
  assert.ok(readFileSync(image).equals(served), 'backing file equals what the server serves');
});

test('a socket that does not exist -> ENBD_ERR_CONNECT naming it', async () => {
  const dir = scratch('enbd-client-none-');
  try {
    const socketPath = dir.path('missing.sock');
    await assert.rejects(NbdClient.connect(unixUri(socketPath)), (error: unknown) => {
      assert.ok(error instanceof EnbdError);
      assert.equal(error.code, 'ENBD_ERR_CONNECT');
      assert.ok(error.message.includes(socketPath), error.message);
      return true;
    });
  } finally {
    dir.cleanup();
  }
});

test('a server that never greets -> ENBD_ERR_TIMEOUT after connectTimeoutMs', async () => {
  const sockets: Socket[] = [];
  const silent = createServer((socket) => sockets.push(socket));
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
  const address = silent.address();
  assert.ok(address !== null && typeof address === 'object');
  try {
    await assert.rejects(
      NbdClient.connect({ kind: 'tcp', host: '127.0.0.1', port: address.port, exportName: '' }, { connectTimeoutMs: 200 }),
      (error: unknown) => error instanceof EnbdError && error.code === 'ENBD_ERR_TIMEOUT' && error.message.includes(String(address.port)),
    );
  } finally {
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => silent.close(resolve));
  }
});

test('unknown export name -> ENBD_ERR_HANDSHAKE; a listed one connects', async (t) => {
  if (!requires(t, 'nbdkit')) return;
  const clients: NbdClient[] = [];
  // exportname-strict=true: without it nbdkit 1.32 serves any name.
  const server = await nbdkitUnix(
    t,
    ['memory', '1M', 'exportname-list=explicit', 'exportname=a', 'exportname-strict=true'],
    ['--filter=exportname'],
    clients,
  );
  await assert.rejects(connect(server.uri, clients, { exportName: 'nope' }), (error: unknown) => {
    assert.ok(error instanceof EnbdError);
    assert.equal(error.code, 'ENBD_ERR_HANDSHAKE');
    assert.match(error.message, /has no export 'nope'/);
    assert.ok(error.message.includes(server.dir.path('nbdkit.sock')), error.message);
    return true;
  });
  const client = await connect(server.uri, clients, { exportName: 'a' });
  assert.equal(client.sizeBytes, kMiB);
  assert.equal(client.exportName, 'a');
});
