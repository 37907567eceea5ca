/**
 * NBD server teardown with requests still waiting for a device buffer (the case the server
 * fuzzer found): NBD_CMD_DISC, or the client's EOF, arrives while a well-formed request waits
 * for a buffer from a device that lends them and has none free.
 *
 * Thread: test main thread (in-process server, Unix socket in a scratch dir).
 *
 * Design notes
 * GatedDevice refuses every buffer until the test opens the gate, so "the request is waiting
 * for a buffer" is a state the test sees (refusedCount > 0), not a race. Cases, for stream
 * and direct receive:
 * - WRITE waiting, then DISC (with and without the client's half-close): the reply carries
 *   the WRITE's cookie and the bytes are on the device; the server then closes.
 * - READ waiting, then DISC: the READ's data arrives.
 * - EOF without DISC after a WRITE received in full: decided by the spec (the server may drop
 *   outstanding work when the client closes without DISC, but must not ack what it did not
 *   do): enbd serves what it received in full and answers it, like after DISC.
 * - EOF in the middle of a WRITE payload: no reply, nothing written, the buffer comes back.
 * - A client that sends DISC and then never reads its replies cannot hold the connection: the
 *   server closes it after the drain limit (kDisconnectDrainMs of credited sweep time).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { createNbdServer, type NbdServer } from '../../../src/nbd/server/server.js';
import { createLogger } from '../../../src/core/log.js';
import * as p from '../../../src/nbd/protocol.js';
import { MemoryDevice, PooledMemoryDevice } from '../../helpers/memory-device.js';
import { NbdProbe, ProbeClosedError, ProbeTimeoutError } from '../../helpers/nbd-probe.js';
import { scratch, waitFor, type Scratch } from '../../helpers/tools.js';
import type { BufferLease } from '../../../src/core/block-device.js';

const kSizeBytes = 4 * 1024 * 1024;
const kExportName = 'drain';

/** Lends no buffer until `open()`; then behaves like PooledMemoryDevice. */
class GatedDevice extends PooledMemoryDevice {
  private gated = true;
  gatedRefusals = 0;

  override acquireBuffer(command: number, lengthBytes: number, token: number): BufferLease | null {
    if (this.gated) {
      this.gatedRefusals += 1;
      return null;
    }
    return super.acquireBuffer(command, lengthBytes, token);
  }

  shut(): void {
    this.gated = true;
  }

  open(): void {
    this.gated = false;
    this.onBufferAvailable?.();
  }
}

function pattern(lengthBytes: number, seed: number): Buffer {
  const data = Buffer.alloc(lengthBytes);
  for (let index = 0; index < lengthBytes; index += 1) data[index] = (index * 13 + seed) & 0xff;
  return data;
}

const kDisc = NbdProbe.request({ type: p.kCmdDisc, cookie: 0n, offset: 0, length: 0 });

for (const directReceive of [false, true]) describe(`NBD server drains requests waiting for a buffer (${directReceive ? 'direct' : 'stream'} receive)`, () => {
  let dir: Scratch;
  let device: GatedDevice;
  let server: NbdServer;
  let socketPath: string;

  before(async () => {
    dir = scratch('enbd-disc-drain-');
    socketPath = dir.path('drain.sock');
    device = new GatedDevice({ sizeBytes: kSizeBytes, poolBytes: 1024 * 1024, unitBytes: 4096 });
    server = createNbdServer({
      device,
      exportName: kExportName,
      description: 'drain test',
      logger: createLogger({ level: 'silent', pretty: false }),
      directReceive,
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

  async function connectWaiting(structured: boolean): Promise<NbdProbe> {
    device.shut();
    device.gatedRefusals = 0;
    const probe = await NbdProbe.connect({ path: socketPath });
    await probe.negotiate({ exportName: kExportName, structured });
    return probe;
  }

  // 4 KiB: header, payload, DISC and EOF arrive in one read; 256 KiB: in direct receive the
  // rest of such a payload is read straight into the buffer
  for (const [halfClose, lengthBytes] of [[false, 4096], [true, 4096], [true, 256 * 1024]] as const) {
    test(`a ${lengthBytes / 1024} KiB WRITE waiting for a buffer, then DISC${halfClose ? ' and EOF' : ''}: answered with its cookie, bytes written`, async () => {
      const probe = await connectWaiting(false);
      try {
        const data = pattern(lengthBytes, halfClose ? 5 : 9);
        const offset = halfClose ? 1024 * 1024 + lengthBytes : 0;
        probe.write(Buffer.concat([NbdProbe.request({ type: p.kCmdWrite, cookie: 0xabcdef01n, offset, length: data.length, payload: data }), kDisc]));
        if (halfClose) probe.end();
        await waitFor('the server to ask for a buffer', () => device.gatedRefusals > 0);
        await assert.rejects(probe.readExact(1, 200), ProbeTimeoutError, 'no reply before the buffer frees');
        device.open();
        const reply = await probe.readReply();
        assert.equal(reply.cookie, 0xabcdef01n);
        assert.equal(reply.errno, 0);
        assert.ok(Buffer.from(device.bytes.subarray(offset, offset + data.length)).equals(data), 'the WRITE bytes are on the device');
        assert.ok(await probe.waitClosed(), 'the server closes after the drain');
        await waitFor('buffers returned', () => device.lentCount === 0);
      } finally {
        probe.destroy();
      }
    });
  }

  test('a READ waiting for a buffer, then DISC and EOF: its data arrives', async () => {
    const offset = 2 * 1024 * 1024;
    const data = pattern(8192, 77);
    device.bytes.set(data, offset);
    const probe = await connectWaiting(false);
    try {
      probe.write(Buffer.concat([NbdProbe.request({ type: p.kCmdRead, cookie: 42n, offset, length: data.length }), kDisc]));
      probe.end();
      await waitFor('the server to ask for a buffer', () => device.gatedRefusals > 0);
      device.open();
      const reply = await probe.readReply(data.length);
      assert.equal(reply.cookie, 42n);
      assert.equal(reply.errno, 0);
      assert.ok(reply.payload.equals(data), 'READ data');
      assert.ok(await probe.waitClosed());
    } finally {
      probe.destroy();
    }
  });

  test('EOF without DISC after a WRITE received in full: it is served and answered', async () => {
    const probe = await connectWaiting(true);
    try {
      const data = pattern(4096 * 3, 31);
      const offset = 3 * 1024 * 1024;
      probe.write(NbdProbe.request({ type: p.kCmdWrite, cookie: 7n, offset, length: data.length, payload: data }));
      probe.end();
      await waitFor('the server to ask for a buffer', () => device.gatedRefusals > 0);
      device.open();
      const [reply] = await probe.readReplyChunks();
      assert.equal(reply?.cookie, 7n);
      assert.equal(reply?.errno, 0);
      assert.ok(Buffer.from(device.bytes.subarray(offset, offset + data.length)).equals(data));
      assert.ok(await probe.waitClosed());
    } finally {
      probe.destroy();
    }
  });

  test('EOF in the middle of a WRITE payload: no reply, nothing written, buffer returned', async () => {
    const offset = 3 * 1024 * 1024 + 65536;
    device.bytes.fill(0xee, offset, offset + 8192);
    const submittedBefore = device.submittedCount;
    const probe = await connectWaiting(false);
    try {
      const header = NbdProbe.request({ type: p.kCmdWrite, cookie: 8n, offset, length: 8192 });
      probe.write(Buffer.concat([header, pattern(1000, 3)]));
      probe.end();
      await waitFor('the server to ask for a buffer', () => device.gatedRefusals > 0);
      device.open();
      await assert.rejects(probe.readExact(1), ProbeClosedError, 'the server closes without a reply');
      assert.equal(device.submittedCount, submittedBefore, 'nothing was submitted');
      assert.ok(device.bytes.subarray(offset, offset + 8192).every((byte) => byte === 0xee), 'nothing written');
      await waitFor('buffers returned', () => device.lentCount === 0);
      await waitFor('the connection to close', () => server.connectionCount === 0);
    } finally {
      probe.destroy();
    }
  });
});

test('a client that sends DISC and never reads its replies is closed after the drain limit', async () => {
  const dir = scratch('enbd-disc-stuck-');
  const device = new MemoryDevice({ sizeBytes: 64 * 1024 * 1024 });
  const server = createNbdServer({
    device,
    exportName: kExportName,
    description: 'drain limit test',
    logger: createLogger({ level: 'silent', pretty: false }),
  });
  const socketPath = dir.path('stuck.sock');
  await server.listenUnix(socketPath);
  const socket = connect(socketPath);
  try {
    await new Promise<void>((resolveConnect, rejectConnect) => {
      socket.once('connect', resolveConnect);
      socket.once('error', rejectConnect);
    });
    // fixed newstyle, no zeroes, EXPORT_NAME: no option reply to wait for
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(p.kClientFlagFixedNewstyle | p.kClientFlagNoZeroes, 0);
    const option = Buffer.alloc(16);
    option.writeUInt32BE(p.kIHaveOptHigh, 0);
    option.writeUInt32BE(p.kIHaveOptLow, 4);
    option.writeUInt32BE(p.kOptExportName, 8);
    option.writeUInt32BE(kExportName.length, 12);
    const reads = Array.from({ length: 12 }, (_unused, index) =>
      NbdProbe.request({ type: p.kCmdRead, cookie: BigInt(index + 1), offset: index * 4 * 1024 * 1024, length: 4 * 1024 * 1024 }));
    socket.write(Buffer.concat([flags, option, Buffer.from(kExportName), ...reads, kDisc]));
    // never read: 48 MiB of READ replies back up in the socket
    socket.pause();
    await waitFor('the server to take the connection', () => server.connectionCount === 1);
    await waitFor('the server to close the stuck connection', () => server.connectionCount === 0, 45_000);
  } finally {
    socket.destroy();
    await server.close();
    await device.close();
    dir.cleanup();
  }
});
