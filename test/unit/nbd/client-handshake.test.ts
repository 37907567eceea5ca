/**
 * Client handshake driver against a scripted fake server: the happy path, every fallback
 * (no structured replies, GO unsupported -> EXPORT_NAME, non-fixed newstyle), and every
 * refusal or malformed answer turning into ENBD_ERR_HANDSHAKE with a clear message.
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EnbdError } from '../../../src/core/errors.js';
import {
  encodeInfoRequest,
  encodeMetaContextRequest,
  negotiateClient,
  type HandshakeIo,
  type HandshakeOptions,
} from '../../../src/nbd/client/client-handshake.js';
import {
  kFlagFixedNewstyle,
  kFlagNoZeroes,
  kIHaveOptHigh,
  kIHaveOptLow,
  kInfoBlockSize,
  kInfoDescription,
  kInfoExport,
  kInfoName,
  kNbdMagicHigh,
  kNbdMagicLow,
  kOptExportName,
  kOptGo,
  kOptSetMetaContext,
  kOptStructuredReply,
  kRepAck,
  kRepErrPolicy,
  kRepErrUnknown,
  kRepErrUnsup,
  kRepInfo,
  kRepMetaContext,
} from '../../../src/nbd/protocol.js';
import { optionReply as reply } from '../../helpers/nbd-wire.js';

type Answer = Buffer[] | 'close';

/** Server side of a handshake, answering each option from a script. */
class ScriptedServer implements HandshakeIo {
  clientFlags = -1;
  readonly options: { option: number; data: Buffer }[] = [];
  private inbound: Buffer;
  private closed = false;

  constructor(
    greeting: Buffer,
    private readonly answer: (option: number, data: Buffer) => Answer,
  ) {
    this.inbound = greeting;
  }

  async read(lengthBytes: number): Promise<Buffer> {
    if (this.inbound.length < lengthBytes) {
      throw new EnbdError('ENBD_ERR_HANDSHAKE', this.closed ? 'closed' : `client waits for ${lengthBytes} bytes the script never sends`);
    }
    const data = this.inbound.subarray(0, lengthBytes);
    this.inbound = this.inbound.subarray(lengthBytes);
    return data;
  }

  write(data: Uint8Array): void {
    const message = Buffer.from(data);
    if (this.clientFlags < 0) {
      assert.equal(message.length, 4);
      this.clientFlags = message.readUInt32BE(0);
      return;
    }
    assert.equal(message.readUInt32BE(0), kIHaveOptHigh);
    assert.equal(message.readUInt32BE(4), kIHaveOptLow);
    const option = message.readUInt32BE(8);
    const dataBytes = message.readUInt32BE(12);
    assert.equal(message.length, 16 + dataBytes);
    const optionData = message.subarray(16);
    this.options.push({ option, data: optionData });
    const answer = this.answer(option, optionData);
    if (answer === 'close') this.closed = true;
    else this.inbound = Buffer.concat([this.inbound, ...answer]);
  }
}

function greeting(flags: number): Buffer {
  const bytes = Buffer.alloc(18);
  bytes.writeUInt32BE(kNbdMagicHigh, 0);
  bytes.writeUInt32BE(kNbdMagicLow, 4);
  bytes.writeUInt32BE(kIHaveOptHigh, 8);
  bytes.writeUInt32BE(kIHaveOptLow, 12);
  bytes.writeUInt16BE(flags, 16);
  return bytes;
}

function infoExport(sizeBytes: number, flags: number): Buffer {
  const payload = Buffer.alloc(12);
  payload.writeUInt16BE(kInfoExport, 0);
  payload.writeUInt32BE(Math.floor(sizeBytes / 2 ** 32), 2);
  payload.writeUInt32BE(sizeBytes >>> 0, 6);
  payload.writeUInt16BE(flags, 10);
  return reply(kOptGo, kRepInfo, payload);
}

function infoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const payload = Buffer.alloc(14);
  payload.writeUInt16BE(kInfoBlockSize, 0);
  payload.writeUInt32BE(minimum, 2);
  payload.writeUInt32BE(preferred, 6);
  payload.writeUInt32BE(maximum, 10);
  return reply(kOptGo, kRepInfo, payload);
}

function infoString(type: number, text: string): Buffer {
  const payload = Buffer.concat([Buffer.from([type >> 8, type & 0xff]), Buffer.from(text)]);
  return reply(kOptGo, kRepInfo, payload);
}

function metaContext(id: number, name: string): Buffer {
  const payload = Buffer.alloc(4);
  payload.writeUInt32BE(id, 0);
  return reply(kOptSetMetaContext, kRepMetaContext, Buffer.concat([payload, Buffer.from(name)]));
}

function exportNameReply(sizeBytes: number, flags: number, zeroes: boolean): Buffer {
  const bytes = Buffer.alloc(10 + (zeroes ? 124 : 0));
  bytes.writeUInt32BE(Math.floor(sizeBytes / 2 ** 32), 0);
  bytes.writeUInt32BE(sizeBytes >>> 0, 4);
  bytes.writeUInt16BE(flags, 8);
  return bytes;
}

const options: HandshakeOptions = { exportName: 'disk', structuredReplies: true, blockStatus: true, serverName: 'unix:/x.sock' };
const kBothFlags = kFlagFixedNewstyle | kFlagNoZeroes;

/** A full-featured server: SR, base:allocation as context 7, GO with all infos. */
function fullServer(option: number): Answer {
  if (option === kOptStructuredReply) return [reply(option, kRepAck)];
  if (option === kOptSetMetaContext) return [metaContext(7, 'base:allocation'), reply(option, kRepAck)];
  if (option === kOptGo) {
    return [
      infoExport(2 ** 40, 0x0ded),
      infoString(kInfoName, 'canonical'),
      infoString(kInfoDescription, 'a test disk'),
      infoBlockSize(512, 4096, 1 << 20),
      reply(option, kRepAck),
    ];
  }
  return [reply(option, kRepErrUnsup)];
}

async function rejects(server: ScriptedServer, message: RegExp, handshake = options): Promise<void> {
  await assert.rejects(negotiateClient(server, handshake), (error: unknown) => {
    assert.ok(error instanceof EnbdError, String(error));
    assert.equal(error.code, 'ENBD_ERR_HANDSHAKE');
    assert.match(error.message, message);
    return true;
  });
}

test('full negotiation: SR, base:allocation, GO with every info', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), fullServer);
  const result = await negotiateClient(server, options);
  assert.equal(server.clientFlags, 3);
  assert.deepEqual(
    server.options.map(({ option }) => option),
    [kOptStructuredReply, kOptSetMetaContext, kOptGo],
  );
  assert.deepEqual(server.options[1]?.data, encodeMetaContextRequest('disk', ['base:allocation']));
  assert.deepEqual(server.options[2]?.data, encodeInfoRequest('disk', [kInfoExport, kInfoName, kInfoDescription, kInfoBlockSize]));
  assert.deepEqual(result, {
    sizeBytes: 2 ** 40,
    transmissionFlags: 0x0ded,
    handshakeFlags: 3,
    structuredReplies: true,
    baseAllocationContextId: 7,
    blockSizes: { minimumBytes: 512, preferredBytes: 4096, maximumBytes: 1 << 20 },
    description: 'a test disk',
    canonicalName: 'canonical',
    usedExportNameFallback: false,
  });
});

test('info request encoding is name length, name, count, types', () => {
  assert.deepEqual([...encodeInfoRequest('ab', [0, 3])], [0, 0, 0, 2, 0x61, 0x62, 0, 2, 0, 0, 0, 3]);
});

test('client echoes only offered handshake flags', async () => {
  const server = new ScriptedServer(greeting(kFlagFixedNewstyle | 0x8000), fullServer);
  await negotiateClient(server, options);
  assert.equal(server.clientFlags, 1);
});

test('structured replies refused: no meta context is asked, GO still works', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), (option) =>
    option === kOptStructuredReply ? [reply(option, kRepErrUnsup, Buffer.from('no'))] : fullServer(option),
  );
  const result = await negotiateClient(server, options);
  assert.equal(result.structuredReplies, false);
  assert.equal(result.baseAllocationContextId, null);
  assert.deepEqual(server.options.map(({ option }) => option), [kOptStructuredReply, kOptGo]);
});

test('structuredReplies: false never sends the option', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), fullServer);
  const result = await negotiateClient(server, { ...options, structuredReplies: false });
  assert.equal(result.structuredReplies, false);
  assert.deepEqual(server.options.map(({ option }) => option), [kOptGo]);
});

test('meta context refused: block status is off, the handshake goes on', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), (option) =>
    option === kOptSetMetaContext ? [reply(option, kRepErrPolicy)] : fullServer(option),
  );
  const result = await negotiateClient(server, options);
  assert.equal(result.baseAllocationContextId, null);
  assert.equal(result.structuredReplies, true);
});

for (const zeroes of [true, false]) {
  test(`GO unsupported -> EXPORT_NAME fallback (${zeroes ? 'with' : 'without'} 124 zero bytes)`, async () => {
    const server = new ScriptedServer(greeting(zeroes ? kFlagFixedNewstyle : kBothFlags), (option) =>
      option === kOptGo ? [reply(option, kRepErrUnsup)] : option === kOptExportName ? [exportNameReply(1 << 20, 0x3, zeroes)] : fullServer(option),
    );
    const result = await negotiateClient(server, options);
    assert.equal(result.usedExportNameFallback, true);
    assert.equal(result.sizeBytes, 1 << 20);
    assert.equal(result.transmissionFlags, 0x3);
    assert.equal(result.blockSizes, null);
    assert.deepEqual(server.options.at(-1), { option: kOptExportName, data: Buffer.from('disk') });
  });
}

test('non-fixed newstyle server: only EXPORT_NAME is sent', async () => {
  const server = new ScriptedServer(greeting(kFlagNoZeroes), (option) =>
    option === kOptExportName ? [exportNameReply(4096, 1, false)] : 'close',
  );
  const result = await negotiateClient(server, options);
  assert.equal(server.clientFlags, kFlagNoZeroes);
  assert.deepEqual(server.options.map(({ option }) => option), [kOptExportName]);
  assert.equal(result.sizeBytes, 4096);
  assert.equal(result.structuredReplies, false);
});

test('unknown export on GO -> ENBD_ERR_HANDSHAKE naming the export and server', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), (option) =>
    option === kOptGo ? [reply(option, kRepErrUnknown, Buffer.from('no such export'))] : fullServer(option),
  );
  await rejects(server, /unix:\/x\.sock has no export 'disk': no such export/);
});

test('unknown export on EXPORT_NAME (server closes) -> ENBD_ERR_HANDSHAKE', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), (option) =>
    option === kOptGo ? [reply(option, kRepErrUnsup)] : option === kOptExportName ? 'close' : fullServer(option),
  );
  await rejects(server, /has no export 'disk'.*closed the connection after NBD_OPT_EXPORT_NAME/);
});

test('GO refused by policy -> ENBD_ERR_HANDSHAKE with the reply name and text', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), (option) =>
    option === kOptGo ? [reply(option, kRepErrPolicy, Buffer.from('go away'))] : fullServer(option),
  );
  await rejects(server, /refused export 'disk': ERR_POLICY \(go away\)/);
});

test('bad greeting magic', async () => {
  const bad = greeting(kBothFlags);
  bad[0] = 0;
  await rejects(new ScriptedServer(bad, fullServer), /not an NBD server/);
});

test('oldstyle greeting is refused', async () => {
  const old = greeting(0);
  old.writeUInt32BE(0x00004202, 8);
  old.writeUInt32BE(0x81861253, 12);
  await rejects(new ScriptedServer(old, fullServer), /oldstyle/);
});

test('option reply with a bad magic', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), (option) => {
    const answer = reply(option, kRepAck);
    answer[0] = 0xff;
    return [answer];
  });
  await rejects(server, /bad magic/);
});

test('reply naming another option', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), () => [reply(99, kRepAck)]);
  await rejects(server, /answered option 99 while option 8 was pending/);
});

test('GO acknowledged without NBD_INFO_EXPORT', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), (option) => (option === kOptGo ? [reply(option, kRepAck)] : fullServer(option)));
  await rejects(server, /without NBD_INFO_EXPORT/);
});

const badBlockSizes: [number, number, number, RegExp][] = [
  [3, 4096, 1 << 20, /minimum/],
  [1 << 17, 1 << 17, 1 << 20, /minimum/],
  [512, 256, 1 << 20, /preferred/],
  [512, 4096, 100, /maximum/],
];
for (const [minimum, preferred, maximum, message] of badBlockSizes) {
  test(`invalid block sizes ${minimum}/${preferred}/${maximum}`, async () => {
    const server = new ScriptedServer(greeting(kBothFlags), (option) =>
      option === kOptGo ? [infoExport(4096, 1), infoBlockSize(minimum, preferred, maximum), reply(option, kRepAck)] : fullServer(option),
    );
    await rejects(server, message);
  });
}

test('export size of 2^53 or more is refused', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), (option) =>
    option === kOptGo ? [infoExport(2 ** 53, 1), reply(option, kRepAck)] : fullServer(option),
  );
  await rejects(server, /2\^53/);
});

test('oversized option reply is refused before reading it', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), (option) => {
    const header = reply(option, kRepAck);
    header.writeUInt32BE(10 * 1024 * 1024, 16);
    return [header];
  });
  await rejects(server, /option reply \(limit/);
});

test('malformed NBD_INFO_EXPORT', async () => {
  const server = new ScriptedServer(greeting(kBothFlags), (option) =>
    option === kOptGo ? [reply(option, kRepInfo, Buffer.from([0, 0, 1, 2]))] : fullServer(option),
  );
  await rejects(server, /malformed NBD_INFO_EXPORT/);
});
