/**
 * TLS with pre-shared keys (psktool `username:hexkey` files): the export (`enbd serve --tls
 * require --tls-psk FILE`) against libnbd (nbdinfo, nbdsh with `USER@` and tls-psk-file) and
 * qemu-io (tls-creds-psk); legs (`nbds+unix://USER@/?...&tls-psk-file=`) against
 * `nbdkit --tls=require --tls-psk=FILE` under a mirror; a wrong key or unknown user fails.
 * Threads: test process main thread; servers are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { chmodSync, closeSync, ftruncateSync, mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { scratch, startNbdkit, type Child, type Scratch } from '../helpers/tools.js';
import { run, runOk, skipUnlessTools, startServerUnderTest, type ServerUnderTest } from '../helpers/serve.js';
import { assertSameBytes, startInProcessMirror, stopAllMirrors } from '../helpers/mirror.js';
import { NbdClient } from '../../src/nbd/client/client.js';

const kSizeBytes = 16 * 1024 * 1024;

function makeFile(path: string): void {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, kSizeBytes);
  closeSync(fd);
}

function writeKeys(path: string, entries: Array<[string, Buffer]>): string {
  writeFileSync(path, entries.map(([user, key]) => `${user}:${key.toString('hex')}\n`).join(''));
  chmodSync(path, 0o600);
  return path;
}

describe('TLS-PSK', { skip: skipUnlessTools('nbdkit', 'nbdinfo', 'nbdsh', 'qemu-io'), timeout: 60_000 }, () => {
  let dir: Scratch;
  let keys: string;
  let wrong: string;
  let server: ServerUnderTest;
  const children: Child[] = [];
  const aliceKey = randomBytes(32);
  before(async () => {
    dir = scratch('enbd-psk-');
    keys = writeKeys(dir.path('keys.psk'), [['alice', aliceKey], ['carol', randomBytes(32)]]);
    wrong = writeKeys(dir.path('wrong.psk'), [['alice', randomBytes(32)], ['bob', randomBytes(32)]]);
    makeFile(dir.path('disk.img'));
    server = await startServerUnderTest({ kind: 'enbd', file: dir.path('disk.img'), socketPath: dir.path('e.sock'), args: ['--tls', 'require', '--tls-psk', keys] });
  });
  after(async () => {
    await stopAllMirrors();
    await server.stop();
    await Promise.all(children.map(async (child) => await child.stop('SIGKILL')));
    dir.cleanup();
  });

  const exportUri = (user: string, file: string): string => `nbds+unix://${user}@/?socket=${dir.path('e.sock')}&tls-psk-file=${file}`;

  test('export: nbdinfo and nbdsh with the right key; wrong key and unknown user fail', async () => {
    const info = JSON.parse((await runOk('nbdinfo', ['--json', exportUri('alice', keys)])).stdout) as { TLS: boolean; exports: Array<{ 'export-size': number }> };
    assert.equal(info.TLS, true);
    assert.equal(info.exports[0]?.['export-size'], kSizeBytes);
    const code = [
      'h = nbd.NBD()', 'h.set_uri_allow_local_file(True)', `h.connect_uri(${JSON.stringify(exportUri('alice', keys))})`,
      'h.pwrite(b"\\x61" * 4096, 65536)', 'assert h.pread(4096, 65536) == b"\\x61" * 4096', 'h.flush()',
    ].join('\n');
    const sh = await run('nbdsh', ['-n', '-c', code]);
    assert.equal(sh.status, 0, sh.stderr);
    assert.ok(readFileSync(dir.path('disk.img')).subarray(65536, 69632).every((byte) => byte === 0x61));
    for (const uri of [exportUri('alice', wrong), exportUri('bob', wrong)]) {
      const refused = await run('nbdinfo', ['--size', uri]);
      assert.notEqual(refused.status, 0, `${uri} must be refused`);
      assert.doesNotMatch(refused.stdout, /16777216/);
    }
    assert.equal(server.alive(), true);
  });

  test('export: qemu-io with tls-creds-psk', async () => {
    const credentials = dir.path('qemu-psk');
    mkdirSync(credentials);
    writeKeys(`${credentials}/keys.psk`, [['alice', aliceKey]]);
    const result = await run('qemu-io', [
      '--object', `tls-creds-psk,id=tls0,dir=${credentials},endpoint=client,username=alice`, '--image-opts',
      '-c', 'write -P 0x77 2M 64k', '-c', 'read -P 0x77 2M 64k',
      `driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=${dir.path('e.sock')},file.tls-creds=tls0`,
    ]);
    assert.equal(result.status, 0, `${result.stdout}\n${result.stderr}`);
    assert.match(result.stdout, /read 65536\/65536/);
  });

  test('legs: a mirror over two nbdkit --tls-psk legs; a wrong key fails the leg handshake', async () => {
    const files = [dir.path('l0.img'), dir.path('l1.img')];
    const sockets = [dir.path('l0.sock'), dir.path('l1.sock')];
    for (const [index, file] of files.entries()) {
      makeFile(file);
      children.push(await startNbdkit(sockets[index] as string, ['file', file], ['--tls=require', `--tls-psk=${keys}`]));
    }
    const legUri = (socket: string, file: string): string => `nbds+unix:///?socket=${socket}&tls-psk-file=${file}&tls-username=alice`;
    await assert.rejects(NbdClient.connect(legUri(sockets[0] as string, wrong)), /TLS handshake .* failed/);
    await assert.rejects(NbdClient.connect(`nbds+unix://carol@/?socket=${sockets[0] as string}&tls-psk-file=${wrong}`), /no key for user 'carol'/);
    const mirror = await startInProcessMirror({ legs: sockets.map((socket) => legUri(socket, keys)), socketPath: dir.path('m.sock') });
    const data = randomBytes(512 * 1024);
    const client = await NbdClient.connect(mirror.uri);
    try {
      await client.write(3 * 1024 * 1024, data);
      await client.flush();
      assertSameBytes(await client.read(3 * 1024 * 1024, data.length), data, 'read back through the mirror');
    } finally {
      await client.disconnect();
      await mirror.close();
    }
    for (const file of files) assertSameBytes(readFileSync(file).subarray(3 * 1024 * 1024, 3 * 1024 * 1024 + data.length), data, `${file} holds the data`);
  });
});
