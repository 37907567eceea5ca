/**
 * Issue 10 finding 5, "one client can lock out or freeze everyone": raw node:net sockets
 * (test/helpers/nbd-probe.ts) against a real `enbd serve` and a real `enbd mirror` (two file
 * legs), started with small limits so the suite stays fast:
 * - sockets that connect and never send a byte are closed by the handshake timeout, and a real
 *   client (nbdinfo) gets in afterwards;
 * - beyond --max-connections a new socket is closed at once (no greeting), and a slot freed by
 *   a leaving client is usable again;
 * - clients that start a WRITE payload (or a header) and go silent are closed by the payload
 *   timeout; on the mirror, while three such clients sit on 32 MiB WRITEs, an established
 *   client's 4 KiB WRITE + READ completes before any of them was closed (the fair share of the
 *   ring: without it two of them take all 256 slots), and their ring slots are released.
 * Each case asserts real outcomes (closed sockets, bytes read back, ring slots) and the logged
 * reason; waits are bounded by generous deadlines, no duration is asserted.
 * Threads: test process main thread; the servers are child processes.
 */
import { after, afterEach, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { truncateSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { readRange, scratch, waitFor, type Scratch } from '../helpers/tools.js';
import { assertServing, enbdCli, run, skipUnlessTools, startServerUnderTest, type ServerUnderTest } from '../helpers/serve.js';
import { startMirror, stopAllMirrors, type MirrorProcess } from '../helpers/mirror.js';
import { NbdProbe, assembleRead } from '../helpers/nbd-probe.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { ControlClient } from '../../src/control/client.js';
import * as p from '../../src/nbd/protocol.js';

const kConnectionsMax = 12;
const kHandshakeTimeoutMs = 500;
const kPayloadTimeoutMs = 1000;
/** Mirror: long enough that the established client surely finishes before the first close. */
const kMirrorPayloadTimeoutMs = 2000;
const kStallWriteBytes = 32 * 1024 * 1024;
/**
 * The mirror advertises at most 1/8 of its ring as the largest request (8 MiB of the default
 * 64 MiB), so against it eight stallers would hold every slot without the fair share.
 */
const kMirrorStallWriteBytes = 8 * 1024 * 1024;
const kMirrorStallers = 8;
const kWaitMs = 15_000;

function limitArgs(payloadTimeoutMs: number): string[] {
  return [
    '--max-connections', String(kConnectionsMax),
    '--handshake-timeout', String(kHandshakeTimeoutMs),
    '--payload-timeout', String(payloadTimeoutMs),
    '--log-level', 'info',
  ];
}

function sparseFile(path: string, sizeBytes: number): string {
  writeFileSync(path, '');
  truncateSync(path, sizeBytes);
  return path;
}

/** Rejects when `promise` has not settled within `timeoutMs` (a deadline, not a measurement). */
async function within<T>(what: string, timeoutMs: number, promise: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    return await Promise.race([promise, expired]);
  } finally {
    clearTimeout(timer);
  }
}

/** A WRITE header for `lengthBytes` followed by one payload byte, then silence. */
function stallWrite(probe: NbdProbe, cookie: bigint, lengthBytes: number): void {
  probe.sendRequest({ type: p.kCmdWrite, cookie, offset: 0, length: lengthBytes, payload: Buffer.from([0xab]) });
}

describe('enbd serve: idle, surplus and stalled clients', { skip: skipUnlessTools('nbdinfo') }, () => {
  let dir: Scratch;
  let server: ServerUnderTest;
  const probes: NbdProbe[] = [];

  async function open(): Promise<NbdProbe> {
    const probe = await NbdProbe.connect({ path: server.socketPath });
    probes.push(probe);
    return probe;
  }

  before(async () => {
    dir = scratch('enbd-abuse-');
    server = await startServerUnderTest({
      kind: 'enbd',
      file: sparseFile(dir.path('disk.img'), 64 * 1024 * 1024),
      socketPath: dir.path('s.sock'),
      args: limitArgs(kPayloadTimeoutMs),
    });
  });

  afterEach(async () => {
    for (const probe of probes.splice(0)) probe.destroy();
    // Destroyed probes must leave their slots before the next case counts connections.
    await sleep(100);
    await assertServing(server);
  });

  after(async () => {
    await server?.stop();
    dir?.cleanup();
  });

  test('max-connections sockets that send nothing are closed by the handshake timeout; then a client gets in', async () => {
    const idle: NbdProbe[] = [];
    for (let index = 0; index < kConnectionsMax; index += 1) idle.push(await open());
    // Each one was accepted (it got the greeting) and then sends nothing at all.
    for (const probe of idle) await probe.readGreeting();
    for (const [index, probe] of idle.entries()) {
      assert.equal(await probe.waitClosed(kWaitMs), true, `idle socket ${index} was closed by the server`);
    }
    await assertServing(server);
    assert.match(server.output(), /handshake not finished within 500 ms/);
  });

  test('beyond --max-connections a new socket is closed at once; a freed slot is usable again', async () => {
    const established: NbdProbe[] = [];
    for (let index = 0; index < kConnectionsMax; index += 1) {
      const probe = await open();
      await probe.negotiate();
      established.push(probe);
    }
    const surplus = await open();
    assert.equal(await surplus.waitClosed(kWaitMs), true, 'the surplus socket was closed');
    assert.equal(surplus.bufferedBytes, 0, 'the surplus socket got no greeting');
    // The established ones are in transmission: no handshake timeout for them.
    await sleep(kHandshakeTimeoutMs * 2);
    for (const probe of established) assert.equal(probe.closed, false, 'established clients stay');
    established[0]?.sendRequest({ type: p.kCmdDisc, length: 0 });
    assert.equal(await established[0]?.waitClosed(kWaitMs), true, 'DISC closes the first client');
    const late = await open();
    await late.negotiate();
    late.sendRequest({ type: p.kCmdRead, cookie: 7n, length: 4096 });
    const chunks = await late.readReplyChunks(4096);
    assert.equal(chunks.at(-1)?.errno, 0, 'the client in the freed slot is served');
    await waitFor('the refusal log', () => /refused connections/.test(server.output()), kWaitMs);
  });

  test('a server stopped for longer than the payload timeout does not blame a client mid-payload', async () => {
    const probe = await open();
    await probe.negotiate();
    const payload = randomBytes(64 * 1024);
    const offset = 1024 * 1024;
    probe.sendRequest({ type: p.kCmdWrite, cookie: 5n, offset, length: payload.length, payload: payload.subarray(0, 1024) });
    await sleep(kPayloadTimeoutMs / 2);
    server.signal('SIGSTOP');
    try {
      // The rest waits in the kernel while the server cannot run.
      probe.write(payload.subarray(1024));
      await sleep(kPayloadTimeoutMs * 3);
    } finally {
      server.signal('SIGCONT');
    }
    const reply = await probe.readReply(0, kWaitMs);
    assert.equal(reply.errno, 0, 'the WRITE succeeded');
    assert.equal(probe.closed, false, 'the client was not dropped');
    probe.sendRequest({ type: p.kCmdRead, cookie: 6n, offset, length: payload.length });
    const chunks = await probe.readReplyChunks(payload.length);
    assert.ok(assembleRead(chunks, BigInt(offset), payload.length).equals(payload), 'READ returns the WRITE');
  });

  test('bad limit values are refused with the option named', async () => {
    for (const [flag, value] of [['--max-connections', '0'], ['--handshake-timeout', '-1'], ['--payload-timeout', 'soon']]) {
      const result = await run(process.execPath, [enbdCli, 'serve', server.file, '--socket', dir.path('bad.sock'), flag as string, value as string]);
      assert.equal(result.status, 2, `${flag} ${value}: exit 2 (usage)\n${result.stderr}`);
      assert.match(result.stderr, new RegExp(flag as string));
    }
  });

  test('clients that go silent in a WRITE payload or a header are closed by the payload timeout', async () => {
    const payloadStaller = await open();
    await payloadStaller.negotiate();
    stallWrite(payloadStaller, 1n, kStallWriteBytes);
    const headerStaller = await open();
    await headerStaller.negotiate();
    headerStaller.write(NbdProbe.request({ type: p.kCmdRead, length: 4096 }).subarray(0, 10));
    assert.equal(await payloadStaller.waitClosed(kWaitMs), true, 'the payload staller was closed');
    assert.equal(await headerStaller.waitClosed(kWaitMs), true, 'the header staller was closed');
    assert.match(server.output(), /sent nothing for 1000 ms in the middle of a WRITE payload/);
    assert.match(server.output(), /sent nothing for 1000 ms in the middle of a request header/);
  });
});

describe('enbd mirror: stalled maximum-size WRITEs do not freeze other clients', { skip: skipUnlessTools('nbdinfo') }, () => {
  const kExportBytes = 64 * 1024 * 1024;
  const kVictimOffset = 48 * 1024 * 1024;
  let dir: Scratch;
  let mirror: MirrorProcess;
  let control: ControlClient;
  const legPaths: string[] = [];
  const probes: NbdProbe[] = [];

  async function ringSlotsInUse(): Promise<number> {
    return (await control.call('status')).stats.ringSlotsInUse;
  }

  before(async () => {
    dir = scratch('enbd-abuse-mirror-');
    legPaths.push(sparseFile(dir.path('leg0.img'), kExportBytes), sparseFile(dir.path('leg1.img'), kExportBytes));
    // Default ring (256 x 256 KiB = 64 MiB), maximum payload 8 MiB (1/8 of the ring): eight
    // stalled 8 MiB WRITEs would hold every slot.
    mirror = await startMirror({
      legs: legPaths,
      socketPath: dir.path('m.sock'),
      args: [...limitArgs(kMirrorPayloadTimeoutMs), '--placement', 'inline'],
      logLevel: 'info',
    });
    control = await ControlClient.connect(`${dir.path('m.sock')}.ctl`);
  });

  after(async () => {
    for (const probe of probes.splice(0)) probe.destroy();
    control?.close();
    await mirror?.stop();
    await stopAllMirrors();
    dir?.cleanup();
  });

  test('an established client writes and reads 4 KiB while eight clients sit on 8 MiB WRITE payloads', async () => {
    const victim = await NbdClient.connect(mirror.uri);
    let finished = false;
    try {
      const stallers: NbdProbe[] = [];
      for (let index = 0; index < kMirrorStallers; index += 1) {
        const probe = await NbdProbe.connect({ path: dir.path('m.sock') });
        probes.push(probe);
        await probe.negotiate();
        stallWrite(probe, BigInt(index + 1), kMirrorStallWriteBytes);
        stallers.push(probe);
      }
      // At least one staller holds its 32 slots (8 MiB) before the victim asks for one.
      const deadline = Date.now() + kWaitMs;
      while ((await ringSlotsInUse()) < 32) {
        assert.ok(Date.now() < deadline, 'a stalled WRITE took its ring slots');
        await sleep(20);
      }
      const data = randomBytes(4096);
      await within('the 4 KiB WRITE', kWaitMs, victim.write(kVictimOffset, data));
      const back = await within('the 4 KiB READ', kWaitMs, victim.read(kVictimOffset, 4096));
      assert.ok(back.equals(data), 'the victim reads back what it wrote');
      // It finished while every staller was still connected: they did not have to be dropped.
      for (const [index, probe] of stallers.entries()) {
        assert.equal(probe.closed, false, `staller ${index} was still connected when the victim finished`);
      }
      for (const [index, probe] of stallers.entries()) {
        assert.equal(await probe.waitClosed(kWaitMs * 2), true, `staller ${index} was closed by the payload timeout`);
      }
      // Their slots were released, and the victim's connection still works.
      const released = Date.now() + kWaitMs;
      while ((await ringSlotsInUse()) !== 0) {
        assert.ok(Date.now() < released, 'every ring slot was released');
        await sleep(20);
      }
      const again = randomBytes(4096);
      await within('a WRITE after the stallers left', kWaitMs, victim.write(kVictimOffset, again));
      assert.ok((await victim.read(kVictimOffset, 4096)).equals(again));
      await victim.flush();
      for (const path of legPaths) assert.ok(readRange(path, kVictimOffset, 4096).equals(again), `${path} holds the write`);
      assert.match(mirror.stderr(), /sent nothing for 2000 ms in the middle of a WRITE payload/);
      finished = true;
    } finally {
      // A frozen server would leave the victim's requests hanging: drop it instead of draining.
      if (finished) await victim.close();
      else victim.destroy();
    }
  });

  test('a client that pipelines large READs and never reads the replies keeps to its share', async () => {
    const victim = await NbdClient.connect(mirror.uri);
    let finished = false;
    try {
      const hog = await NbdProbe.connect({ path: dir.path('m.sock') });
      probes.push(hog);
      await hog.negotiate();
      // 64 x 2 MiB = 128 MiB of replies the hog never reads: each holds its slots until sent.
      for (let index = 0; index < 64; index += 1) {
        hog.sendRequest({ type: p.kCmdRead, cookie: BigInt(index + 1), offset: index * 2 * 1024 * 1024 % kExportBytes, length: 2 * 1024 * 1024 });
      }
      const deadline = Date.now() + kWaitMs;
      while ((await ringSlotsInUse()) < 64) {
        assert.ok(Date.now() < deadline, 'the hog holds ring slots');
        await sleep(20);
      }
      const data = randomBytes(4096);
      await within('the 4 KiB WRITE', kWaitMs, victim.write(kVictimOffset, data));
      assert.ok((await within('the 4 KiB READ', kWaitMs, victim.read(kVictimOffset, 4096))).equals(data));
      assert.ok((await ringSlotsInUse()) < 256, 'the hog did not take the whole ring');
      assert.equal(hog.closed, false, 'the hog was not dropped for it');
      hog.destroy();
      const released = Date.now() + kWaitMs;
      while ((await ringSlotsInUse()) !== 0) {
        assert.ok(Date.now() < released, 'the hog\'s slots were released once it left');
        await sleep(20);
      }
      finished = true;
    } finally {
      if (finished) await victim.close();
      else victim.destroy();
    }
  });
});
