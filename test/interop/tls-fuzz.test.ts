/**
 * Fuzzing the option phase across the STARTTLS upgrade against `enbd serve --tls require`:
 * random options (random codes, lengths and data) before TLS must each get exactly one error
 * reply (ERR_TLS_REQD, or ERR_INVALID for STARTTLS with data) and never the export size; then
 * STARTTLS, a real TLS handshake (node:tls client), random options inside TLS, and GO must
 * reach the transmission phase with the right size. The server stays up throughout.
 * Threads: test process main thread; the server is a child process.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, openSync, readFileSync } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { join } from 'node:path';
import { scratch, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools, startServerUnderTest, type ServerUnderTest } from '../helpers/serve.js';
import { makePki } from '../helpers/pki.js';
import * as p from '../../src/nbd/protocol.js';

const kSizeBytes = 8 * 1024 * 1024;
const kRounds = Number(process.env['ENBD_TLS_FUZZ_ROUNDS'] ?? 40);

/** Byte reader over any stream socket (plain or TLS), bounded waits. */
class Reader {
  private pending = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  private ended = false;
  constructor(readonly socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.pending = Buffer.concat([this.pending, chunk]);
      this.wake?.();
    });
    socket.on('error', () => undefined);
    socket.on('close', () => {
      this.ended = true;
      this.wake?.();
    });
  }
  detach(): void {
    this.socket.removeAllListeners('data');
  }
  get bufferedBytes(): number {
    return this.pending.length;
  }
  async read(length: number): Promise<Buffer> {
    const deadline = Date.now() + 10_000;
    while (this.pending.length < length) {
      if (this.ended) throw new Error(`closed with ${this.pending.length}/${length} bytes`);
      if (Date.now() > deadline) throw new Error(`no ${length} bytes in time`);
      await new Promise<void>((resolveWait) => {
        const timer = setTimeout(resolveWait, 200);
        this.wake = () => {
          clearTimeout(timer);
          this.wake = null;
          resolveWait();
        };
      });
    }
    const head = this.pending.subarray(0, length);
    this.pending = this.pending.subarray(length);
    return Buffer.from(head);
  }
  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const header = await this.read(20);
    assert.equal(header.readUInt32BE(0), p.kOptionReplyMagicHigh, 'option reply magic');
    const data = await this.read(header.readUInt32BE(16));
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data };
  }
  /** Replies up to the final one (ACK or error). */
  async optionReplies(): Promise<Array<{ option: number; type: number; data: Buffer }>> {
    const replies = [];
    for (;;) {
      const reply = await this.optionReply();
      replies.push(reply);
      if (reply.type === p.kRepAck || (reply.type & 0x8000_0000) !== 0) return replies;
    }
  }
}

function option(code: number, data: Buffer): Buffer {
  const header = Buffer.alloc(16);
  header.writeUInt32BE(p.kIHaveOptHigh, 0);
  header.writeUInt32BE(p.kIHaveOptLow, 4);
  header.writeUInt32BE(code >>> 0, 8);
  header.writeUInt32BE(data.length, 12);
  return Buffer.concat([header, data]);
}

function goData(name: string, infos: number[]): Buffer {
  const nameBytes = Buffer.from(name);
  const data = Buffer.alloc(6 + nameBytes.length + 2 * infos.length);
  data.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(data, 4);
  data.writeUInt16BE(infos.length, 4 + nameBytes.length);
  infos.forEach((info, index) => data.writeUInt16BE(info, 6 + nameBytes.length + 2 * index));
  return data;
}

describe('fuzz: option phase across STARTTLS', { skip: skipUnlessTools('openssl'), timeout: 60_000 }, () => {
  let dir: Scratch;
  let pki: string;
  let server: ServerUnderTest;
  let seed = 0x5eed;
  const random = (n: number): number => {
    seed = (Math.imul(seed, 1103515245) + 12345) & 0x7fffffff;
    return seed % n;
  };
  const codes = [p.kOptList, p.kOptInfo, p.kOptGo, p.kOptStructuredReply, p.kOptListMetaContext, p.kOptSetMetaContext, p.kOptStartTls, 13, 99, 0x7fff_ffff];
  function randomOption(allowStartTls: boolean): { code: number; data: Buffer } {
    let code = codes[random(codes.length)] as number;
    if (code === p.kOptStartTls && !allowStartTls) code = p.kOptList;
    const kind = random(3);
    const data = kind === 0 ? Buffer.alloc(0) : kind === 1 ? goData(random(2) === 0 ? '' : 'nope', [random(4)]) : Buffer.from(Array.from({ length: random(40) }, () => random(256)));
    return { code, data };
  }

  before(async () => {
    dir = scratch('enbd-tls-fuzz-');
    pki = makePki(dir.path('pki'));
    const fd = openSync(dir.path('disk.img'), 'w');
    ftruncateSync(fd, kSizeBytes);
    closeSync(fd);
    server = await startServerUnderTest({ kind: 'enbd', file: dir.path('disk.img'), socketPath: dir.path('f.sock'), args: ['--tls', 'require', '--tls-certificates', pki] });
  });
  after(async () => {
    await server.stop();
    dir.cleanup();
  });

  test(`${kRounds} random sessions: nothing leaks before TLS, GO works after it`, async () => {
    const size = Buffer.alloc(8);
    size.writeUInt32BE(kSizeBytes, 4);
    const ca = readFileSync(join(pki, 'ca-cert.pem'));
    for (let round = 0; round < kRounds; round += 1) {
      const plain = netConnect(dir.path('f.sock'));
      const reader = new Reader(plain);
      try {
        await reader.read(18);
        const flags = Buffer.alloc(4);
        flags.writeUInt32BE(3, 0);
        plain.write(flags);
        for (let step = random(6); step > 0; step -= 1) {
          const { code, data } = randomOption(true);
          if (code === p.kOptStartTls && data.length === 0) continue; // the upgrade comes below
          plain.write(option(code, data));
          const replies = await reader.optionReplies();
          assert.equal(replies.length, 1, `round ${round}: one reply to option ${code}`);
          const expected = code === p.kOptStartTls ? p.kRepErrInvalid : p.kRepErrTlsReqd;
          assert.equal(replies[0]?.type, expected, `round ${round}: option ${code} answered ${replies[0]?.type.toString(16)}`);
          assert.equal(replies[0]?.data.indexOf(size), -1, 'no export size before TLS');
        }
        plain.write(option(p.kOptStartTls, Buffer.alloc(0)));
        const ack = await reader.optionReplies();
        assert.equal(ack[0]?.type, p.kRepAck);
        assert.equal(reader.bufferedBytes, 0);
        reader.detach();
        const secured = tlsConnect({ socket: plain, ca, servername: 'localhost' });
        await new Promise<void>((resolveTls, reject) => {
          secured.once('secureConnect', resolveTls);
          secured.once('error', reject);
        });
        const inner = new Reader(secured);
        for (let step = random(5); step > 0; step -= 1) {
          const { code, data } = randomOption(false);
          secured.write(option(code, data));
          if (code === p.kOptGo) {
            const replies = await inner.optionReplies();
            const final = replies.at(-1);
            if (final?.type === p.kRepAck) {
              secured.destroy();
              break;
            }
            continue;
          }
          const replies = await inner.optionReplies();
          assert.notEqual(replies.at(-1)?.type, p.kRepErrTlsReqd, 'no ERR_TLS_REQD inside TLS');
        }
        if (secured.destroyed) continue;
        secured.write(option(p.kOptGo, goData('', [])));
        const replies = await inner.optionReplies();
        assert.equal(replies.at(-1)?.type, p.kRepAck, `round ${round}: GO inside TLS`);
        const info = replies.find((reply) => reply.type === p.kRepInfo && reply.data.readUInt16BE(0) === p.kInfoExport);
        assert.ok(info !== undefined, 'INFO_EXPORT');
        assert.equal(info.data.readUInt32BE(6), kSizeBytes);
        secured.destroy();
      } finally {
        plain.destroy();
      }
    }
    assert.equal(server.alive(), true);
  });
});
