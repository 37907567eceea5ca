/**
 * ControlServer and ControlClient over a real Unix socket, in process, with stand-in handlers:
 * mode 0600 from the start, answers by id, engine errors as error answers, events only to
 * subscribers, every kind of bad input closing only its own connection, stale/live/non-socket
 * paths, the connection bound, and cleanup on close.
 * Threads: main only.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, statSync, writeFileSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { ControlClient, ControlError } from '../../../src/control/client.js';
import { encodeFrame } from '../../../src/control/frame.js';
import { ControlServer, kConnectionsMax, type MethodHandler } from '../../../src/control/server.js';
import { EnbdError } from '../../../src/core/errors.js';
import { createLogger } from '../../../src/core/log.js';
import { scratch, type Scratch } from '../../helpers/tools.js';

const logger = createLogger({ level: process.env['ENBD_TEST_LOG_LEVEL'] ?? 'silent', pretty: false });
let dir: Scratch;
let seq = 0;

before(() => {
  dir = scratch('enbd-control-unit-');
});
after(() => dir.cleanup());

const handlers = new Map<string, MethodHandler>([
  ['status', () => ({ up: true })],
  ['echo', (params) => params],
  ['slow', async (params) => {
    await sleep(Number(params['ms'] ?? 50));
    return 'slow done';
  }],
  ['refuse', () => {
    throw new EnbdError('ENBD_ERR_REFUSED', 'leg 0 is the last in-sync leg; refusing to fail it');
  }],
]);

async function startServer(onSubscribersChanged?: (count: number) => void): Promise<ControlServer> {
  seq += 1;
  return await ControlServer.listen({ path: dir.path(`c${seq}.ctl`), logger, handlers, ...(onSubscribersChanged ? { onSubscribersChanged } : {}) });
}

/** Raw socket: sends `bytes`, resolves with what came back once the daemon closed it (or null on timeout). */
async function sendRaw(path: string, bytes: Buffer, timeoutMs = 3000): Promise<Buffer | null> {
  return await new Promise((resolve) => {
    const socket: Socket = connect(path);
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      resolve(null);
    }, timeoutMs);
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.on('error', () => undefined);
    socket.on('close', () => {
      clearTimeout(timer);
      resolve(Buffer.concat(chunks));
    });
    socket.write(bytes);
  });
}

test('the socket is mode 0600 and owned by us; the umask is restored after listen', async () => {
  const previous = process.umask(0o022);
  try {
    const server = await startServer();
    const stats = statSync(server.path);
    assert.ok(stats.isSocket());
    assert.equal(stats.mode & 0o777, 0o600);
    assert.equal(stats.uid, process.geteuid?.());
    const probe = dir.path(`umask-probe-${seq}`);
    writeFileSync(probe, '');
    assert.equal(statSync(probe).mode & 0o777, 0o644, 'files created after listen get the usual umask');
    await server.close();
    assert.ok(!existsSync(server.path), 'close removes the socket file');
  } finally {
    process.umask(previous);
  }
});

test('requests are answered by id, out of order when a handler is slow', async () => {
  const server = await startServer();
  const client = await ControlClient.connect(server.path);
  try {
    const slow = client.callRaw('slow', { ms: 100 });
    const echo = client.callRaw('echo', { leg: 1, text: 'x' });
    assert.deepStrictEqual(await echo, { leg: 1, text: 'x' });
    assert.equal(await slow, 'slow done');
    assert.deepStrictEqual(await client.call('status'), { up: true });
  } finally {
    client.close();
    await server.close();
  }
});

test('an engine error comes back as an error answer with its code and message', async () => {
  const server = await startServer();
  const client = await ControlClient.connect(server.path);
  try {
    await assert.rejects(client.callRaw('refuse'), (error: unknown) => error instanceof ControlError && error.reason === 'remote' && error.remoteCode === 'ENBD_ERR_REFUSED' && /last in-sync leg/.test(error.message));
    assert.deepStrictEqual(await client.call('status'), { up: true }, 'the connection stays usable');
  } finally {
    client.close();
    await server.close();
  }
});

test('events reach subscribed sessions only; the subscriber count follows', async () => {
  const counts: number[] = [];
  const server = await startServer((count) => counts.push(count));
  const listener = await ControlClient.connect(server.path);
  const bystander = await ControlClient.connect(server.path);
  const seen: string[] = [];
  const heard: string[] = [];
  try {
    bystander.onClose(() => undefined);
    await listener.subscribe((event) => seen.push(event.event));
    await bystander.call('status');
    server.broadcast('leg-state', { leg: 1, state: 'failed' });
    await listener.call('status'); // the event frame was written before this answer
    assert.deepStrictEqual(seen, ['leg-state']);
    assert.deepStrictEqual(heard, []);
    assert.equal(server.subscriberCount, 1);
    listener.close();
    await sleep(100);
    assert.deepStrictEqual(counts, [1, 0]);
  } finally {
    listener.close();
    bystander.close();
    await server.close();
  }
});

const badInputs: Array<[string, () => Buffer]> = [
  ['a frame of random bytes', () => {
    const body = randomBytes(4096);
    body[0] = 0xc1; // never used by msgpack: the body cannot decode to a request
    return Buffer.concat([Buffer.from([0, 0, 0x10, 0]), body]);
  }],
  ['random bytes', () => {
    const bytes = randomBytes(4096);
    bytes[0] = (bytes[0] ?? 0) | 0x01; // as a length prefix: at least 16 MiB, refused at once
    return bytes;
  }],
  ['a huge length prefix', () => Buffer.from([0xff, 0xff, 0xff, 0xff])],
  ['a length prefix of 1 MiB + 1', () => Buffer.from([0x00, 0x10, 0x00, 0x01])],
  ['a zero length prefix', () => Buffer.from([0, 0, 0, 0])],
  ['an undecodable body', () => Buffer.from([0, 0, 0, 2, 0xdc, 0x00])],
  ['a frame that is not a map', () => encodeFrame(12345)],
  ['a request without an id', () => encodeFrame({ method: 'status' })],
];

for (const [what, bytes] of badInputs) {
  test(`${what} closes that connection only`, async () => {
    const server = await startServer();
    const other = await ControlClient.connect(server.path);
    try {
      const reply = await sendRaw(server.path, bytes());
      assert.notEqual(reply, null, 'the daemon closed the bad connection');
      assert.equal(reply?.length, 0, 'nothing was answered');
      assert.deepStrictEqual(await other.call('status'), { up: true }, 'an open connection is untouched');
      const fresh = await ControlClient.connect(server.path);
      assert.deepStrictEqual(await fresh.call('status'), { up: true }, 'a fresh client still gets status');
      fresh.close();
    } finally {
      other.close();
      await server.close();
    }
  });
}

test('an unknown method is answered with ENBD_CTL_UNKNOWN_METHOD, then the connection closes', async () => {
  const server = await startServer();
  const client = await ControlClient.connect(server.path);
  let closed: ControlError | null = null;
  client.onClose((error) => (closed = error));
  try {
    await assert.rejects(client.callRaw('format.disk'), (error: unknown) => error instanceof ControlError && error.remoteCode === 'ENBD_CTL_UNKNOWN_METHOD' && /unknown method "format.disk"/.test(error.message));
    await sleep(100);
    assert.ok(closed !== null, 'the daemon closed the connection after answering');
    const fresh = await ControlClient.connect(server.path);
    assert.deepStrictEqual(await fresh.call('status'), { up: true });
    fresh.close();
  } finally {
    client.close();
    await server.close();
  }
});

test('a stale socket is replaced; a live one and a non-socket are refused', async () => {
  const path = dir.path('stale.ctl');
  const holder = createServer();
  await new Promise<void>((resolve) => holder.listen(path, resolve));
  await assert.rejects(ControlServer.listen({ path, logger, handlers }), /in use by another process/);
  await new Promise<void>((resolve) => holder.close(() => resolve()));

  // What a SIGKILLed daemon leaves: the socket file, with nobody listening.
  const killed = spawnSync(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(path)}, () => process.kill(process.pid, 'SIGKILL'))`]);
  assert.equal(killed.signal, 'SIGKILL');
  assert.ok(statSync(path).isSocket(), 'a stale socket file exists');
  const replaced = await ControlServer.listen({ path, logger, handlers });
  const client = await ControlClient.connect(path);
  assert.deepStrictEqual(await client.call('status'), { up: true });
  client.close();
  await replaced.close();

  const plain = dir.path('plain.ctl');
  writeFileSync(plain, 'not a socket');
  await assert.rejects(ControlServer.listen({ path: plain, logger, handlers }), /exists and is not a socket/);
});

test(`at most ${kConnectionsMax} control connections; the next is closed at once`, async () => {
  const server = await startServer();
  const clients: ControlClient[] = [];
  try {
    for (let index = 0; index < kConnectionsMax; index += 1) {
      const client = await ControlClient.connect(server.path);
      await client.call('status');
      clients.push(client);
    }
    const extra = await ControlClient.connect(server.path);
    await assert.rejects(extra.call('status'), (error: unknown) => error instanceof ControlError && error.reason === 'closed');
    clients.pop()?.close();
    // The server frees the place once it has seen the close; under load that can take a while, so
    // try again until a deadline (the assertion is that a place comes back, not how fast).
    const deadline = Date.now() + 10_000;
    for (;;) {
      const again = await ControlClient.connect(server.path);
      try {
        assert.deepStrictEqual(await again.call('status'), { up: true });
        again.close();
        break;
      } catch (error) {
        again.close();
        if (!(error instanceof ControlError && error.reason === 'closed') || Date.now() > deadline) throw error;
        await sleep(50);
      }
    }
  } finally {
    for (const client of clients) client.close();
    await server.close();
  }
});

test('connecting to a missing socket names the path', async () => {
  const path = dir.path('missing.ctl');
  await assert.rejects(ControlClient.connect(path), (error: unknown) => error instanceof ControlError && error.reason === 'connect' && error.message.includes(path));
});
