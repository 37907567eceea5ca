/**
 * The control socket of a real `enbd mirror` process (legs: nbdkit memory): where it is by
 * default, its mode (0600, refusing another user: the CLI run as `nobody`), garbage frames
 * closing only their own connection (the daemon keeps serving NBD and control), clear errors
 * for a missing socket, `--control none`, a second daemon refused on a live path, and a stale
 * socket left by a SIGKILLed daemon replaced.
 * Threads: test process main thread; daemon, nbdkit and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, statSync } from 'node:fs';
import { connect } from 'node:net';
import { ControlClient } from '../../src/control/client.js';
import { encodeFrame } from '../../src/control/frame.js';
import { hasTool, isCi, scratch, startNbdkit, unixUri, type Child, type Scratch } from '../helpers/tools.js';
import { run, skipUnlessTools } from '../helpers/serve.js';
import { enbdCli, readNbd, runMirrorCli, startMirror, startMirrorArgs, stopAllMirrors, type MirrorProcess } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;

/** Sends raw bytes on a fresh control connection; resolves with what came back once the daemon closed it. */
async function sendRaw(path: string, bytes: Buffer, timeoutMs = 5000): Promise<{ closed: boolean; reply: Buffer }> {
  return await new Promise((resolve) => {
    const socket = connect(path);
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ closed: false, reply: Buffer.concat(chunks) });
    }, timeoutMs);
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.on('error', () => undefined);
    socket.on('close', () => {
      clearTimeout(timer);
      resolve({ closed: true, reply: Buffer.concat(chunks) });
    });
    socket.write(bytes);
  });
}

describe('enbd control socket: location, permissions, robustness', { skip: skipUnlessTools('nbdkit') }, () => {
  let dir: Scratch;
  const children: Child[] = [];
  let legs: string[] = [];

  before(async () => {
    dir = scratch('enbd-ctl-socket-');
    chmodSync(dir.dir, 0o755); // traversable by nobody: a refusal must come from the socket's own mode
    for (const name of ['a', 'b']) {
      const socket = dir.path(`${name}.sock`);
      children.push(await startNbdkit(socket, ['memory', '64M']));
      legs.push(unixUri(socket));
    }
  });

  after(async () => {
    await stopAllMirrors();
    await Promise.all(children.map(async (child) => await child.stop('SIGKILL')));
    legs = [];
    dir?.cleanup();
  });

  async function statusOk(control: string): Promise<void> {
    const client = await ControlClient.connect(control);
    try {
      const status = await client.call('status');
      assert.equal(status.export.sizeBytes, 64 * kMiB);
      assert.equal(status.legs.length, 2);
    } finally {
      client.close();
    }
  }

  test('default path <socket>.ctl, mode 0600, listed in the banner, removed on a clean stop', async () => {
    const socketPath = dir.path('default.sock');
    const mirror = await startMirror({ legs, socketPath });
    const control = `${socketPath}.ctl`;
    const stats = statSync(control);
    assert.ok(stats.isSocket(), 'a socket');
    assert.equal(stats.mode & 0o777, 0o600, `mode ${(stats.mode & 0o777).toString(8)}`);
    assert.equal(stats.uid, process.geteuid?.());
    assert.match(mirror.stdout(), new RegExp(`^  control: ${control.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} `, 'm'));
    await statusOk(control);
    assert.equal(await mirror.stop(), 0);
    assert.ok(!existsSync(control), 'the control socket is removed on a clean stop');
  });

  test('another user is refused: the CLI as nobody gets a permission error naming the path', async (t) => {
    if (!hasTool('setpriv')) {
      if (isCi) assert.fail('setpriv is required under CI');
      t.skip('setpriv missing');
      return;
    }
    if (process.geteuid?.() !== 0) {
      if (isCi) assert.fail('CI runs as root (.ci/run); this check needs root to run a client as nobody');
      t.skip('needs root to run a client as nobody');
      return;
    }
    const control = dir.path('perm.ctl');
    const mirror = await startMirror({ legs, socketPath: dir.path('perm.sock'), args: ['--control', control] });
    const asNobody = ['--reuid=nobody', '--regid=nogroup', '--clear-groups'];
    // nobody can reach the path (the directory is 0755), so the refusal is the socket's mode.
    const reach = await run('setpriv', [...asNobody, process.execPath, '-e', `process.exit(require('fs').statSync(${JSON.stringify(control)}).isSocket() ? 0 : 3)`]);
    assert.equal(reach.status, 0, `nobody can stat the socket:\n${reach.stderr}`);
    // The checkout may live where nobody cannot read it (CI clones under root's tree): then the
    // client is a plain connect() run as nobody instead of the CLI.
    const cliReadable = await run('setpriv', [...asNobody, process.execPath, '-e', `require('fs').accessSync(${JSON.stringify(enbdCli)}, 4)`]);
    if (cliReadable.status === 0) {
      const refused = await run('setpriv', [...asNobody, process.execPath, enbdCli, 'status', '--control', control]);
      assert.equal(refused.status, 4, `exit 4 (cannot reach the daemon):\n${refused.stdout}\n${refused.stderr}`);
      assert.equal(refused.stdout, '');
      assert.ok(refused.stderr.startsWith(`enbd: error: permission denied on control socket ${control} (EACCES)`), refused.stderr);
    } else {
      const script = `require('net').connect(${JSON.stringify(control)}).on('connect', () => process.exit(0)).on('error', (e) => { console.log(e.code); process.exit(1); })`;
      const refused = await run('setpriv', [...asNobody, process.execPath, '-e', script]);
      assert.equal(refused.status, 1, `connect as nobody must fail:\n${refused.stdout}\n${refused.stderr}`);
      assert.equal(refused.stdout.trim(), 'EACCES');
    }
    await statusOk(control);
    assert.equal(await mirror.stop(), 0);
  });

  test('garbage frames close only their own connection; the daemon keeps serving', async () => {
    const control = dir.path('garbage.ctl');
    const mirror: MirrorProcess = await startMirror({ legs, socketPath: dir.path('garbage.sock'), args: ['--control', control] });
    const watcher = await ControlClient.connect(control);
    const events: string[] = [];
    await watcher.subscribe((event) => events.push(event.event));
    const random = randomBytes(64 * 1024);
    random[0] = (random[0] ?? 0) | 0x01; // as a length prefix: >= 16 MiB
    const cases: Array<[string, Buffer]> = [
      ['random bytes', random],
      ['a huge length prefix', Buffer.from([0xff, 0xff, 0xff, 0xff])],
      ['a zero length prefix', Buffer.alloc(4)],
      ['an undecodable body', Buffer.from([0, 0, 0, 2, 0xdc, 0x00])],
      ['a frame that is not a request', encodeFrame(['status'])],
    ];
    for (const [what, bytes] of cases) {
      const outcome = await sendRaw(control, bytes);
      assert.ok(outcome.closed, `${what}: the daemon closed that connection`);
      assert.equal(outcome.reply.length, 0, `${what}: no answer`);
    }
    const unknown = await sendRaw(control, encodeFrame({ id: 9, method: 'disk.format', params: {} }));
    assert.ok(unknown.closed, 'unknown method: the connection is closed after the answer');
    assert.ok(unknown.reply.length > 4, 'unknown method: answered first');
    assert.match(unknown.reply.subarray(4).toString('latin1'), /ENBD_CTL_UNKNOWN_METHOD/);

    await statusOk(control); // a fresh client still gets status
    assert.equal((await watcher.call('status')).legs.length, 2, 'the subscribed connection is untouched');
    assert.ok(!watcher.isClosed);
    const data = await readNbd(mirror.uri, 0, 4096);
    assert.equal(data.length, 4096, 'the NBD export still serves');
    assert.ok(mirror.alive());
    assert.match(mirror.stderr(), /closing a control connection/, 'the daemon logged why');
    const cli = await run(process.execPath, [enbdCli, 'status', '--control', control]);
    assert.equal(cli.status, 0, cli.stderr);
    assert.match(cli.stdout, /^resync: idle, floor /m, 'nothing resyncs: idle');
    assert.match(cli.stdout, /^metadata: none /m, '--metadata none says so');
    watcher.close();
    assert.equal(await mirror.stop(), 0, mirror.stderr());
  });

  test('a missing or unreachable control socket: a clear error naming the path, exit 1 (status: 4)', async () => {
    const missing = dir.path('missing.ctl');
    const result = await run(process.execPath, [enbdCli, 'status', '--control', missing]);
    assert.equal(result.status, 4, 'enbd status: 4 = cannot reach the daemon');
    assert.equal(result.stdout, '');
    assert.match(result.stderr, new RegExp(`^enbd: error: no control socket at ${missing.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} `));
    const leg = await run(process.execPath, [enbdCli, 'leg', 'fail', '1', '--control', missing]);
    assert.equal(leg.status, 1);
    assert.match(leg.stderr, /no control socket at/);
    const notSocket = await run(process.execPath, [enbdCli, 'status', '--control', dir.dir]);
    assert.equal(notSocket.status, 4);
    assert.match(notSocket.stderr, new RegExp(`^enbd: error: .*${dir.dir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
  });

  test('--control none: no control socket; a live path is refused; a stale one is replaced', async () => {
    const none = await startMirror({ legs, socketPath: dir.path('none.sock'), args: ['--control', 'none'] });
    assert.ok(!existsSync(`${dir.path('none.sock')}.ctl`));
    assert.doesNotMatch(none.stdout(), /control:/);
    assert.equal(await none.stop(), 0);

    const control = dir.path('shared.ctl');
    const first = await startMirror({ legs, socketPath: dir.path('first.sock'), args: ['--control', control] });
    const second = await runMirrorCli(['--leg', legs[0] ?? '', '--leg', legs[1] ?? '', '--socket', dir.path('second.sock'), '--control', control, '--log-level', 'warn']);
    assert.equal(second.status, 1, `a second daemon on a live control path exits 1:\n${second.stderr}`);
    assert.match(second.stderr, /enbd: error: --control .*shared\.ctl is in use: another process accepts connections on it/);
    assert.ok(!existsSync(dir.path('second.sock')), 'the refused daemon bound none of its listeners');
    await statusOk(control);

    assert.equal(await first.stop('SIGKILL'), 128);
    assert.ok(existsSync(control), 'SIGKILL leaves the socket file behind');
    const third = await startMirrorArgs(['--leg', legs[0] ?? '', '--leg', legs[1] ?? '', '--socket', dir.path('third.sock'), '--control', control, '--log-level', 'info']);
    await statusOk(control);
    assert.match(third.stderr(), /removed a stale control socket/);
    assert.equal(await third.stop(), 0);
  });
});
