/**
 * Issue 12: systemd readiness (Type=notify) with a fake NOTIFY_SOCKET receiver: a python3
 * AF_UNIX datagram socket that prints every message as a JSON line and closes the file
 * descriptors systemd-notify's BARRIER=1 passes (as systemd does). Checks: READY=1 arrives only
 * once the export socket accepts, with MAINPID = the daemon and a STATUS (the mirror's leg
 * summary, updated after `enbd leg fail`); STOPPING=1 when the stop begins; NOTIFY_SOCKET is
 * not passed on to the --run command; WATCHDOG=1 keep-alives with WATCHDOG_USEC (serve and
 * mirror), none without it or when WATCHDOG_PID names another process.
 * Threads: test process main thread; the receiver, the daemons and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, openSync } from 'node:fs';
import { scratch, startChild, toolEnv, unixAccepts, waitFor, type Child, type Scratch } from '../helpers/tools.js';
import { run, skipUnlessTools } from '../helpers/serve.js';
import { enbdCli } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;

const kReceiver = `
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print(json.dumps({"listening": True}), flush=True)
while True:
    data, ancillary, flags, address = s.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            for index in range(len(payload) // 4):
                os.close(int.from_bytes(payload[index * 4:index * 4 + 4], sys.byteorder))
    fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
    print(json.dumps(fields), flush=True)
`;

interface Receiver {
  child: Child;
  messages(): Array<Record<string, string>>;
}

describe('Type=notify readiness via NOTIFY_SOCKET', { skip: skipUnlessTools('python3', 'systemd-notify') }, () => {
  let dir: Scratch;
  let seq = 0;
  const children: Child[] = [];

  before(() => {
    dir = scratch('enbd-notify-');
  });

  after(async () => {
    await Promise.all(children.map(async (child) => await child.stop('SIGKILL')));
    dir?.cleanup();
  });

  function file(): string {
    seq += 1;
    const path = dir.path(`f${seq}.img`);
    const fd = openSync(path, 'w');
    ftruncateSync(fd, 8 * kMiB);
    closeSync(fd);
    return path;
  }

  async function receiver(path: string): Promise<Receiver> {
    const child = startChild('/usr/bin/python3', ['-c', kReceiver, path]);
    children.push(child);
    const messages = (): Array<Record<string, string>> => child.output().split('\n').filter((line) => line.startsWith('{'))
      .map((line) => JSON.parse(line) as Record<string, string>).filter((message) => message['listening'] === undefined && message['BARRIER'] === undefined);
    await waitFor('the fake receiver', () => child.output().includes('"listening"'), 10_000);
    return { child, messages };
  }

  test('serve: READY=1 only once the socket accepts, MAINPID, STATUS; STOPPING=1 on SIGTERM', async () => {
    const notifySocket = dir.path('notify1');
    const fake = await receiver(notifySocket);
    const socket = dir.path('serve.sock');
    const daemon = startChild(process.execPath, [enbdCli, 'serve', file(), '-U', socket, '--log-level', 'warn'], { env: { ...toolEnv, NOTIFY_SOCKET: notifySocket } });
    children.push(daemon);
    await waitFor('READY=1', () => fake.messages().some((message) => message['READY'] === '1'), 20_000);
    assert.ok(await unixAccepts(socket), 'the export socket accepts once READY=1 was sent');
    const ready = fake.messages().find((message) => message['READY'] === '1') ?? {};
    assert.equal(ready['MAINPID'], String(daemon.process.pid));
    assert.match(ready['STATUS'] ?? '', /^serving \/.*\.img$/);
    assert.equal(await daemon.stop('SIGTERM'), 0);
    await waitFor('STOPPING=1', () => fake.messages().some((message) => message['STOPPING'] === '1'), 10_000);
  });

  test('mirror: READY=1 with the leg summary, STATUS after a leg fails, STOPPING=1', async () => {
    const notifySocket = dir.path('notify2');
    const fake = await receiver(notifySocket);
    const socket = dir.path('mirror.sock');
    const control = dir.path('mirror.ctl');
    const daemon = startChild(process.execPath, [enbdCli, 'mirror', '--leg', file(), '--leg', file(), '--metadata', 'none', '-U', socket, '--control', control, '--log-level', 'warn'],
      { env: { ...toolEnv, NOTIFY_SOCKET: notifySocket } });
    children.push(daemon);
    await waitFor('READY=1', () => fake.messages().some((message) => message['READY'] === '1'), 20_000);
    assert.ok(await unixAccepts(socket));
    assert.equal(fake.messages().find((message) => message['READY'] === '1')?.['STATUS'], '2/2 legs in sync');
    const failed = await run(process.execPath, [enbdCli, 'leg', 'fail', '1', '--control', control]);
    assert.equal(failed.status, 0, failed.stderr);
    await waitFor('a STATUS naming the failed leg', () => fake.messages().some((message) => message['STATUS'] === '1/2 legs in sync; leg b failed'), 10_000);
    assert.equal(await daemon.stop('SIGTERM'), 0);
    await waitFor('STOPPING=1', () => fake.messages().some((message) => message['STOPPING'] === '1'), 10_000);
  });

  test('watchdog: WATCHDOG=1 keeps arriving with WATCHDOG_USEC (serve and mirror); none without it or for another WATCHDOG_PID', async () => {
    const start = async (name: string, command: 'serve' | 'mirror', watchdog: Record<string, string>): Promise<{ fake: Receiver; daemon: Child }> => {
      const notifySocket = dir.path(`watchdog-${name}`);
      const fake = await receiver(notifySocket);
      const args = command === 'serve'
        ? ['serve', file(), '-U', dir.path(`${name}.sock`), '--log-level', 'warn']
        : ['mirror', '--leg', file(), '--leg', file(), '--metadata', 'none', '-U', dir.path(`${name}.sock`), '--control', dir.path(`${name}.ctl`), '--log-level', 'warn'];
      const daemon = startChild(process.execPath, [enbdCli, ...args], { env: { ...toolEnv, NOTIFY_SOCKET: notifySocket, ...watchdog } });
      children.push(daemon);
      await waitFor(`READY=1 from ${name}`, () => fake.messages().some((message) => message['READY'] === '1'), 45_000);
      return { fake, daemon };
    };
    const pings = (fake: Receiver): number => fake.messages().filter((message) => message['WATCHDOG'] === '1').length;
    const serve = await start('serve', 'serve', { WATCHDOG_USEC: '400000' });
    const mirror = await start('mirror', 'mirror', { WATCHDOG_USEC: '400000', WATCHDOG_PID: '' });
    const none = await start('none', 'serve', {});
    const other = await start('other', 'mirror', { WATCHDOG_USEC: '400000', WATCHDOG_PID: '1' });
    await waitFor('several WATCHDOG=1 from serve and mirror', () => pings(serve.fake) >= 4 && pings(mirror.fake) >= 4, 30_000);
    const pinged = serve.fake.messages().find((message) => message['WATCHDOG'] === '1') ?? {};
    assert.equal(pinged['MAINPID'], String(serve.daemon.process.pid), 'the ping is attributed to the daemon');
    assert.equal(pings(none.fake), 0, 'no WATCHDOG_USEC: no pings');
    assert.equal(pings(other.fake), 0, 'WATCHDOG_PID of another process: no pings');
    for (const { daemon } of [serve, mirror, none, other]) assert.equal(await daemon.stop('SIGTERM'), 0);
    await waitFor('STOPPING=1 despite the pings', () => serve.fake.messages().some((message) => message['STOPPING'] === '1'), 10_000);
  });

  test('the --run command does not inherit NOTIFY_SOCKET', async () => {
    const notifySocket = dir.path('notify3');
    const fake = await receiver(notifySocket);
    const result = await new Promise<{ status: number | null; stdout: string }>((resolveRun) => {
      const child = startChild(process.execPath, [enbdCli, 'serve', file(), '-U', '-', '--log-level', 'warn', '--run', 'echo "notify=[${NOTIFY_SOCKET-unset}]"'],
        { env: { ...toolEnv, NOTIFY_SOCKET: notifySocket } });
      void child.stop('SIGCONT').then((status) => resolveRun({ status, stdout: child.output() }));
    });
    assert.equal(result.status, 0);
    assert.match(result.stdout, /notify=\[unset\]/);
    await waitFor('READY=1', () => fake.messages().some((message) => message['READY'] === '1'), 10_000);
  });
});
