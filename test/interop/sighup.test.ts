/**
 * Issue 12: SIGHUP never stops the daemon.
 * - `enbd mirror --config FILE`: SIGHUP re-reads the file and applies what can change live
 *   (resync rates, log level, the client limits), logging one line with what changed and what
 *   needs a restart; a SIGHUP storm under a running fio client (randwrite with crc32c verify)
 *   gives zero errors, the data reads back, the daemon still serves; an invalid file is
 *   reported and changes nothing.
 * - `enbd mirror` without a config file, and `enbd serve`: SIGHUP is logged and ignored.
 * Threads: test process main thread; the daemon, fio, nbdsh and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import type { StatusResult } from '../../src/control/protocol.js';
import { logLines, scratch, sparseFile, unixUri, waitFor, type LogLine, type Scratch } from '../helpers/tools.js';
import { run, runOk, skipUnlessTools, startServerUnderTest } from '../helpers/serve.js';
import { enbdCli, startMirrorArgs, stopAllMirrors, type MirrorProcess } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;
const kLegBytes = 64 * kMiB;

describe('SIGHUP', { skip: skipUnlessTools('fio', 'nbdsh', 'nbdinfo') }, () => {
  let dir: Scratch;
  let seq = 0;

  before(() => {
    dir = scratch('enbd-sighup-');
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
    assert.equal(result.status, 0, `status exits 0:\n${result.stdout}\n${result.stderr}`);
    return JSON.parse(result.stdout) as StatusResult;
  }

  function reloadLines(mirror: MirrorProcess): LogLine[] {
    return logLines(mirror.stderr()).filter((line) => line.msg.startsWith('SIGHUP'));
  }

  async function hangUp(mirror: MirrorProcess, count: number): Promise<void> {
    const before = reloadLines(mirror).length;
    mirror.process.kill('SIGHUP');
    await waitFor('the SIGHUP log line', () => reloadLines(mirror).length >= before + count, 10_000);
  }

  test('mirror --config: reload applies rates and log level, lists what needs a restart, survives a SIGHUP storm under fio', async () => {
    const config = dir.path('mirror.yaml');
    const socket = dir.path('m.sock');
    const control = dir.path('m.ctl');
    const legs = [legFile(), legFile()];
    const write = (settings: Record<string, string>): void => {
      const lines = [`legs:`, ...legs.map((leg) => `  - ${leg}`), `socket: ${socket}`, `control: ${control}`];
      for (const [key, value] of Object.entries(settings)) lines.push(`${key}: ${value}`);
      writeFileSync(config, lines.join('\n') + '\n');
    };
    write({ logLevel: 'info', resyncRateMin: '32M', legTimeoutMs: '5000' });
    const mirror = await startMirrorArgs(['--config', config, '--placement', 'inline']);
    const uri = unixUri(socket);

    // a change: rates live, legTimeoutMs needs a restart
    write({ logLevel: 'info', resyncRateMin: '64M', resyncRateMax: '1G', legTimeoutMs: '6000' });
    await hangUp(mirror, 1);
    const first = reloadLines(mirror).at(-1) as LogLine;
    assert.equal(first.msg, 'SIGHUP: config reloaded');
    assert.deepEqual(first['changed'], { resyncRateMin: { from: 32 * kMiB, to: 64 * kMiB }, resyncRateMax: { from: 0, to: 1024 * kMiB } });
    assert.deepEqual(first['needsRestart'], ['legTimeoutMs']);
    const status = await statusOf(control);
    assert.equal(status.resync.minBytesPerSecond, 64 * kMiB, 'enbd status shows the reloaded floor');
    assert.equal(status.resync.maxBytesPerSecond, 1024 * kMiB, 'enbd status shows the reloaded ceiling');

    // a SIGHUP storm under fio: no client error, data verified
    await runOk('nbdsh', ['-u', uri, '-c', 'h.pwrite(b"\\xa5" * 65536, 60 * 1024 * 1024)', '-c', 'h.flush()']);
    const fio = run('fio', ['--name=hup', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=4k', '--size=48M', '--iodepth=16',
      '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--norandommap', '--randrepeat=0'], { timeoutMs: 100_000 });
    let fioDone = false;
    void fio.then(() => (fioDone = true));
    let signals = 0;
    const stormStart = reloadLines(mirror).length;
    while (!fioDone) {
      mirror.process.kill('SIGHUP');
      signals += 1;
      await sleep(50);
    }
    const fioResult = await fio;
    assert.equal(fioResult.status, 0, `fio verified every block with zero errors:\n${fioResult.stdout}\n${fioResult.stderr}`);
    assert.match(fioResult.stdout, /err= 0/);
    assert.ok(signals >= 3, `several SIGHUPs reached the daemon while fio ran (${signals})`);
    await waitFor('reload lines of the storm', () => reloadLines(mirror).length > stormStart, 10_000);
    for (const line of reloadLines(mirror).slice(stormStart)) assert.equal(line.msg, 'SIGHUP: config reloaded, nothing to change live');
    const readBack = await runOk('nbdsh', ['-u', uri, '-c', 'assert h.pread(65536, 60 * 1024 * 1024) == b"\\xa5" * 65536']);
    assert.equal(readBack.status, 0, 'the block written before the storm reads back');
    assert.ok(mirror.alive(), 'the daemon survived every SIGHUP');
    assert.equal((await runOk('nbdinfo', ['--size', uri])).stdout.trim(), String(kLegBytes));

    // an invalid file: logged, nothing applied
    writeFileSync(config, 'legs: [unterminated\n');
    mirror.process.kill('SIGHUP');
    await waitFor('the failed reload line', () => logLines(mirror.stderr()).some((line) => line.msg.startsWith('SIGHUP: reload failed')), 10_000);
    assert.equal((await statusOf(control)).resync.minBytesPerSecond, 64 * kMiB, 'the running floor stays');

    // the log level: logged under the old level, then in force
    write({ logLevel: 'warn', resyncRateMin: '64M', resyncRateMax: '1G', legTimeoutMs: '6000' });
    await hangUp(mirror, 1);
    const last = reloadLines(mirror).at(-1) as LogLine;
    assert.deepEqual(last['changed'], { logLevel: { from: 'info', to: 'warn' } });
    assert.equal((await statusOf(control)).daemon.logLevel, 'warn');
    assert.equal(await mirror.stop(), 0, 'a clean stop afterwards');
  });

  test('mirror without --config: SIGHUP logs that there is nothing to reload and the daemon serves on', async () => {
    const socket = dir.path('plain.sock');
    const mirror = await startMirrorArgs(['--leg', legFile(), '--leg', legFile(), '--socket', socket, '--control', 'none', '--log-level', 'info']);
    await hangUp(mirror, 1);
    assert.equal(reloadLines(mirror).at(-1)?.msg, 'SIGHUP ignored: no --config file, nothing to reload');
    assert.ok(mirror.alive());
    await runOk('nbdsh', ['-u', unixUri(socket), '-c', 'h.pwrite(b"z" * 4096, 0)', '-c', 'assert h.pread(4096, 0) == b"z" * 4096']);
    assert.equal(await mirror.stop(), 0);
  });

  test('serve: SIGHUP is logged and ignored', async () => {
    const file = legFile();
    const server = await startServerUnderTest({ file, socketPath: dir.path('serve.sock'), kind: 'enbd', args: ['--log-level', 'info'] });
    server.signal('SIGHUP');
    await waitFor('the SIGHUP line', () => server.output().includes('SIGHUP ignored: enbd serve has no configuration to reload'), 10_000);
    await sleep(200);
    assert.ok(server.alive(), 'enbd serve is still running');
    assert.equal((await runOk('nbdinfo', ['--size', server.uri()])).stdout.trim(), String(kLegBytes));
    assert.deepEqual(await server.stop(), [0]);
  });
});
