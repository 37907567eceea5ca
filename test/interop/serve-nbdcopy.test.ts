/**
 * `enbd serve` under nbdcopy: parallel multi-connection copy in (file -> export) and out
 * (export -> file), the synchronous one-connection path, and nbd -> nbd between two enbd
 * instances. Every copy is checked byte for byte against the source.
 * Threads: test process main thread; servers and nbdcopy are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { scratch, type Scratch } from '../helpers/tools.js';
import {
  assertServing,
  run,
  runOk,
  type ServerUnderTest,
  skipUnlessTools,
  startServerUnderTest,
} from '../helpers/serve.js';

const kSizeBytes = 32 * 1024 * 1024;

function sparseFile(path: string, sizeBytes: number): void {
  writeFileSync(path, '');
  truncateSync(path, sizeBytes);
}

/** Random data with a zero MiB and a short zero run, so nbdcopy's zero detection is exercised. */
function randomImage(sizeBytes: number): Buffer {
  const image = randomBytes(sizeBytes);
  image.fill(0, 2 * 1024 * 1024, 3 * 1024 * 1024);
  image.fill(0, 5 * 1024 * 1024 + 100, 5 * 1024 * 1024 + 70_000);
  return image;
}

describe('enbd serve + nbdcopy', { skip: skipUnlessTools('nbdcopy', 'nbdinfo') }, () => {
  let dir: Scratch;
  let first: ServerUnderTest;
  let second: ServerUnderTest;

  before(async () => {
    dir = scratch('enbd-nbdcopy-');
    sparseFile(dir.path('a.img'), kSizeBytes);
    sparseFile(dir.path('b.img'), kSizeBytes);
    first = await startServerUnderTest({ file: dir.path('a.img'), socketPath: dir.path('a.sock'), tcp: true });
    second = await startServerUnderTest({ file: dir.path('b.img'), socketPath: dir.path('b.sock') });
  });

  after(async () => {
    await first?.stop();
    await second?.stop();
    dir?.cleanup();
  });

  test('copy in (file -> export, multi-conn) and out (export -> file)', async () => {
    const source = randomImage(kSizeBytes);
    writeFileSync(dir.path('src.img'), source);
    await runOk('nbdcopy', ['--flush', dir.path('src.img'), first.uri()]);
    assert.ok(readFileSync(first.file).equals(source), 'backing file equals the source');
    await runOk('nbdcopy', [first.uri(), dir.path('out.img')]);
    assert.ok(readFileSync(dir.path('out.img')).equals(source), 'copied-out file equals the source');
    await runOk('nbdcopy', [first.tcpUri(), dir.path('out-tcp.img')]);
    assert.ok(readFileSync(dir.path('out-tcp.img')).equals(source), 'copy out over TCP');
  });

  test('synchronous, one connection, 64 KiB requests', async () => {
    const source = randomImage(kSizeBytes);
    writeFileSync(dir.path('sync.img'), source);
    await runOk('nbdcopy', ['--synchronous', '--request-size=65536', '--connections=1', dir.path('sync.img'), first.uri()]);
    assert.ok(readFileSync(first.file).equals(source));
    await runOk('nbdcopy', ['--synchronous', '--connections=1', first.uri(), dir.path('sync-out.img')]);
    assert.ok(readFileSync(dir.path('sync-out.img')).equals(source));
  });

  test('nbd -> nbd between two servers', async () => {
    const source = randomImage(kSizeBytes);
    writeFileSync(dir.path('n2n.img'), source);
    await runOk('nbdcopy', [dir.path('n2n.img'), first.tcpUri()]);
    await runOk('nbdcopy', ['--flush', first.uri(), second.uri()]);
    assert.ok(readFileSync(second.file).equals(source), 'second backing file equals the source');
    // Streaming to stdout also works and matches.
    const streamed = await run('sh', ['-c', `nbdcopy '${second.uri()}' - | cmp - '${dir.path('n2n.img')}'`]);
    assert.equal(streamed.status, 0, streamed.stdout + streamed.stderr);
    await assertServing(first);
    await assertServing(second);
  });

  test('copy to a smaller destination fails (the copy check can fail)', async () => {
    writeFileSync(dir.path('big.img'), Buffer.alloc(kSizeBytes + 4096, 1));
    const result = await run('nbdcopy', [dir.path('big.img'), first.uri()]);
    assert.notEqual(result.status, 0);
    await assertServing(first);
  });
});
