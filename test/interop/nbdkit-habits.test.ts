/**
 * Issue 12: nbdkit's habits for `enbd serve` and `enbd mirror`:
 * - `-U - --run CMD` (captive): CMD gets $uri/$nbd/$unixsocket/$socket/$port/$exportname,
 *   the daemon stops when CMD exits and exits with its status (128+N for signal N), the
 *   private socket directory is gone afterwards, stdout carries only CMD's output;
 * - `-P/--pidfile`: the pidfile appears only once the socket accepts, holds the pid, and is
 *   removed at a clean stop;
 * - `--exit-with-parent`: the daemon stops (cleanly) when its parent is killed;
 * - `-r/--read-only` for the mirror: advertised read-only, a write sent anyway gets EPERM;
 * - `-p/--port`, `-e/--export-name`, `-f/--foreground` as aliases / no-ops; conflicts refused.
 * Threads: test process main thread; daemons and tools are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, openSync, readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { freePort, readRange, scratch, startChild, toolEnv, unixAccepts, waitFor, type Scratch } from '../helpers/tools.js';
import { run, runOk, skipUnlessTools } from '../helpers/serve.js';
import { enbdCli, stopAllMirrors } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;
const kFileBytes = 8 * kMiB;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

describe('nbdkit habits: -U -, --run, -P, --exit-with-parent, -r, -p, -e, -f', { skip: skipUnlessTools('nbdinfo', 'nbdsh') }, () => {
  let dir: Scratch;
  let seq = 0;

  before(() => {
    dir = scratch('enbd-habits-');
  });

  after(async () => {
    await stopAllMirrors();
    dir?.cleanup();
  });

  function file(): string {
    seq += 1;
    const path = dir.path(`f${seq}.img`);
    const fd = openSync(path, 'w');
    ftruncateSync(fd, kFileBytes);
    closeSync(fd);
    return path;
  }

  async function enbd(args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
    return await run(process.execPath, [enbdCli, ...args], { timeoutMs: 60_000 });
  }

  function privateDirOf(stderr: string): string {
    const match = /socket=(\/\S+)\/enbd\.sock/.exec(stderr);
    assert.ok(match?.[1] !== undefined, `the banner (on stderr with --run) names the private socket:\n${stderr}`);
    return match[1];
  }

  test('serve -U - --run: captive nbdinfo, only its output on stdout, private dir removed', async () => {
    const result = await enbd(['serve', file(), '-U', '-', '--log-level', 'warn', '--run', 'nbdinfo --size "$uri"']);
    assert.equal(result.status, 0, result.stderr);
    assert.equal(result.stdout, `${kFileBytes}\n`, 'stdout is the command\'s alone');
    const privateDir = privateDirOf(result.stderr);
    assert.ok(!existsSync(privateDir), `the private socket dir ${privateDir} is removed`);
  });

  test('serve --run: the environment like nbdkit, and the command\'s exit status (also by signal)', async () => {
    const port = await freePort();
    const script = 'printf "%s\\n" "$uri" "$nbd" "$unixsocket" "$socket" "$port" "$exportname"; exit 3';
    const result = await enbd(['serve', file(), '-U', '-', '-p', String(port), '-e', 'disk', '-f', '--log-level', 'warn', '--run', script]);
    assert.equal(result.status, 3, `exit status of the command:\n${result.stderr}`);
    const [uri, nbd, unixsocket, socket, portText, exportname] = result.stdout.split('\n');
    const privateDir = privateDirOf(result.stderr);
    assert.equal(unixsocket, `${privateDir}/enbd.sock`);
    assert.equal(socket, unixsocket);
    assert.equal(uri, `nbd+unix:///disk?socket=${privateDir}/enbd.sock`, 'the Unix socket URI is preferred');
    assert.equal(nbd, uri, '$nbd is the same URI (nbdkit >= 1.24)');
    assert.equal(portText, String(port));
    assert.equal(exportname, 'disk');
    const killed = await enbd(['serve', file(), '-U', '-', '--log-level', 'warn', '--run', 'kill -TERM $$']);
    assert.equal(killed.status, 128 + 15, 'a command killed by SIGTERM: 143');
  });

  test('mirror -U - --run: a captive nbdsh writes and reads; the data is on both legs', async () => {
    const legs = [file(), file()];
    const code = 'h.pwrite(b"\\x5a" * 65536, 1048576); h.flush(); assert h.pread(65536, 1048576) == b"\\x5a" * 65536';
    const result = await enbd(['mirror', '--leg', legs[0] ?? '', '--leg', legs[1] ?? '', '--metadata', 'none', '-U', '-', '--control', 'none', '--log-level', 'warn',
      '--run', `nbdsh -u "$uri" -c '${code}'`]);
    assert.equal(result.status, 0, result.stderr);
    assert.equal(result.stdout, '', 'the banner went to stderr');
    for (const leg of legs) assert.ok(readRange(leg, kMiB, 65536).every((byte) => byte === 0x5a), `${leg} holds the write`);
    assert.ok(!existsSync(privateDirOf(result.stderr)));
  });

  for (const kind of ['serve', 'mirror'] as const) {
    test(`${kind} -P: the pidfile appears only once the socket accepts, and is removed at a clean stop`, async () => {
      const socket = dir.path(`${kind}-pid.sock`);
      const pidfile = dir.path(`${kind}.pid`);
      const args = kind === 'serve'
        ? ['serve', file(), '-U', socket, '-P', pidfile]
        : ['mirror', '--leg', file(), '--leg', file(), '--metadata', 'none', '-U', socket, '--pidfile', pidfile];
      const child = startChild(process.execPath, [enbdCli, ...args, '--log-level', 'warn'], { env: { ...toolEnv, ENBD_LOG_JSON: '1' } });
      const deadline = Date.now() + 30_000;
      while (!existsSync(pidfile)) {
        assert.ok(child.process.exitCode === null, `${kind} exited early:\n${child.output()}`);
        assert.ok(Date.now() < deadline, 'the pidfile appeared in time');
        await sleep(2);
      }
      assert.ok(await unixAccepts(socket), 'when the pidfile exists, the socket already accepts');
      assert.equal(readFileSync(pidfile, 'utf8'), `${child.process.pid}\n`);
      assert.equal(await child.stop('SIGTERM'), 0);
      assert.ok(!existsSync(pidfile), 'removed at a clean stop');
    });
  }

  test('-P in a missing directory, or a missing file with -U -: exit 1, the private dir removed', async () => {
    const result = await enbd(['serve', file(), '-U', '-', '-P', dir.path('no/such/dir/x.pid'), '--log-level', 'warn']);
    assert.equal(result.status, 1, `a pidfile that cannot be written stops the daemon:\n${result.stderr}`);
    assert.ok(!existsSync(privateDirOf(result.stdout + result.stderr)), 'the private socket dir is removed');
    const before = new Set((await run('sh', ['-c', 'ls -d "${TMPDIR:-/tmp}"/enbd-?????? 2>/dev/null'])).stdout.split('\n'));
    const missing = await enbd(['serve', dir.path('missing.img'), '-U', '-', '--log-level', 'warn']);
    assert.equal(missing.status, 1);
    const after = (await run('sh', ['-c', 'ls -d "${TMPDIR:-/tmp}"/enbd-?????? 2>/dev/null'])).stdout.split('\n');
    assert.deepEqual(after.filter((path) => !before.has(path)), [], 'a failed start leaves no private dir');
  });

  test('--exit-with-parent: killing the parent stops the daemon cleanly', async () => {
    const socket = dir.path('orphan.sock');
    const pidfile = dir.path('orphan.pid');
    const quoted = (text: string): string => `'${text}'`;
    const command = [process.execPath, enbdCli, 'serve', file(), '-U', socket, '-P', pidfile, '--exit-with-parent', '--log-level', 'warn'].map(quoted).join(' ');
    const parent = spawn('/bin/sh', ['-c', `${command} & wait`], { env: toolEnv, stdio: 'ignore' });
    await waitFor('the pidfile', () => existsSync(pidfile), 30_000);
    const pid = Number(readFileSync(pidfile, 'utf8'));
    assert.ok(alive(pid));
    await runOk('nbdinfo', ['--size', `nbd+unix:///?socket=${socket}`]);
    parent.kill('SIGKILL');
    await waitFor('the orphaned daemon to stop', () => !alive(pid), 15_000);
    assert.ok(!existsSync(pidfile), 'it stopped cleanly (pidfile removed)');
    assert.ok(!existsSync(socket), 'and removed its socket');
  });

  test('mirror -r: advertised read-only; a write sent anyway gets EPERM; reads work', async () => {
    const legs = [file(), file()];
    const result = await enbd(['mirror', '--leg', legs[0] ?? '', '--leg', legs[1] ?? '', '--metadata', 'none', '-r', '-U', '-', '--control', 'none', '--log-level', 'warn',
      '--run', 'nbdinfo --is read-only "$uri" && nbdsh -u "$uri" -c "h.set_strict_mode(0)" -c "assert h.pread(4096, 0) == bytes(4096)" -c "'
        + 'try:\n  h.pwrite(b\\"x\\" * 4096, 0)\n  raise SystemExit(9)\nexcept nbd.Error as e:\n  assert e.errno == \\"EPERM\\", e.errno\n"']);
    assert.equal(result.status, 0, `read-only advertised, EPERM on write:\n${result.stdout}\n${result.stderr}`);
    for (const leg of legs) assert.ok(readRange(leg, 0, 4096).every((byte) => byte === 0), 'the legs are unchanged');
  });

  test('bin/enbd runs the CLI from any directory, also through a symlink', async () => {
    const launcher = new URL('../../../bin/enbd', import.meta.url).pathname;
    const link = dir.path('enbd-link');
    await runOk('ln', ['-s', launcher, link]);
    for (const command of [launcher, link]) {
      const version = await run(command, ['--version']);
      assert.equal(version.status, 0, version.stderr);
      assert.equal(version.stdout.trim(), '0.1.0');
    }
  });

  test('aliases: -p PORT and -e NAME serve; conflicting spellings are refused', async () => {
    const port = await freePort();
    const served = await enbd(['serve', file(), '-p', String(port), '-e', 'disk', '--log-level', 'warn', '--run', 'nbdinfo --size "$uri"']);
    assert.equal(served.status, 0, served.stderr);
    assert.equal(served.stdout, `${kFileBytes}\n`);
    assert.match(served.stderr, new RegExp(`nbd://127\\.0\\.0\\.1:${port}/disk`));
    const names = await enbd(['serve', file(), '-U', '-', '-e', 'a', '--name', 'b']);
    assert.equal(names.status, 2);
    assert.match(names.stderr, /^enbd: error: -e\/--export-name "a" and --name "b" differ; use one$/m, 'no error code in a message for people');
    const ports = await enbd(['mirror', '--leg', file(), '--metadata', 'none', '-p', '1', '--listen', '2']);
    assert.equal(ports.status, 2);
    assert.match(ports.stderr, /^enbd: error: -p\/--port 1 and --listen 2 both given; use one/m);
  });
});
