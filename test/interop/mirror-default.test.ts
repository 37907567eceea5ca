/**
 * `enbd mirror` with no --leg: the embedded default. Two sparse 1 GiB file legs and a Unix
 * socket under --data-dir (a scratch dir here) plus TCP (--listen on a free port instead of
 * 10809). The banner names both exports, nbdinfo works on both, a qemu-io write lands
 * identically in both leg files, and a restart reuses the legs (the data persists).
 * Threads: test process main thread; the mirror and tools are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { freePort, readRange, runOk, scratch, unixUri, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { assertFilled, assertSameBytes, enbdCli, runMirrorCli, startMirrorArgs, stopAllMirrors } from '../helpers/mirror.js';

const kGiB = 1024 ** 3;
/** The export: each 1 GiB leg less its enbd metadata, rounded down to the 1 MiB bitmap chunk. */
const kExportBytes = kGiB - 1024 ** 2;
const kPatternOffsetBytes = 512 * 1024 * 1024 + 4096;
const kPatternBytes = 64 * 1024;

describe('enbd mirror: embedded default (no --leg)', { skip: skipUnlessTools('nbdinfo', 'qemu-io') }, () => {
  let dir: Scratch;
  let dataDir: string;

  before(() => {
    dir = scratch('enbd-mirror-default-');
    dataDir = dir.path('data');
  });

  after(async () => {
    await stopAllMirrors();
    dir?.cleanup();
  });

  test('creates two sparse 1 GiB legs, serves Unix + TCP, writes land on both legs', async () => {
    const port = await freePort();
    const mirror = await startMirrorArgs(['--data-dir', dataDir, '--listen', `127.0.0.1:${port}`, '--log-level', 'warn'], dir.dir);
    const legs = [join(dataDir, 'leg0.img'), join(dataDir, 'leg1.img')];
    for (const leg of legs) {
      const stat = statSync(leg);
      assert.equal(stat.size, kGiB, `${leg} is 1 GiB`);
      assert.ok(stat.blocks * 512 < 64 * 1024 * 1024, `${leg} is sparse (${stat.blocks} blocks)`);
    }
    const socketUri = unixUri(join(dataDir, 'enbd.sock'));
    const tcpUri = `nbd://127.0.0.1:${port}/`;
    assert.deepEqual(mirror.uris, [socketUri, tcpUri], `banner:\n${mirror.stdout()}`);
    assert.match(mirror.stdout(), new RegExp(`${kExportBytes} bytes mirrored across 2 legs`));
    assert.ok(mirror.stdout().includes(legs[0] as string) && mirror.stdout().includes(legs[1] as string), 'banner names the legs');
    assert.match(mirror.stdout(), /embedded default/);

    for (const uri of [socketUri, tcpUri]) {
      const size = await runOk('nbdinfo', ['--size', uri]);
      assert.equal(Number(size.stdout.trim()), kExportBytes, `nbdinfo --size ${uri}`);
      const info = await runOk('nbdinfo', ['--json', uri]);
      const parsed = JSON.parse(info.stdout) as { exports: Array<{ 'export-size': number; is_read_only: boolean; can_flush: boolean }> };
      assert.equal(parsed.exports[0]?.['export-size'], kExportBytes);
      assert.equal(parsed.exports[0]?.is_read_only, false);
      assert.equal(parsed.exports[0]?.can_flush, true);
    }

    await runOk('qemu-io', ['-f', 'raw', '-c', `write -P 0x5e ${kPatternOffsetBytes} ${kPatternBytes}`, tcpUri]);
    await runOk('qemu-io', ['-f', 'raw', '-c', `read -P 0x5e ${kPatternOffsetBytes} ${kPatternBytes}`, socketUri]);
    assert.equal(await mirror.stop(), 0, `exit 0 on SIGTERM:\n${mirror.stderr()}`);

    const span = kPatternBytes + 8192;
    const images = legs.map((leg) => readRange(leg, kPatternOffsetBytes - 4096, span));
    assertFilled(images[0] as Buffer, 4096, kPatternBytes, 0x5e, 'leg0.img');
    assertFilled(images[0] as Buffer, 0, 4096, 0, 'leg0.img before the write');
    assertFilled(images[0] as Buffer, 4096 + kPatternBytes, 4096, 0, 'leg0.img after the write');
    assertSameBytes(images[1] as Buffer, images[0] as Buffer, 'leg1.img vs leg0.img');
    // Both legs got enbd metadata on the first start, and a clean stop recorded itself there.
    for (const leg of legs) {
      const examined = JSON.parse((await runOk(process.execPath, [enbdCli, 'examine', leg, '--json'])).stdout) as { superblock: { state: string; owner: unknown; dataSizeBytes: number; members: Array<{ state: string }> } };
      assert.equal(examined.superblock.state, 'clean', `${leg}: state after SIGTERM`);
      assert.equal(examined.superblock.owner, null, `${leg}: no owner after SIGTERM`);
      assert.equal(examined.superblock.dataSizeBytes, kExportBytes);
      assert.deepEqual(examined.superblock.members.map((member) => member.state), ['in-sync', 'in-sync']);
    }
  });

  test('a restart reuses the existing legs: earlier data is still there', async () => {
    const port = await freePort();
    const mirror = await startMirrorArgs(['--data-dir', dataDir, '--listen', `127.0.0.1:${port}`, '--log-level', 'warn'], dir.dir);
    await runOk('qemu-io', ['-f', 'raw', '-c', `read -P 0x5e ${kPatternOffsetBytes} ${kPatternBytes}`, mirror.uri]);
    assert.equal(await mirror.stop(), 0);
  });

  test('a data dir whose leg path is not a regular file: exit 1 naming it', async () => {
    const badDir = dir.path('bad-data');
    mkdirSync(join(badDir, 'leg0.img'), { recursive: true });
    const port = await freePort();
    const result = await runMirrorCli(['--data-dir', badDir, '--listen', `127.0.0.1:${port}`, '--log-level', 'warn'], { cwd: dir.dir });
    assert.equal(result.status, 1, result.stderr);
    assert.match(result.stderr, /^enbd: error: /m);
    assert.ok(result.stderr.includes(join(badDir, 'leg0.img')), result.stderr);
  });
});
