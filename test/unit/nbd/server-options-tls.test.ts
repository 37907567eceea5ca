/**
 * OptionNegotiator and TLS, driven byte by byte with no socket: STARTTLS per mode, the
 * ERR_TLS_REQD wall of `require`, state forgotten after the upgrade, bytes after STARTTLS.
 * Threads: test process main thread.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { OptionNegotiator, type ExportDescriptor, type NegotiatorTlsMode } from '../../../src/nbd/server/server-options.js';
import * as p from '../../../src/nbd/protocol.js';

const kExport: ExportDescriptor = {
  name: 'disk', description: 'd', sizeBytes: 1 << 20, transmissionFlags: p.kTxFlagHasFlags | p.kTxFlagSendFlush | p.kTxFlagSendDf,
  minimumBlockBytes: 1, preferredBlockBytes: 4096, maximumPayloadBytes: 1 << 20,
};

interface Harness {
  negotiator: OptionNegotiator;
  replies: Array<{ option: number; type: number; data: Buffer }>;
  closed: Array<string | null>;
  startTls: number;
  transmission: Array<{ structuredReplies: boolean }>;
}

function harness(mode: NegotiatorTlsMode): Harness {
  const h: Harness = { negotiator: undefined as unknown as OptionNegotiator, replies: [], closed: [], startTls: 0, transmission: [] };
  h.negotiator = new OptionNegotiator(kExport, {
    send: (bytes) => {
      if (bytes.length >= 20 && bytes.readUInt32BE(0) === p.kOptionReplyMagicHigh) {
        h.replies.push({ option: bytes.readUInt32BE(8), type: bytes.readUInt32BE(12), data: bytes.subarray(20) });
      }
    },
    onTransmission: (state) => h.transmission.push({ structuredReplies: state.structuredReplies }),
    onClose: (reason) => h.closed.push(reason),
    onStartTls: () => (h.startTls += 1),
  }, mode);
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(p.kClientFlagFixedNewstyle | p.kClientFlagNoZeroes, 0);
  h.negotiator.feed(flags);
  return h;
}

function option(code: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(16);
  header.writeUInt32BE(p.kIHaveOptHigh, 0);
  header.writeUInt32BE(p.kIHaveOptLow, 4);
  header.writeUInt32BE(code, 8);
  header.writeUInt32BE(data.length, 12);
  return Buffer.concat([header, data]);
}

function goData(name: string): Buffer {
  const bytes = Buffer.alloc(6 + name.length);
  bytes.writeUInt32BE(name.length, 0);
  bytes.write(name, 4);
  return bytes;
}

test('mode off: STARTTLS gets ERR_UNSUP and nothing is upgraded', () => {
  const h = harness('off');
  h.negotiator.feed(option(p.kOptStartTls));
  assert.deepEqual(h.replies.map((r) => r.type), [p.kRepErrUnsup]);
  assert.equal(h.startTls, 0);
});

test('mode require: options before TLS get ERR_TLS_REQD; EXPORT_NAME closes; GO works after TLS', () => {
  const h = harness('require');
  h.negotiator.feed(Buffer.concat([option(p.kOptList), option(p.kOptGo, goData('disk')), option(p.kOptStructuredReply)]));
  assert.deepEqual(h.replies.map((r) => r.type), [p.kRepErrTlsReqd, p.kRepErrTlsReqd, p.kRepErrTlsReqd]);
  assert.equal(h.transmission.length, 0);
  h.negotiator.feed(option(p.kOptStartTls));
  assert.equal(h.replies.at(-1)?.type, p.kRepAck);
  assert.equal(h.startTls, 1);
  h.negotiator.tlsEstablished();
  assert.equal(h.negotiator.tls, true);
  h.negotiator.feed(option(p.kOptStartTls));
  assert.equal(h.replies.at(-1)?.type, p.kRepErrInvalid, 'a second STARTTLS is invalid');
  h.negotiator.feed(option(p.kOptGo, goData('disk')));
  assert.equal(h.transmission.length, 1);
  assert.deepEqual(h.closed, []);

  const e = harness('require');
  e.negotiator.feed(option(p.kOptExportName, Buffer.from('disk')));
  assert.equal(e.closed.length, 1);
  assert.equal(e.replies.length, 0);
});

test('STARTTLS forgets structured replies negotiated before it', () => {
  const h = harness('on');
  h.negotiator.feed(Buffer.concat([option(p.kOptStructuredReply), option(p.kOptStartTls)]));
  assert.deepEqual(h.replies.map((r) => r.type), [p.kRepAck, p.kRepAck]);
  h.negotiator.tlsEstablished();
  h.negotiator.feed(option(p.kOptGo, goData('')));
  assert.deepEqual(h.transmission, [{ structuredReplies: false }]);
});

test('bytes after STARTTLS in the same chunk close the connection; during the handshake too', () => {
  const h = harness('on');
  h.negotiator.feed(Buffer.concat([option(p.kOptStartTls), Buffer.from([0x16, 0x03, 0x01])]));
  assert.equal(h.startTls, 0);
  assert.equal(h.closed.length, 1);
  assert.match(String(h.closed[0]), /after STARTTLS/);
  const later = harness('on');
  later.negotiator.feed(option(p.kOptStartTls));
  assert.equal(later.startTls, 1);
  later.negotiator.feed(Buffer.from('x'));
  assert.equal(later.closed.length, 1);
});

test('fuzz: random option streams around STARTTLS never throw and always end in one verdict or wait', () => {
  let seed = 12345;
  const random = (n: number): number => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
  const codes = [p.kOptList, p.kOptStartTls, p.kOptInfo, p.kOptGo, p.kOptStructuredReply, p.kOptListMetaContext, p.kOptSetMetaContext, 99];
  for (let round = 0; round < 500; round += 1) {
    const mode = (['off', 'on', 'require'] as const)[random(3)] as NegotiatorTlsMode;
    const h = harness(mode);
    for (let step = 0; step < 8 && h.closed.length === 0 && h.transmission.length === 0; step += 1) {
      if (h.startTls > 0 && !h.negotiator.tls) {
        h.negotiator.tlsEstablished();
        continue;
      }
      const code = codes[random(codes.length)] as number;
      const data = code === p.kOptGo || code === p.kOptInfo ? goData(random(2) === 0 ? '' : 'disk') : random(4) === 0 ? Buffer.from('zz') : Buffer.alloc(0);
      h.negotiator.feed(option(code, data));
      if (mode === 'require' && !h.negotiator.tls && h.startTls === 0) {
        assert.equal(h.transmission.length, 0, 'no transmission before TLS under require');
        for (const reply of h.replies) assert.ok(reply.type === p.kRepErrTlsReqd || reply.option === p.kOptStartTls, 'only ERR_TLS_REQD or STARTTLS answers before TLS');
      }
    }
    assert.ok(h.closed.length <= 1);
  }
});
