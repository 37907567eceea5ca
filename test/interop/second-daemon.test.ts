/**
 * Issue 12: a second daemon must not break the first. A second `enbd mirror` (or `enbd serve`)
 * given a socket, TCP port or control socket that a running daemon accepts on exits 1 with a
 * message naming that listener, before it binds or unlinks anything and before it opens a leg;
 * the first daemon stays reachable (nbdinfo) on the same socket. A stale socket (nothing
 * accepts on it) is still replaced.
 * Threads: test process main thread; daemons, nbdinfo and python3 are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, lstatSync } from 'node:fs';
import { freePort, scratch, sparseFile, toolEnv, unixUri, type Scratch } from '../helpers/tools.js';
import { run, runOk, skipUnlessTools, startServerUnderTest } from '../helpers/serve.js';
import { enbdCli, runMirrorCli, startMirrorArgs, stopAllMirrors } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;
const kLegBytes = 16 * kMiB;

describe('a second daemon does not break the first', { skip: skipUnlessTools('nbdinfo', 'python3') }, () => {
  let dir: Scratch;
  let seq = 0;

  before(() => {
    dir = scratch('enbd-second-');
  });

  after(async () => {
    await stopAllMirrors();
    dir?.cleanup();
  });

  function legFile(): string {
    seq += 1;
    return sparseFile(dir.path(`leg${seq}.img`), kLegBytes);
  }

  function legArgs(): string[] {
    return ['--leg', legFile(), '--leg', legFile()];
  }

  async function assertReachable(socket: string, what: string): Promise<void> {
    const info = await runOk('nbdinfo', ['--size', unixUri(socket)]);
    assert.ok(Number(info.stdout.trim()) > 0, `${what}: nbdinfo reads the size`);
  }

  test('same --socket (another control socket): refused naming the socket; the first keeps it', async () => {
    const socket = dir.path('a.sock');
    const first = await startMirrorArgs([...legArgs(), '--socket', socket, '--control', dir.path('a1.ctl'), '--log-level', 'warn']);
    const inode = lstatSync(socket).ino;
    const second = await runMirrorCli([...legArgs(), '--socket', socket, '--control', dir.path('a2.ctl'), '--log-level', 'warn']);
    assert.equal(second.status, 1, `the second daemon exits 1:\n${second.stdout}\n${second.stderr}`);
    assert.match(second.stderr, new RegExp(`^enbd: error: --socket ${socket.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} is in use: another process accepts connections on it`, 'm'));
    assert.ok(!existsSync(dir.path('a2.ctl')), 'the second daemon bound no control socket');
    assert.equal(lstatSync(socket).ino, inode, 'the first daemon\'s socket file was not replaced');
    await assertReachable(socket, 'the first daemon after the refusal');
    assert.ok(first.alive());
    assert.equal(await first.stop(), 0);
  });

  test('same --listen port or same --control: refused before the own socket is bound', async () => {
    const port = await freePort();
    const socket = dir.path('b.sock');
    const control = dir.path('b.ctl');
    const first = await startMirrorArgs([...legArgs(), '--socket', socket, '--listen', `127.0.0.1:${port}`, '--control', control, '--log-level', 'warn']);
    const byPort = await runMirrorCli([...legArgs(), '--socket', dir.path('b2.sock'), '--listen', `127.0.0.1:${port}`, '--control', dir.path('b2.ctl'), '--log-level', 'warn']);
    assert.equal(byPort.status, 1, byPort.stderr);
    assert.match(byPort.stderr, new RegExp(`^enbd: error: --listen 127\\.0\\.0\\.1:${port}: cannot listen on 127\\.0\\.0\\.1:${port}: .*in use`, 'm'));
    assert.ok(!existsSync(dir.path('b2.sock')), 'refused on the port: its own socket was never bound');
    const byControl = await runMirrorCli([...legArgs(), '--socket', dir.path('b3.sock'), '--listen', '127.0.0.1:0', '--control', control, '--log-level', 'warn']);
    assert.equal(byControl.status, 1, byControl.stderr);
    assert.match(byControl.stderr, /^enbd: error: --control .*b\.ctl is in use/m);
    assert.ok(!existsSync(dir.path('b3.sock')), 'refused on the control socket: its own socket was never bound');
    await assertReachable(socket, 'the first daemon');
    const status = await run(process.execPath, [enbdCli, 'status', '--control', control]);
    assert.equal(status.status, 0, `the first daemon's control socket still answers:\n${status.stderr}`);
    assert.equal(await first.stop(), 0);
  });

  test('embedded default twice in one --data-dir: refused on the socket, before touching the legs', async () => {
    const dataDir = dir.path('embedded');
    const port = await freePort();
    const first = await startMirrorArgs(['--data-dir', dataDir, '--listen', `127.0.0.1:${port}`, '--log-level', 'warn']);
    const socket = `${dataDir}/enbd.sock`;
    const second = await runMirrorCli(['--data-dir', dataDir, '--listen', `127.0.0.1:${await freePort()}`, '--log-level', 'warn']);
    assert.equal(second.status, 1, second.stderr);
    assert.match(second.stderr, /^enbd: error: --socket .*embedded\/enbd\.sock is in use/m, 'named the socket, not the legs: the legs were not opened');
    await assertReachable(socket, 'the first embedded daemon');
    assert.equal(await first.stop(), 0);
  });

  test('a stale socket (nothing accepts) is replaced', async () => {
    const socket = dir.path('stale.sock');
    const bound = spawnSync('/usr/bin/python3', ['-c', 'import socket,sys;s=socket.socket(socket.AF_UNIX);s.bind(sys.argv[1])', socket], { env: toolEnv });
    assert.equal(bound.status, 0, String(bound.stderr));
    const mirror = await startMirrorArgs([...legArgs(), '--socket', socket, '--control', 'none', '--log-level', 'info']);
    assert.match(mirror.stderr(), /replaced a stale Unix socket/);
    await assertReachable(socket, 'the daemon on the replaced socket');
    assert.equal(await mirror.stop(), 0);
    assert.ok(!existsSync(socket), 'its own socket is removed on a clean stop');
  });

  test('enbd serve: a second one on the same socket is refused; the first serves on', async () => {
    const file = legFile();
    const socket = dir.path('serve.sock');
    const first = await startServerUnderTest({ file, socketPath: socket, kind: 'enbd' });
    const second = await run(process.execPath, [enbdCli, 'serve', legFile(), '--socket', socket]);
    assert.equal(second.status, 1, second.stderr);
    assert.match(second.stderr, /^enbd: error: --socket .*serve\.sock is in use/m);
    await assertReachable(socket, 'the first enbd serve');
    assert.deepEqual(await first.stop(), [0]);
  });
});
