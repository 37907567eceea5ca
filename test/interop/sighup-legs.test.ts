/**
 * SIGHUP reconciles the config file's legs with the running set, under a running fio client
 * (randwrite with crc32c verify) that must see zero errors:
 * - a leg added to the file is added (named as the file says; full resync to in-sync);
 * - a leg gone from the file is removed;
 * - removing the last in-sync leg is refused: the leg stays and a warning says why;
 * each answered in the log (`SIGHUP: config reloaded` with `changed.legs`).
 * Threads: test process main thread; the daemon, fio and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import type { StatusResult } from '../../src/control/protocol.js';
import { logLines, scratch, sparseFile, unixUri, waitFor, type LogLine, type Scratch } from '../helpers/tools.js';
import { run, skipUnlessTools } from '../helpers/serve.js';
import { enbdCli, startMirrorArgs, stopAllMirrors, type MirrorProcess } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;
const kLegBytes = 32 * kMiB;

describe('SIGHUP: legs added and removed in the config file', { skip: skipUnlessTools('fio') }, () => {
  let dir: Scratch;
  let seq = 0;

  before(() => {
    dir = scratch('enbd-sighup-legs-');
  });

  after(async () => {
    await stopAllMirrors();
    dir?.cleanup();
  });

  function legFile(): string {
    seq += 1;
    return sparseFile(dir.path(`leg${seq}.img`), kLegBytes);
  }

  async function statusOf(control: string): Promise<StatusResult> {
    const result = await run(process.execPath, [enbdCli, 'status', '--json', '--control', control], { timeoutMs: 30_000 });
    return JSON.parse(result.stdout) as StatusResult;
  }

  function reloadLines(mirror: MirrorProcess): LogLine[] {
    return logLines(mirror.stderr()).filter((line) => line.msg.startsWith('SIGHUP'));
  }

  async function hangUp(mirror: MirrorProcess, what: (line: LogLine) => boolean): Promise<LogLine> {
    const before = reloadLines(mirror).length;
    mirror.process.kill('SIGHUP');
    await waitFor('the SIGHUP log lines', () => reloadLines(mirror).slice(before).some(what), 60_000);
    return reloadLines(mirror).slice(before).find(what) as LogLine;
  }

  async function waitLegs(control: string, want: string[]): Promise<void> {
    const wanted = want.map((name) => `${name}:in-sync`).sort().join(' ');
    const deadline = Date.now() + 60_000;
    let seen = '';
    while (Date.now() < deadline) {
      seen = (await statusOf(control)).legs.map((leg) => `${leg.name}:${leg.state}`).sort().join(' ');
      if (seen === wanted) return;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    assert.fail(`timed out waiting for ${wanted}; last ${seen}`);
  }

  test('add, remove, and the refused removal of the last in-sync leg, under fio with zero errors', async () => {
    const config = dir.path('mirror.yaml');
    const socket = dir.path('m.sock');
    const control = dir.path('m.ctl');
    const [a, b, c, d] = [legFile(), legFile(), legFile(), legFile()];
    const write = (legs: string[]): void => {
      writeFileSync(config, [`legs:`, ...legs.map((leg) => `  - ${leg}`), `socket: ${socket}`, `control: ${control}`, 'metadata: none', 'resyncRateMin: 64M', ''].join('\n'));
    };
    write([a, b]);
    const mirror = await startMirrorArgs(['--config', config]);
    const uri = unixUri(socket);
    const fio = run('fio', ['--name=hup', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=4k', '--size=24M', '--iodepth=8',
      '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--norandommap', '--randrepeat=0'], { timeoutMs: 150_000 });

    write([a, b, `spare=${c}`]);
    const added = await hangUp(mirror, (line) => line.msg === 'SIGHUP: config reloaded');
    assert.deepEqual((added['changed'] as Record<string, { to: string[] }>)['legs']?.to, [`a=${a}`, `b=${b}`, `spare=${c}`], 'the log answers with the new set');
    await waitLegs(control, ['a', 'b', 'spare']);

    write([a, `spare=${c}`]);
    await hangUp(mirror, (line) => line.msg === 'SIGHUP: config reloaded');
    await waitLegs(control, ['a', 'spare']);

    // the file now lists only a new leg: it is added, spare goes, a (then the last in-sync leg) stays
    await run(process.execPath, [enbdCli, 'leg', 'fail', 'spare', '--control', control], { timeoutMs: 30_000 });
    write([d]);
    const refused = await hangUp(mirror, (line) => /^SIGHUP: leg a is gone from the config but stays: leg a is the last in-sync leg; refusing to remove it$/.test(line.msg));
    assert.equal(refused['leg'], 'a');
    const status = await statusOf(control);
    assert.ok(status.legs.some((leg) => leg.name === 'a' && leg.state === 'in-sync'), `leg a stays: ${JSON.stringify(status.legs.map((leg) => [leg.name, leg.state]))}`);
    assert.ok(!status.legs.some((leg) => leg.name === 'spare'), 'spare (failed, not the last in-sync) was removed');
    assert.ok(status.legs.some((leg) => leg.uri === d), 'the new leg was added');

    const fioResult = await fio;
    assert.equal(fioResult.status, 0, `fio verified every block with zero errors:\n${fioResult.stdout}\n${fioResult.stderr}`);
    assert.match(fioResult.stdout, /err= 0/);
  });
});
