/**
 * `enbd serve` driven by QEMU's NBD client (qemu-io, qemu-img), an implementation independent
 * of libnbd: pattern write/read/zero/discard/flush/FUA, info, convert + compare, map.
 * Threads: test process main thread; server and qemu tools are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { readRange, scratch, type Scratch } from '../helpers/tools.js';
import {
  assertServing,
  run,
  runOk,
  type ServerUnderTest,
  skipUnlessTools,
  startServerUnderTest,
} from '../helpers/serve.js';

const kSizeBytes = 32 * 1024 * 1024;
const kImageBytes = 16 * 1024 * 1024;

interface MapRun {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

describe('enbd serve + qemu-io / qemu-img', { skip: skipUnlessTools('qemu-io', 'qemu-img', 'nbdinfo') }, () => {
  let dir: Scratch;
  let server: ServerUnderTest;

  before(async () => {
    dir = scratch('enbd-qemu-');
    writeFileSync(dir.path('disk.img'), '');
    truncateSync(dir.path('disk.img'), kSizeBytes);
    server = await startServerUnderTest({ file: dir.path('disk.img'), socketPath: dir.path('s.sock'), tcp: true });
  });

  after(async () => {
    await server?.stop();
    dir?.cleanup();
  });

  test('qemu-io: write/read/zero/discard/flush/FUA pattern sequence', async () => {
    const result = await runOk('qemu-io', [
      '-f', 'raw',
      '-c', 'write -P 0x5a 0 1M',
      '-c', 'read -P 0x5a 0 1M',
      '-c', 'write -z 1M 64k',
      '-c', 'read -P 0 1M 64k',
      '-c', 'write -P 0x33 2M 1M',
      '-c', 'discard 2M 512k',
      '-c', 'read -P 0x33 2560k 512k',
      '-c', 'flush',
      '-c', 'write -f -P 0x11 4M 4k',
      '-c', 'read -P 0x11 4M 4k',
      '-c', 'aio_write -P 0x22 5M 64k',
      '-c', 'aio_write -P 0x23 6M 64k',
      '-c', 'aio_flush',
      '-c', 'read -P 0x22 5M 64k',
      '-c', 'read -P 0x23 6M 64k',
      server.uri(),
    ]);
    assert.doesNotMatch(result.stdout, /Pattern verification failed|error/i);
    assert.ok(readRange(server.file, 0, 1024 * 1024).equals(Buffer.alloc(1024 * 1024, 0x5a)));
    assert.ok(readRange(server.file, 1024 * 1024, 65536).equals(Buffer.alloc(65536)));
    assert.ok(readRange(server.file, 4 * 1024 * 1024, 4096).equals(Buffer.alloc(4096, 0x11)));
    assert.ok(readRange(server.file, 5 * 1024 * 1024, 65536).equals(Buffer.alloc(65536, 0x22)));
  });

  test('qemu-io: a mismatching pattern read fails (the check can fail)', async () => {
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 8M 64k', server.uri()]);
    const result = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x45 8M 64k', server.uri()]);
    assert.notEqual(result.status, 0, result.stdout);
    assert.match(result.stdout + result.stderr, /Pattern verification failed/);
  });

  test('qemu-io over TCP with --image-opts', async () => {
    const opts = `driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port=${server.port}`;
    await runOk('qemu-io', ['--image-opts', '-c', 'write -P 0x66 9M 128k', '-c', 'read -P 0x66 9M 128k', opts]);
    assert.ok(readRange(server.file, 9 * 1024 * 1024, 131072).equals(Buffer.alloc(131072, 0x66)));
  });

  test('qemu-img info reports the size', async () => {
    for (const uri of [server.uri(), server.tcpUri()]) {
      const info = JSON.parse((await runOk('qemu-img', ['info', '--output=json', uri])).stdout) as {
        'virtual-size': number;
      };
      assert.equal(info['virtual-size'], kSizeBytes);
    }
  });

  test('qemu-img convert -n a random 16 MiB image into the export, compare', async () => {
    const source = randomBytes(kImageBytes);
    // Leave one all-zero MiB so convert has something to skip or zero.
    source.fill(0, 3 * 1024 * 1024, 4 * 1024 * 1024);
    writeFileSync(dir.path('src.img'), source);
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', dir.path('src.img'), server.uri()]);
    const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', dir.path('src.img'), server.uri()]);
    assert.equal(compare.status, 0, compare.stdout + compare.stderr);
    assert.ok(readRange(server.file, 0, kImageBytes).equals(source), 'backing file holds the source bytes');
    // And compare can fail: change one byte of the source.
    const changed = Buffer.from(source);
    changed[12345] = (changed[12345] ?? 0) ^ 0xff;
    writeFileSync(dir.path('changed.img'), changed);
    const differ = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', dir.path('changed.img'), server.uri()]);
    assert.equal(differ.status, 1, differ.stdout + differ.stderr);
  });

  test('qemu-img map: runs cover the export, written data is data', async () => {
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 20M 1M', server.uri()]);
    const runs = JSON.parse((await runOk('qemu-img', ['map', '-f', 'raw', '--output=json', server.uri()])).stdout) as MapRun[];
    let next = 0;
    for (const entry of runs) {
      assert.equal(entry.start, next, 'runs are contiguous');
      if (entry.start < 21 * 1024 * 1024 && entry.start + entry.length > 20 * 1024 * 1024) {
        assert.equal(entry.data, true, `written range mapped as ${JSON.stringify(entry)}`);
        assert.equal(entry.zero, false);
      }
      next = entry.start + entry.length;
    }
    assert.equal(next, kSizeBytes);
    assert.ok(readFileSync(server.file).subarray(20 * 1024 * 1024, 21 * 1024 * 1024).equals(Buffer.alloc(1024 * 1024, 0x77)));
    await assertServing(server);
  });
});
