/**
 * TLS on the export (`enbd serve` / `enbd mirror` with --tls on|require): real clients
 * (nbdinfo, nbdsh, nbdcopy from libnbd/GnuTLS; qemu-io with tls-creds-x509) over
 * nbds+unix:// with certificates made by openssl in the test, and the refusals: a plain client
 * against `require` learns nothing (raw-socket probe), a wrong CA fails, a missing client
 * certificate fails with --tls-verify-peer, bytes after STARTTLS close the connection, and a
 * failed handshake never takes the server down.
 * Threads: test process main thread; servers are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, mkdirSync, openSync, copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { scratch, type Scratch } from '../helpers/tools.js';
import { run, runOk, skipUnlessTools, startServerUnderTest, type ServerUnderTest } from '../helpers/serve.js';
import { NbdProbe } from '../helpers/nbd-probe.js';
import { makePki } from '../helpers/pki.js';
import { startMirrorArgs, stopAllMirrors } from '../helpers/mirror.js';
import * as p from '../../src/nbd/protocol.js';
import { NbdClient } from '../../src/nbd/client/client.js';

const kSizeBytes = 16 * 1024 * 1024;
const skip = skipUnlessTools('openssl', 'nbdinfo', 'nbdsh', 'nbdcopy', 'qemu-io');

function tlsUri(socketPath: string, pki: string, extra = ''): string {
  return `nbds+unix:///?socket=${socketPath}&tls-certificates=${pki}${extra}`;
}

function makeFile(path: string, sizeBytes = kSizeBytes): void {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, sizeBytes);
  closeSync(fd);
}

/** nbdsh script run with local-file URI parameters allowed (tls-certificates is one). */
async function nbdsh(uri: string, script: string): Promise<{ status: number | null; stdout: string; stderr: string }> {
  const code = `h = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(${JSON.stringify(uri)})\n${script}\n`;
  return await run('nbdsh', ['-n', '-c', code]);
}

function optionBytes(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(16);
  header.writeUInt32BE(p.kIHaveOptHigh, 0);
  header.writeUInt32BE(p.kIHaveOptLow, 4);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(data.length, 12);
  return Buffer.concat([header, data]);
}

describe('enbd serve --tls require', { skip }, () => {
  let dir: Scratch;
  let pki: string;
  let server: ServerUnderTest;
  const socketPath = (): string => dir.path('tls.sock');

  before(async () => {
    dir = scratch('enbd-tls-');
    pki = makePki(dir.path('pki'));
    makeFile(dir.path('disk.img'));
    server = await startServerUnderTest({
      kind: 'enbd',
      file: dir.path('disk.img'),
      socketPath: socketPath(),
      args: ['--tls', 'require', '--tls-certificates', pki],
    });
  });
  after(async () => {
    await server.stop();
    dir.cleanup();
  });

  test('nbdinfo negotiates TLS and sees the export', async () => {
    const result = await runOk('nbdinfo', ['--json', tlsUri(socketPath(), pki)]);
    const info = JSON.parse(result.stdout) as { TLS: boolean; exports: Array<{ 'export-size': number }> };
    assert.equal(info.TLS, true);
    assert.equal(info.exports[0]?.['export-size'], kSizeBytes);
  });

  test('nbdsh writes and reads back over TLS', async () => {
    const result = await nbdsh(tlsUri(socketPath(), pki), [
      'assert h.get_tls_negotiated()',
      'h.pwrite(b"\\x5a" * 65536, 1048576, nbd.CMD_FLAG_FUA)',
      'assert h.pread(65536, 1048576) == b"\\x5a" * 65536',
      'h.flush()',
      'print("ok")',
    ].join('\n'));
    assert.equal(result.status, 0, result.stderr);
    assert.match(result.stdout, /ok/);
    const onDisk = readFileSync(dir.path('disk.img')).subarray(1048576, 1048576 + 65536);
    assert.ok(onDisk.every((byte) => byte === 0x5a), 'the bytes reached the file');
  });

  test('nbdcopy copies in and out over TLS, bytes equal', async () => {
    const data = randomBytes(4 * 1024 * 1024);
    writeFileSync(dir.path('src.img'), data);
    await runOk('nbdcopy', [dir.path('src.img'), tlsUri(socketPath(), pki)]);
    await runOk('nbdcopy', [tlsUri(socketPath(), pki), dir.path('out.img')]);
    const out = readFileSync(dir.path('out.img'));
    assert.equal(out.length, kSizeBytes);
    assert.ok(out.subarray(0, data.length).equals(data), 'copied-out bytes equal the copied-in bytes');
  });

  test('qemu-io with tls-creds-x509 writes and verifies a pattern', async () => {
    const image = `driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=${socketPath()},file.tls-creds=tls0,file.tls-hostname=localhost`;
    const result = await run('qemu-io', [
      '--object', `tls-creds-x509,id=tls0,dir=${pki},endpoint=client`,
      '--image-opts', '-c', 'write -P 0x3c 8M 1M', '-c', 'read -P 0x3c 8M 1M', '-c', 'read -P 0x3d 8M 4k', image,
    ]);
    // the last read must fail its pattern check: proves qemu-io really compared bytes
    assert.equal(result.status, 1, `${result.stdout}\n${result.stderr}`);
    assert.match(result.stdout, /wrote 1048576\/1048576/);
    assert.match(result.stdout, /read 1048576\/1048576/);
    assert.match(result.stdout, /Pattern verification failed/);
    const onDisk = readFileSync(dir.path('disk.img')).subarray(8 * 1024 * 1024, 9 * 1024 * 1024);
    assert.ok(onDisk.every((byte) => byte === 0x3c));
  });

  test('a plain client is refused: nbdinfo fails, asking for TLS', async () => {
    const result = await run('nbdinfo', ['--size', `nbd+unix:///?socket=${socketPath()}`]);
    assert.notEqual(result.status, 0);
    assert.match(result.stderr, /TLS/);
    assert.doesNotMatch(result.stdout, /16777216/);
  });

  test('raw probe: every option but STARTTLS/ABORT gets ERR_TLS_REQD, nothing leaks', async () => {
    const probe = await NbdProbe.connect({ path: socketPath() });
    try {
      await probe.handshake();
      const size = Buffer.alloc(8);
      size.writeUInt32BE(kSizeBytes, 4);
      for (const [option, data] of [
        [p.kOptList, Buffer.alloc(0)],
        [p.kOptInfo, NbdProbe.infoData('', [p.kInfoName, p.kInfoDescription])],
        [p.kOptGo, NbdProbe.infoData('')],
        [p.kOptStructuredReply, Buffer.alloc(0)],
        [p.kOptListMetaContext, NbdProbe.metaContextData('', [])],
        [99, Buffer.from('abcd')],
      ] as const) {
        probe.sendOption(option, data);
        const replies = await probe.readOptionReplies();
        assert.equal(replies.length, 1, `option ${option}: one reply`);
        assert.equal(replies[0]?.option, option);
        assert.equal(replies[0]?.type, p.kRepErrTlsReqd, `option ${option}: ERR_TLS_REQD`);
        assert.equal(replies[0]?.data.indexOf(size), -1, 'no export size in the reply');
      }
      // EXPORT_NAME has no error reply: the server must close without answering.
      probe.sendOption(p.kOptExportName, Buffer.alloc(0));
      assert.equal(await probe.waitClosed(), true);
      assert.equal(probe.bufferedBytes, 0, 'no export information before the close');
    } finally {
      probe.destroy();
    }
  });

  test('STARTTLS with data gets ERR_INVALID; bytes after STARTTLS in the same read close', async () => {
    const probe = await NbdProbe.connect({ path: socketPath() });
    try {
      await probe.handshake();
      probe.sendOption(p.kOptStartTls, Buffer.from('x'));
      const invalid = await probe.readOptionReplies();
      assert.equal(invalid[0]?.type, p.kRepErrInvalid);
      // STARTTLS and a plain option in one write: a client must wait for the ACK first.
      probe.write(Buffer.concat([optionBytes(p.kOptStartTls), optionBytes(p.kOptList)]));
      assert.equal(await probe.waitClosed(), true, 'connection closed');
      // at most the ACK was sent, never a LIST answer
      if (probe.bufferedBytes > 0) {
        const reply = await probe.readOptionReply();
        assert.equal(reply.type, p.kRepAck);
        assert.equal(reply.option, p.kOptStartTls);
        assert.equal(probe.bufferedBytes, 0);
      }
    } finally {
      probe.destroy();
    }
  });

  test('garbage instead of a TLS hello closes that connection only', async () => {
    const probe = await NbdProbe.connect({ path: socketPath() });
    try {
      await probe.handshake();
      probe.sendOption(p.kOptStartTls);
      const ack = await probe.readOptionReplies();
      assert.equal(ack[0]?.type, p.kRepAck);
      probe.write(Buffer.from('this is not a TLS ClientHello, just plain garbage bytes\r\n'.repeat(4)));
      assert.equal(await probe.waitClosed(), true);
    } finally {
      probe.destroy();
    }
    const result = await runOk('nbdinfo', ['--size', tlsUri(socketPath(), pki)]);
    assert.equal(result.stdout.trim(), String(kSizeBytes));
  });

  // libnbd 1.14 over a Unix socket accepted a server certificate from an unknown CA (the same
  // against nbdkit), so the verifying client here is qemu-io, which checks CA and host name.
  test('a client trusting another CA, or expecting another host, fails; the server keeps serving', async () => {
    const other = makePki(dir.path('other-pki'));
    const client = dir.path('other-client');
    mkdirSync(client);
    copyFileSync(join(other, 'ca-cert.pem'), join(client, 'ca-cert.pem'));
    const qemu = async (credsDir: string, host: string): Promise<{ status: number | null; stdout: string; stderr: string }> =>
      await run('qemu-io', [
        '--object', `tls-creds-x509,id=tls0,dir=${credsDir},endpoint=client`, '--image-opts', '-c', 'read 0 4k',
        `driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=${socketPath()},file.tls-creds=tls0,file.tls-hostname=${host}`,
      ]);
    const wrongCa = await qemu(client, 'localhost');
    assert.notEqual(wrongCa.status, 0);
    assert.match(wrongCa.stderr, /issuer/i);
    const wrongHost = await qemu(pki, 'not-this-host');
    assert.notEqual(wrongHost.status, 0);
    assert.match(wrongHost.stderr, /hostname/i);
    const good = await qemu(pki, 'localhost');
    assert.equal(good.status, 0, good.stderr);
    assert.match(good.stdout, /read 4096\/4096/);
    const result = await runOk('nbdinfo', ['--size', tlsUri(socketPath(), pki)]);
    assert.equal(result.stdout.trim(), String(kSizeBytes));
    assert.equal(server.alive(), true);
  });
});

describe('enbd serve --tls on and --tls-verify-peer', { skip }, () => {
  let dir: Scratch;
  let pki: string;
  before(() => {
    dir = scratch('enbd-tls-on-');
    pki = makePki(dir.path('pki'));
    makeFile(dir.path('disk.img'));
  });
  after(() => dir.cleanup());

  test('--tls on serves plain and TLS clients', async () => {
    const socketPath = dir.path('on.sock');
    const server = await startServerUnderTest({ kind: 'enbd', file: dir.path('disk.img'), socketPath, args: ['--tls', 'on', '--tls-certificates', pki] });
    try {
      const plain = JSON.parse((await runOk('nbdinfo', ['--json', `nbd+unix:///?socket=${socketPath}`])).stdout) as { TLS: boolean };
      assert.equal(plain.TLS, false);
      const secured = JSON.parse((await runOk('nbdinfo', ['--json', tlsUri(socketPath, pki)])).stdout) as { TLS: boolean };
      assert.equal(secured.TLS, true);
    } finally {
      await server.stop();
    }
  });

  test('--receive direct (the default) with --tls on: TLS and plain connections stream WRITE payloads, with a log line; bytes equal', async () => {
    const socketPath = dir.path('direct.sock');
    const server = await startServerUnderTest({
      kind: 'enbd', file: dir.path('disk.img'), socketPath, args: ['--tls', 'on', '--tls-certificates', pki, '--receive', 'direct', '--log-level', 'info'],
    });
    try {
      const data = randomBytes(6 * 1024 * 1024);
      writeFileSync(dir.path('direct-src.img'), data);
      // 1 MiB requests over TLS: large payloads, the path direct receive would take
      await runOk('nbdcopy', ['--request-size=1048576', dir.path('direct-src.img'), tlsUri(socketPath, pki)]);
      await runOk('nbdcopy', [`nbd+unix:///?socket=${socketPath}`, dir.path('direct-out.img')]);
      const out = readFileSync(dir.path('direct-out.img'));
      assert.ok(out.subarray(0, data.length).equals(data), 'bytes written over TLS read back over plain');
      const plain = randomBytes(2 * 1024 * 1024);
      writeFileSync(dir.path('direct-plain.img'), plain);
      await runOk('nbdcopy', ['--request-size=1048576', dir.path('direct-plain.img'), `nbd+unix:///?socket=${socketPath}`]);
      await runOk('nbdcopy', [tlsUri(socketPath, pki), dir.path('direct-out2.img')]);
      assert.ok(readFileSync(dir.path('direct-out2.img')).subarray(0, plain.length).equals(plain), 'bytes written plain read back over TLS');
      assert.match(server.output(), /direct receive is not used with TLS/);
    } finally {
      await server.stop();
    }
  });

  test('--tls-verify-peer: no client certificate fails, a CA-signed one works', async () => {
    const socketPath = dir.path('verify.sock');
    const server = await startServerUnderTest({
      kind: 'enbd', file: dir.path('disk.img'), socketPath, args: ['--tls', 'require', '--tls-certificates', pki, '--tls-verify-peer'],
    });
    try {
      const caOnly = dir.path('ca-only');
      mkdirSync(caOnly);
      copyFileSync(join(pki, 'ca-cert.pem'), join(caOnly, 'ca-cert.pem'));
      const refused = await run('nbdinfo', ['--size', tlsUri(socketPath, caOnly)]);
      assert.notEqual(refused.status, 0);
      assert.doesNotMatch(refused.stdout, /16777216/);
      // a client certificate from another CA (trusting ours for the server) is refused too
      const foreign = makePki(dir.path('foreign-pki'));
      const mixed = dir.path('mixed');
      mkdirSync(mixed);
      copyFileSync(join(pki, 'ca-cert.pem'), join(mixed, 'ca-cert.pem'));
      copyFileSync(join(foreign, 'client-cert.pem'), join(mixed, 'client-cert.pem'));
      copyFileSync(join(foreign, 'client-key.pem'), join(mixed, 'client-key.pem'));
      const foreignClient = await run('nbdinfo', ['--size', tlsUri(socketPath, mixed)]);
      assert.notEqual(foreignClient.status, 0);
      assert.doesNotMatch(foreignClient.stdout, /16777216/);
      const result = await runOk('nbdinfo', ['--size', tlsUri(socketPath, pki)]);
      assert.equal(result.stdout.trim(), String(kSizeBytes));
    } finally {
      await server.stop();
    }
  });

  test('expired certificates: a client refuses an expired server certificate; --tls-verify-peer refuses an expired client one', async () => {
    const expired = makePki(dir.path('expired-pki'), { serverDays: 0, clientDays: 0 });
    await new Promise((resolveWait) => setTimeout(resolveWait, 1500)); // let notAfter (now) pass
    const socketPath = dir.path('expired.sock');
    const server = await startServerUnderTest({
      kind: 'enbd', file: dir.path('disk.img'), socketPath, args: ['--tls', 'require', '--tls-certificates', expired, '--tls-verify-peer'],
    });
    try {
      const qemu = await run('qemu-io', [
        '--object', `tls-creds-x509,id=tls0,dir=${expired},endpoint=client`, '--image-opts', '-c', 'read 0 4k',
        `driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=${socketPath},file.tls-creds=tls0,file.tls-hostname=localhost`,
      ]);
      assert.notEqual(qemu.status, 0);
      assert.match(qemu.stderr, /expired/i);
      // the client's certificate is expired too: libnbd sends it, the server must refuse it
      const refused = await run('nbdinfo', ['--size', tlsUri(socketPath, expired)]);
      assert.notEqual(refused.status, 0);
      assert.doesNotMatch(refused.stdout, /16777216/);
      assert.equal(server.alive(), true);
    } finally {
      await server.stop();
    }
  });

  test('TCP: nbds://localhost:PORT with the right host name works, another tls-hostname is refused', async () => {
    const socketPath = dir.path('tcp.sock');
    const server = await startServerUnderTest({ kind: 'enbd', file: dir.path('disk.img'), socketPath, tcp: true, args: ['--tls', 'require', '--tls-certificates', pki] });
    try {
      const client = await NbdClient.connect(`nbds://localhost:${server.port}/?tls-certificates=${pki}`);
      assert.equal(client.sizeBytes, kSizeBytes);
      await client.disconnect();
      const byIp = await NbdClient.connect(`nbds://127.0.0.1:${server.port}/?tls-certificates=${pki}`);
      await byIp.disconnect();
      await assert.rejects(NbdClient.connect(`nbds://127.0.0.1:${server.port}/?tls-certificates=${pki}&tls-hostname=elsewhere.example`), /TLS handshake .* failed/);
      const relaxed = await NbdClient.connect(`nbds://127.0.0.1:${server.port}/?tls-certificates=${pki}&tls-hostname=elsewhere.example&tls-verify-peer=false`);
      await relaxed.disconnect();
      const result = await runOk('nbdinfo', ['--size', `nbds://localhost:${server.port}/?tls-certificates=${pki}`]);
      assert.equal(result.stdout.trim(), String(kSizeBytes));
    } finally {
      await server.stop();
    }
  });

  test('--tls off (default) answers STARTTLS with ERR_UNSUP and keeps negotiating', async () => {
    const socketPath = dir.path('off.sock');
    const server = await startServerUnderTest({ kind: 'enbd', file: dir.path('disk.img'), socketPath });
    const probe = await NbdProbe.connect({ path: socketPath });
    try {
      await probe.handshake();
      probe.sendOption(p.kOptStartTls);
      assert.equal((await probe.readOptionReplies())[0]?.type, p.kRepErrUnsup);
      probe.sendOption(p.kOptList);
      const list = await probe.readOptionReplies();
      assert.equal(list.at(-1)?.type, p.kRepAck);
    } finally {
      probe.destroy();
      await server.stop();
    }
  });

  test('bad certificate settings fail at startup naming the file', async () => {
    const result = await run(process.execPath, [
      join(import.meta.dirname, '../../src/cli/main.js'), 'serve', dir.path('disk.img'), '--socket', dir.path('bad.sock'),
      '--tls', 'require', '--tls-certificates', dir.path('nowhere'),
    ]);
    assert.notEqual(result.status, 0);
    assert.match(result.stderr, /server-cert\.pem/);
  });
});

describe('enbd mirror --tls require', { skip }, () => {
  let dir: Scratch;
  before(() => {
    dir = scratch('enbd-tls-mirror-');
  });
  after(async () => {
    await stopAllMirrors();
    dir.cleanup();
  });

  test('a mirror export over TLS (config-file keys): written bytes reach both legs', async () => {
    const pki = makePki(dir.path('pki'));
    makeFile(dir.path('a.img'));
    makeFile(dir.path('b.img'));
    const socketPath = dir.path('m.sock');
    writeFileSync(dir.path('enbd.yaml'), `tls: require\ntlsCertificates: ${pki}\n`);
    const mirror = await startMirrorArgs([
      '--leg', dir.path('a.img'), '--leg', dir.path('b.img'), '--socket', socketPath, '--config', dir.path('enbd.yaml'), '--log-level', 'warn',
    ]);
    try {
      assert.match(mirror.uri, /^nbds\+unix:/);
      const plain = await run('nbdinfo', ['--size', `nbd+unix:///?socket=${socketPath}`]);
      assert.notEqual(plain.status, 0);
      const result = await nbdsh(tlsUri(socketPath, pki), [
        'assert h.get_tls_negotiated()',
        'h.pwrite(b"\\xa7" * 131072, 2097152)',
        'h.flush()',
        'assert h.pread(131072, 2097152) == b"\\xa7" * 131072',
      ].join('\n'));
      assert.equal(result.status, 0, result.stderr);
    } finally {
      assert.equal(await mirror.stop(), 0);
    }
    for (const leg of ['a.img', 'b.img']) {
      const bytes = readFileSync(dir.path(leg)).subarray(2097152, 2097152 + 131072);
      assert.ok(bytes.every((byte) => byte === 0xa7), `${leg} holds the bytes`);
    }
  });
});
