/**
 * `enbd serve` fed malformed and hostile input over a raw socket (test/helpers/nbd-probe.ts):
 * bad options, bad flags, lying lengths, bad requests, oversized payloads, clients vanishing
 * mid-payload. Each case asserts the exact answer (option reply type or NBD errno) or a
 * closed connection, and then that the server process is alive and still serving.
 * Threads: test process main thread; the server is a child process.
 */
import { after, afterEach, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { truncateSync, writeFileSync } from 'node:fs';
import { readRange, scratch, type Scratch } from '../helpers/tools.js';
import {
  assertServing,
  type ServerUnderTest,
  skipUnlessTools,
  startServerUnderTest,
} from '../helpers/serve.js';
import { NbdProbe, assembleRead } from '../helpers/nbd-probe.js';
import * as p from '../../src/nbd/protocol.js';

const kSizeBytes = 16 * 1024 * 1024;
const kMaxPayloadBytes = 1024 * 1024;
const kName = 'disk';

describe('enbd serve: malformed and hostile input', { skip: skipUnlessTools('nbdinfo') }, () => {
  let dir: Scratch;
  let server: ServerUnderTest;
  const probes: NbdProbe[] = [];

  async function open(): Promise<NbdProbe> {
    const probe = await NbdProbe.connect({ path: server.socketPath });
    probes.push(probe);
    return probe;
  }

  /** A READ that must succeed on this (transmission-phase, structured) connection. */
  async function assertReadWorks(probe: NbdProbe, cookie: bigint, offset = 0): Promise<Buffer> {
    probe.sendRequest({ type: p.kCmdRead, cookie, offset, length: 4096 });
    const chunks = await probe.readReplyChunks(4096);
    for (const chunk of chunks) {
      assert.equal(chunk.cookie, cookie);
      assert.equal(chunk.errno, 0, `READ failed with errno ${chunk.errno}`);
    }
    return assembleRead(chunks, BigInt(offset), 4096);
  }

  before(async () => {
    dir = scratch('enbd-bad-');
    writeFileSync(dir.path('disk.img'), '');
    truncateSync(dir.path('disk.img'), kSizeBytes);
    server = await startServerUnderTest({
      file: dir.path('disk.img'),
      socketPath: dir.path('s.sock'),
      name: kName,
      maxPayloadBytes: kMaxPayloadBytes,
    });
  });

  afterEach(async () => {
    for (const probe of probes.splice(0)) probe.destroy();
    await assertServing(server);
  });

  after(async () => {
    await server?.stop();
    dir?.cleanup();
  });

  test('greeting: fixed newstyle with NO_ZEROES', async () => {
    const probe = await open();
    assert.equal(await probe.readGreeting(), p.kFlagFixedNewstyle | p.kFlagNoZeroes);
  });

  test('unknown option 99 with data -> ERR_UNSUP, next option works', async () => {
    const probe = await open();
    await probe.handshake();
    probe.sendOption(99, Buffer.from('junk'));
    const [reply] = await probe.readOptionReplies();
    assert.equal(reply?.option, 99);
    assert.equal(reply?.type, p.kRepErrUnsup);
    probe.sendOption(p.kOptStructuredReply);
    assert.equal((await probe.readOptionReply()).type, p.kRepAck);
    probe.sendOption(p.kOptGo, NbdProbe.infoData(''));
    const replies = await probe.readOptionReplies();
    assert.equal(replies[replies.length - 1]?.type, p.kRepAck);
    await assertReadWorks(probe, 7n);
  });

  test('NBD_OPT_LIST with data -> ERR_INVALID; LIST without data lists the export', async () => {
    const probe = await open();
    await probe.handshake();
    probe.sendOption(p.kOptList, Buffer.from([1, 2, 3]));
    const [bad] = await probe.readOptionReplies();
    assert.equal(bad?.type, p.kRepErrInvalid);
    probe.sendOption(p.kOptList);
    const replies = await probe.readOptionReplies();
    assert.equal(replies[replies.length - 1]?.type, p.kRepAck);
    const names = replies
      .filter((reply) => reply.type === p.kRepServer)
      .map((reply) => reply.data.subarray(4, 4 + reply.data.readUInt32BE(0)).toString('utf8'));
    assert.ok(names.includes(kName), `LIST: ${JSON.stringify(names)}`);
  });

  test('client flags with an unknown bit -> connection closed', async () => {
    const probe = await open();
    await probe.readGreeting();
    probe.sendClientFlags(p.kClientFlagFixedNewstyle | 0x100);
    assert.equal(await probe.waitClosed(), true, 'server must close');
  });

  test('option length of 1 GiB -> connection closed, no crash', async () => {
    const probe = await open();
    await probe.handshake();
    probe.sendOption(p.kOptList, Buffer.alloc(100, 0x41), 1 << 30);
    assert.equal(await probe.waitClosed(), true, 'server must close instead of buffering 1 GiB');
  });

  test('STARTTLS on a server without TLS -> ERR_UNSUP or ERR_POLICY, session continues', async () => {
    const probe = await open();
    await probe.handshake();
    probe.sendOption(p.kOptStartTls);
    const [reply] = await probe.readOptionReplies();
    assert.ok(
      reply?.type === p.kRepErrUnsup || reply?.type === p.kRepErrPolicy,
      `STARTTLS answered 0x${reply?.type.toString(16)}`,
    );
    probe.sendOption(p.kOptInfo, NbdProbe.infoData(''));
    const info = await probe.readOptionReplies();
    assert.equal(info[info.length - 1]?.type, p.kRepAck);
  });

  test('GO / INFO for an unknown export -> ERR_UNKNOWN; the right name then works', async () => {
    const probe = await open();
    await probe.handshake();
    for (const option of [p.kOptInfo, p.kOptGo]) {
      probe.sendOption(option, NbdProbe.infoData('no-such-export'));
      const replies = await probe.readOptionReplies();
      assert.equal(replies.length, 1, 'no REP_INFO before the error');
      assert.equal(replies[0]?.type, p.kRepErrUnknown);
    }
    probe.sendOption(p.kOptGo, NbdProbe.infoData(kName, [p.kInfoBlockSize]));
    const replies = await probe.readOptionReplies();
    assert.equal(replies[replies.length - 1]?.type, p.kRepAck);
    const exportInfo = replies.find((reply) => reply.type === p.kRepInfo && reply.data.readUInt16BE(0) === p.kInfoExport);
    assert.ok(exportInfo);
    assert.equal(exportInfo.data.readBigUInt64BE(2), BigInt(kSizeBytes));
    const blockSize = replies.find((reply) => reply.type === p.kRepInfo && reply.data.readUInt16BE(0) === p.kInfoBlockSize);
    assert.ok(blockSize, 'INFO_BLOCK_SIZE advertised');
    assert.equal(blockSize.data.readUInt32BE(2), 1);
    assert.equal(blockSize.data.readUInt32BE(6), 4096);
    assert.equal(blockSize.data.readUInt32BE(10), kMaxPayloadBytes);
  });

  test('EXPORT_NAME for an unknown export -> connection closed', async () => {
    const probe = await open();
    await probe.handshake();
    probe.sendOption(p.kOptExportName, Buffer.from('no-such-export'));
    assert.equal(await probe.waitClosed(), true);
    assert.equal(probe.bufferedBytes, 0, 'no export info sent for an unknown export');
  });

  test('truncated INFO data -> ERR_INVALID', async () => {
    const probe = await open();
    await probe.handshake();
    const data = Buffer.alloc(6);
    data.writeUInt32BE(10, 0); // name length 10, but only 2 more bytes follow
    data.write('ab', 4);
    probe.sendOption(p.kOptInfo, data);
    const [reply] = await probe.readOptionReplies();
    assert.equal(reply?.type, p.kRepErrInvalid);
    // Info request count claims more entries than present.
    const lying = Buffer.alloc(6);
    lying.writeUInt32BE(0, 0);
    lying.writeUInt16BE(3, 4);
    probe.sendOption(p.kOptGo, lying);
    const [again] = await probe.readOptionReplies();
    assert.equal(again?.type, p.kRepErrInvalid);
  });

  test('ABORT -> ACK (or close), then the connection ends', async () => {
    const probe = await open();
    await probe.handshake();
    probe.sendOption(p.kOptAbort);
    assert.equal(await probe.waitClosed(), true);
    if (probe.bufferedBytes > 0) assert.equal((await probe.readOptionReply()).type, p.kRepAck);
  });

  test('unknown command 42 -> EINVAL, connection keeps serving', async () => {
    const probe = await open();
    await probe.negotiate({ metaContexts: ['base:allocation'] });
    probe.sendRequest({ type: 42, cookie: 0x4242n, length: 0 });
    const chunks = await probe.readReplyChunks();
    assert.equal(chunks[0]?.cookie, 0x4242n);
    assert.equal(chunks[0]?.errno, p.kEInval);
    await assertReadWorks(probe, 43n);
  });

  test('READ with undefined flag 0x40 -> structured ERROR chunk with EINVAL', async () => {
    const probe = await open();
    await probe.negotiate();
    probe.sendRequest({ type: p.kCmdRead, flags: 0x40, cookie: 0x40n, length: 4096 });
    const chunks = await probe.readReplyChunks(4096);
    assert.equal(chunks.length, 1);
    const chunk = chunks[0];
    assert.ok(chunk);
    assert.equal(chunk.structured, true, 'READ replies must be structured once negotiated');
    assert.equal(chunk.type, p.kReplyTypeError);
    assert.equal(chunk.flags & p.kReplyFlagDone, p.kReplyFlagDone);
    assert.equal(chunk.cookie, 0x40n);
    assert.equal(chunk.errno, p.kEInval);
    await assertReadWorks(probe, 41n);
  });

  test('READ with undefined flag on a simple-reply connection -> simple EINVAL', async () => {
    const probe = await open();
    await probe.negotiate({ structured: false });
    probe.sendRequest({ type: p.kCmdRead, flags: 0x40, cookie: 5n, length: 512 });
    const reply = await probe.readReply(512);
    assert.equal(reply.structured, false);
    assert.equal(reply.errno, p.kEInval);
    probe.sendRequest({ type: p.kCmdRead, cookie: 6n, length: 512 });
    const good = await probe.readReply(512);
    assert.equal(good.errno, 0);
    assert.equal(good.payload.length, 512);
  });

  test('WRITE at 2^40 with a 4-byte payload -> ENOSPC; payload consumed', async () => {
    const probe = await open();
    await probe.negotiate();
    probe.sendRequest({ type: p.kCmdWrite, cookie: 1n, offset: 1n << 40n, length: 4, payload: Buffer.from('ABCD') });
    const [reply] = await probe.readReplyChunks();
    assert.equal(reply?.cookie, 1n);
    assert.equal(reply?.errno, p.kENoSpc);
    // If the 4 bytes were not consumed, they would be parsed as a (bad) request header.
    probe.sendRequest({ type: p.kCmdWrite, cookie: 2n, offset: 8192, length: 4, payload: Buffer.from('WXYZ') });
    const [written] = await probe.readReplyChunks();
    assert.equal(written?.errno, 0);
    const data = await assertReadWorks(probe, 3n, 8192);
    assert.equal(data.subarray(0, 4).toString(), 'WXYZ');
  });

  test('WRITE longer than the maximum payload -> disconnect or EINVAL/EOVERFLOW', async () => {
    const probe = await open();
    await probe.negotiate();
    const lengthBytes = kMaxPayloadBytes + 4096;
    probe.sendRequest({ type: p.kCmdWrite, cookie: 9n, offset: 0, length: lengthBytes, payload: Buffer.alloc(lengthBytes, 0x5c) });
    let outcome: string;
    try {
      const [reply] = await probe.readReplyChunks();
      assert.equal(reply?.cookie, 9n);
      assert.ok(reply?.errno === p.kEInval || reply?.errno === p.kEOverflow, `errno ${String(reply?.errno)}`);
      outcome = 'error reply';
    } catch (error) {
      assert.equal((error as Error).name, 'ProbeClosedError', String(error));
      outcome = 'disconnect';
    }
    assert.ok(outcome === 'error reply' || outcome === 'disconnect');
    assert.ok(!readRange(server.file, 0, 4096).equals(Buffer.alloc(4096, 0x5c)), 'oversized write was not applied');
    const fresh = await open();
    await fresh.negotiate();
    await assertReadWorks(fresh, 10n);
  });

  test('bad request magic -> connection closed without a reply', async () => {
    const probe = await open();
    await probe.negotiate();
    probe.sendRequest({ magic: 0x12345678, type: p.kCmdRead, length: 512 });
    assert.equal(await probe.waitClosed(), true);
    assert.equal(probe.bufferedBytes, 0);
  });

  test('NBD_CMD_DISC -> server closes the connection', async () => {
    const probe = await open();
    await probe.negotiate();
    probe.sendRequest({ type: p.kCmdDisc, length: 0 });
    assert.equal(await probe.waitClosed(), true);
  });

  test('client vanishes mid-payload: nothing partial written, others keep working', async () => {
    const offset = 2 * 1024 * 1024;
    const bystander = await open();
    await bystander.negotiate();
    const probe = await open();
    await probe.negotiate();
    probe.sendRequest({ type: p.kCmdWrite, cookie: 1n, offset, length: 1024 * 1024, payload: Buffer.alloc(1000, 0xab) });
    await new Promise((resolveLater) => setTimeout(resolveLater, 50));
    probe.destroy();
    assert.equal(await probe.waitClosed(), true);
    // The bystander connection opened before the drop still works.
    bystander.sendRequest({ type: p.kCmdWrite, cookie: 2n, offset: offset + 4096, length: 4, payload: Buffer.from('live') });
    assert.equal((await bystander.readReplyChunks())[0]?.errno, 0);
    const data = await assertReadWorks(bystander, 3n, offset);
    assert.ok(data.subarray(0, 1000).equals(Buffer.alloc(1000)), 'partial payload must not be written');
    const fresh = await open();
    await fresh.negotiate();
    const after = await assertReadWorks(fresh, 4n, offset + 4096);
    assert.equal(after.subarray(0, 4).toString(), 'live');
  });

  test('70 clients dropping mid-payload do not use up the server (no leaked connection slots)', async () => {
    for (let index = 0; index < 70; index++) {
      const probe = await NbdProbe.connect({ path: server.socketPath });
      await probe.negotiate();
      probe.sendRequest({ type: p.kCmdWrite, cookie: 1n, offset: 6 * 1024 * 1024, length: 8192, payload: Buffer.alloc(100, 1) });
      probe.destroy();
      assert.equal(await probe.waitClosed(), true);
    }
    const fresh = await open();
    await fresh.negotiate();
    await assertReadWorks(fresh, 1n);
  });

  test('client half-closes mid-payload (EOF, socket still open) -> server closes, writes nothing', async () => {
    const offset = 3 * 1024 * 1024;
    const probe = await open();
    await probe.negotiate();
    probe.sendRequest({ type: p.kCmdWrite, cookie: 1n, offset, length: 8192, payload: Buffer.alloc(1000, 0xcd) });
    probe.end();
    assert.equal(await probe.waitClosed(), true, 'server must close a connection whose client sent EOF mid-payload');
    assert.equal(probe.bufferedBytes, 0, 'no reply for a write that never got its payload');
    assert.ok(readRange(server.file, offset, 1000).equals(Buffer.alloc(1000)));
  });

  test('client half-closes after a complete request -> gets its reply, then the server closes', async () => {
    const probe = await open();
    await probe.negotiate();
    probe.sendRequest({ type: p.kCmdWrite, cookie: 77n, offset: 4 * 1024 * 1024, length: 4, payload: Buffer.from('tail') });
    probe.end();
    const [reply] = await probe.readReplyChunks();
    assert.equal(reply?.cookie, 77n);
    assert.equal(reply?.errno, 0);
    assert.equal(await probe.waitClosed(), true);
    assert.equal(readRange(server.file, 4 * 1024 * 1024, 4).toString(), 'tail');
  });

  test('many half-open and garbage connections at once, then a clean client', async () => {
    const garbage: NbdProbe[] = [];
    for (let index = 0; index < 20; index++) {
      const probe = await open();
      if (index % 2 === 0) probe.write(Buffer.alloc(64, index));
      garbage.push(probe);
    }
    for (const probe of garbage.filter((_, index) => index % 2 === 0)) {
      assert.equal(await probe.waitClosed(), true);
    }
    const fresh = await open();
    await fresh.negotiate();
    await assertReadWorks(fresh, 1n);
  });
});
