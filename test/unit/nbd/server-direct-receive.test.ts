/**
 * NBD server direct receive (`--receive direct`): after a large WRITE whose payload was read
 * straight into its buffer, the next read asks for one request header only, so a large WRITE
 * behind it is read into its own buffer whole (no bytes copied from the receive buffer).
 *
 * Thread: test main thread (in-process server, Unix socket in a scratch dir).
 *
 * Design notes
 * The client waits for each reply before sending the next request (header and payload in one
 * write), so the server's header-sized read finds the whole header queued: the copy counter
 * (payloadStats().bytesCopied) must not grow for the second and later 1 MiB WRITEs. Small
 * requests between them (4 KiB WRITE, READ) go through the receive buffer as before, and
 * every byte is checked on the device and read back.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createNbdServer, type NbdServer } from '../../../src/nbd/server/server.js';
import { createLogger } from '../../../src/core/log.js';
import * as p from '../../../src/nbd/protocol.js';
import { PooledMemoryDevice } from '../../helpers/memory-device.js';
import { NbdProbe } from '../../helpers/nbd-probe.js';
import { scratch, type Scratch } from '../../helpers/tools.js';

const kSizeBytes = 16 * 1024 * 1024;
const kMiB = 1024 * 1024;

let dir: Scratch;
let device: PooledMemoryDevice;
let server: NbdServer;
let socketPath: string;

before(async () => {
  dir = scratch('enbd-direct-rx-');
  socketPath = dir.path('direct.sock');
  device = new PooledMemoryDevice({ sizeBytes: kSizeBytes, poolBytes: 8 * kMiB, unitBytes: 4096 });
  server = createNbdServer({
    device,
    exportName: 'direct',
    description: 'direct receive test',
    logger: createLogger({ level: 'silent', pretty: false }),
    maximumPayloadBytes: 4 * kMiB,
    directReceive: true,
  });
  await server.listenUnix(socketPath);
});

after(async () => {
  try {
    await server?.close();
    await device?.close();
  } finally {
    dir?.cleanup();
  }
});

function pattern(lengthBytes: number, seed: number): Buffer {
  const data = Buffer.alloc(lengthBytes);
  for (let index = 0; index < lengthBytes; index += 1) data[index] = (index * 7 + seed * 131) & 0xff;
  return data;
}

test('direct receive: a 1 MiB WRITE after a 1 MiB WRITE is read into its buffer whole (no copy)', async () => {
  const probe = await NbdProbe.connect({ path: socketPath });
  try {
    await probe.negotiate({ exportName: 'direct', structured: false });
    const written: Array<{ offset: number; data: Buffer }> = [];
    async function write(cookie: bigint, offset: number, data: Buffer): Promise<void> {
      probe.sendRequest({ type: p.kCmdWrite, cookie, offset, length: data.length, payload: data });
      const reply = await probe.readReply();
      assert.equal(reply.cookie, cookie);
      assert.equal(reply.errno, 0);
      written.push({ offset, data });
    }
    await write(1n, 0, pattern(kMiB, 1));
    const afterFirst = server.payloadStats();
    await write(2n, kMiB, pattern(kMiB, 2));
    await write(3n, 2 * kMiB, pattern(kMiB, 3));
    const afterLarge = server.payloadStats();
    assert.equal(afterLarge.bytesCopied - afterFirst.bytesCopied, 0, 'the 2nd and 3rd 1 MiB payloads were not copied');
    assert.equal(afterLarge.bytesDirect - afterFirst.bytesDirect, 2 * kMiB, 'they were read straight into their buffers');
    // small requests between large ones still go through the receive buffer
    await write(4n, 3 * kMiB + 512, pattern(4096, 4));
    probe.sendRequest({ type: p.kCmdRead, cookie: 5n, offset: kMiB, length: 8192 });
    const read = await probe.readReply(8192);
    assert.equal(read.cookie, 5n);
    assert.ok(read.payload.equals(pattern(kMiB, 2).subarray(0, 8192)));
    await write(6n, 4 * kMiB, pattern(2 * kMiB, 6));
    await write(7n, 6 * kMiB + 4096, pattern(96 * 1024, 7));
    await write(8n, 7 * kMiB, pattern(kMiB, 8));
    for (const { offset, data } of written) {
      assert.ok(Buffer.from(device.bytes.subarray(offset, offset + data.length)).equals(data), `bytes at ${offset}`);
    }
    const stats = server.payloadStats();
    const total = written.reduce((sum, { data }) => sum + data.length, 0);
    assert.equal(stats.bytesCopied + stats.bytesDirect, total, 'every payload byte counted once');
  } finally {
    probe.destroy();
  }
});
