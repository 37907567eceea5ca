/**
 * TLS legs: `nbds+unix://` leg URIs to `nbdkit --tls=require --tls-certificates=DIR` under an
 * in-process mirror: data written through the mirror reaches both legs; a leg killed and
 * restarted reconnects over TLS and resyncs to equal bytes. A plain nbd:// URI to a server that
 * requires TLS fails with an error saying to use nbds://; a wrong CA fails the handshake.
 * Threads: test process main thread; legs are nbdkit child processes, actors are workers.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { copyFileSync, mkdirSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { scratch, startNbdkit, waitFor, type Child, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { assertSameBytes, enbdCli, runMirrorCli, startInProcessMirror, startMirrorArgs, stopAllMirrors } from '../helpers/mirror.js';
import { run } from '../helpers/tools.js';
import { makePki } from '../helpers/pki.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { parseNbdUri, formatNbdUri } from '../../src/nbd/uri.js';
import type { MirrorDevice } from '../../src/engine/mirror.js';

const kMiB = 1024 * 1024;
const kLegBytes = 16 * kMiB;

describe('nbds:// legs against nbdkit --tls=require', { skip: skipUnlessTools('nbdkit', 'openssl'), timeout: 60_000 }, () => {
  let dir: Scratch;
  let pki: string;
  const children: Child[] = [];
  before(() => {
    dir = scratch('enbd-tls-legs-');
    pki = makePki(dir.path('pki'));
  });
  after(async () => {
    await stopAllMirrors();
    await Promise.all(children.map(async (child) => await child.stop('SIGKILL')));
    dir.cleanup();
  });

  function image(name: string): string {
    const path = dir.path(name);
    writeFileSync(path, '');
    truncateSync(path, kLegBytes);
    return path;
  }

  async function tlsLeg(file: string, socket: string): Promise<Child> {
    const child = await startNbdkit(socket, ['file', file], ['--tls=require', `--tls-certificates=${pki}`]);
    children.push(child);
    return child;
  }

  const uri = (socket: string, extra = ''): string => `nbds+unix:///?socket=${socket}&tls-certificates=${pki}${extra}`;

  test('the URI forms parse and format back', () => {
    const unix = parseNbdUri(`nbds+unix:///disk?socket=/s&tls-certificates=/p&tls-verify-peer=false&tls-hostname=h`);
    assert.deepEqual(unix, { kind: 'unix', socketPath: '/s', exportName: 'disk', tls: { verifyPeer: false, certificatesDir: '/p', hostname: 'h' } });
    assert.deepEqual(parseNbdUri(formatNbdUri(unix)), unix);
    const tcp = parseNbdUri('nbds://example.org:10900/x?tls-certificates=/p');
    assert.deepEqual(tcp, { kind: 'tcp', host: 'example.org', port: 10900, exportName: 'x', tls: { verifyPeer: true, certificatesDir: '/p' } });
    assert.deepEqual(parseNbdUri(formatNbdUri(tcp)), tcp);
    assert.throws(() => parseNbdUri('nbd://h/?tls-certificates=/p'), /nbds/);
    assert.throws(() => parseNbdUri('nbd+unix:///?socket=/s&tls-certificates=/p'), /nbds/);
    assert.throws(() => parseNbdUri('nbds://h/?tls-verify-peer=maybe'), /true or false/);
  });

  test('a plain nbd:// client to a TLS-only leg is told to use nbds://; a wrong CA fails', async () => {
    const socket = dir.path('refuse.sock');
    await tlsLeg(image('refuse.img'), socket);
    await assert.rejects(NbdClient.connect(`nbd+unix:///?socket=${socket}`), /requires TLS: use an nbds:\/\//);
    const other = makePki(dir.path('other-pki'));
    const caOnly = dir.path('other-ca');
    mkdirSync(caOnly);
    copyFileSync(join(other, 'ca-cert.pem'), join(caOnly, 'ca-cert.pem'));
    await assert.rejects(NbdClient.connect(`nbds+unix:///?socket=${socket}&tls-certificates=${caOnly}`), /TLS handshake .* failed/);
    const client = await NbdClient.connect(uri(socket));
    assert.equal(client.sizeBytes, kLegBytes);
    await client.disconnect();
  });

  test('mirror over two TLS legs: writes reach both; a killed leg reconnects over TLS and resyncs', async () => {
    const files = [image('a.img'), image('b.img')];
    const sockets = [dir.path('a.sock'), dir.path('b.sock')];
    await tlsLeg(files[0] as string, sockets[0] as string);
    let legB = await tlsLeg(files[1] as string, sockets[1] as string);
    const mirror = await startInProcessMirror({
      legs: sockets.map((socket) => uri(socket)),
      socketPath: dir.path('m.sock'),
      engine: { legTimeoutMs: 1000, reconnectMinMs: 30, reconnectMaxMs: 300, resyncRates: { minBytesPerSecond: 0, maxBytesPerSecond: 0 } },
    });
    const states = (device: MirrorDevice): string => device.legStatus().map((leg) => leg.state).join();
    const model = Buffer.alloc(kLegBytes);
    const client = await NbdClient.connect(mirror.uri);
    const writeSome = async (count: number): Promise<void> => {
      for (let index = 0; index < count; index += 1) {
        const length = 4096 * (1 + (index % 16));
        const offset = 4096 * Math.floor(Math.random() * ((kLegBytes - length) / 4096));
        const data = randomBytes(length);
        data.copy(model, offset);
        await client.write(offset, data);
      }
    };
    try {
      await waitFor(`legs in sync (${states(mirror.device)})`, () => states(mirror.device) === 'in-sync,in-sync', 20_000);
      await writeSome(100);
      await client.flush();
      for (const file of files) assertSameBytes(readFileSync(file), model, `${file} after writes over TLS`);
      await legB.stop('SIGKILL');
      await writeSome(100);
      await waitFor('leg 1 out of sync', () => states(mirror.device) !== 'in-sync,in-sync', 20_000);
      legB = await tlsLeg(files[1] as string, sockets[1] as string);
      await waitFor(`legs back in sync (${states(mirror.device)})`, () => states(mirror.device) === 'in-sync,in-sync', 30_000);
      await client.flush();
      const back = await client.read(0, 4 * kMiB);
      assertSameBytes(back, model.subarray(0, 4 * kMiB), 'read back through the mirror');
    } finally {
      await client.disconnect();
      await mirror.close();
    }
    for (const file of files) assertSameBytes(readFileSync(file), model, `${file} after the resync over TLS`);
  });

  test('enbd create over nbds legs, then enbd mirror (metadata, TLS export): data through TLS end to end', async () => {
    const files = [image('c0.img'), image('c1.img')];
    const sockets = [dir.path('c0.sock'), dir.path('c1.sock')];
    for (const [index, file] of files.entries()) await tlsLeg(file, sockets[index] as string);
    const legArgs = sockets.flatMap((socket) => ['--leg', uri(socket)]);
    const created = await run(process.execPath, [enbdCli, 'create', ...legArgs]);
    assert.equal(created.status, 0, `${created.stdout}\n${created.stderr}`);
    // the plain form of leg 0 is refused, naming the leg and saying what to change
    const plain = await runMirrorCli(['--leg', `nbd+unix:///?socket=${sockets[0] as string}`, '--leg', uri(sockets[1] as string), '--socket', dir.path('p.sock'), '--control', 'none', '--metadata', 'leg']);
    assert.notEqual(plain.status, 0);
    assert.match(plain.stderr, /leg nbd\+unix:\/\/\/\?socket=\S*c0\.sock: .*requires TLS: use an nbds/);
    const exportSocket = dir.path('c.sock');
    const mirror = await startMirrorArgs([...legArgs, '--metadata', 'leg', '--socket', exportSocket, '--control', 'none', '--tls', 'require', '--tls-certificates', pki, '--log-level', 'warn']);
    const data = randomBytes(256 * 1024);
    try {
      const client = await NbdClient.connect(`nbds+unix:///?socket=${exportSocket}&tls-certificates=${pki}`);
      try {
        await client.write(kMiB, data);
        await client.flush();
        assertSameBytes(await client.read(kMiB, data.length), data, 'read back through the TLS export');
      } finally {
        await client.disconnect();
      }
    } finally {
      assert.equal(await mirror.stop(), 0);
    }
    for (const file of files) assertSameBytes(readFileSync(file).subarray(kMiB, kMiB + data.length), data, `${file} holds the data`);
  });
});
