/**
 * The first sync of an array created without --assume-clean (issue 11), on nbdkit file legs with
 * real `enbd mirror --metadata leg` processes: leg 0 holds an existing image, leg 1 is blank; the
 * first mirror copies leg 0 to leg 1. SIGKILLed in the middle of that copy (throttled so the kill
 * finds it running), the next start must still treat leg 1 as needing a full sync, never as in
 * sync, and finish the copy: the legs' data areas identical, reads equal to the original image,
 * also from leg 1 alone.
 * The issue also asks the first sync to skip ranges every leg reports as zero or hole
 * (base:allocation): the second test checks that leg 1's file keeps leg 0's holes.
 *
 * Threads: test process main thread; nbdkit, the daemon and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, statSync, writeSync } from 'node:fs';
import { scratch, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { assertSameBytes, readNbd, stopAllMirrors } from '../helpers/mirror.js';
import { MetaLegs, assembledRecord, createArray, dataSizeOf, examine, logRecords, startMetaMirror, type FileLeg } from '../helpers/meta-legs.js';

const kMiB = 1024 * 1024;
const kLegBytes = 32 * kMiB;

/** Leg 0's existing image: 12 MiB of data in three runs, the rest a hole. */
function writeImage(leg: FileLeg, dataSize: number): Buffer {
  const image = Buffer.alloc(dataSize);
  for (const [at, length] of [[0, 4 * kMiB], [10 * kMiB, 4 * kMiB], [dataSize - 4 * kMiB, 4 * kMiB]] as const) randomBytes(length).copy(image, at);
  const fd = openSync(leg.file, 'r+');
  for (const [at, length] of [[0, 4 * kMiB], [10 * kMiB, 4 * kMiB], [dataSize - 4 * kMiB, 4 * kMiB]] as const) writeSync(fd, image, at, length, at);
  closeSync(fd);
  return image;
}

describe('enbd mirror --metadata leg: the first sync after enbd create, interrupted by SIGKILL', { skip: skipUnlessTools('nbdkit'), timeout: 120_000 }, () => {
  let dir: Scratch;
  let legs: MetaLegs;

  before(() => {
    dir = scratch('enbd-meta-initial-');
    legs = new MetaLegs(dir, kLegBytes);
  });

  after(async () => {
    await stopAllMirrors();
    await legs.stopAll();
    dir?.cleanup();
  });

  test('a killed first sync resumes as a full sync on the next start; legs identical, image intact', async (t) => {
    const a = await legs.leg('init-a');
    const b = await legs.leg('init-b');
    await createArray([a, b]);
    const dataSize = await dataSizeOf(a);
    assert.equal((await examine(b.uri)).superblock?.members[1]?.state, 'needs-full-sync', 'create records leg 1 as needing the first sync');
    const image = writeImage(a, dataSize);

    const first = await startMetaMirror(dir, [a, b], 'init-1', ['--resync-rate-min', '1M', '--resync-rate-max', '2M']);
    const role = assembledRecord(first.mirror.stderr(), 1);
    assert.equal(role.role, 'full-resync', `the first start copies leg 0 to leg 1: ${JSON.stringify(role)}`);
    const copying = await first.control.waitLeg(1, 'resyncing with progress', (leg) => leg.state === 'resyncing' && (leg.resync?.bytesDone ?? 0) > 0);
    t.diagnostic(`killed with ${copying.resync?.bytesDone ?? 0} of ${copying.resync?.bytesTotal ?? 0} bytes copied`);
    assert.equal(await first.stop('SIGKILL'), 128);
    assert.ok(!b.dataArea(dataSize).equals(image), 'leg 1 did not have the whole image at the kill');

    const second = await startMetaMirror(dir, [a, b], 'init-2');
    try {
      const again = assembledRecord(second.mirror.stderr(), 1);
      assert.equal(again.role, 'full-resync', `after the kill leg 1 still needs the full sync: ${JSON.stringify(again)}`);
      await second.control.waitStates(['in-sync', 'in-sync'], 30_000);
      assertSameBytes(b.dataArea(dataSize), a.dataArea(dataSize), 'leg data areas after the first sync');
      assertSameBytes(a.dataArea(dataSize), image, 'leg 0 still holds the original image');
      assert.equal(await second.control.cliOk(['leg', 'fail', '0']), 'leg a: failed\n');
      assertSameBytes(await readNbd(second.mirror.uri, 0, dataSize), image, 'the image read from leg 1 alone');
    } finally {
      assert.equal(await second.stop('SIGTERM'), 0);
    }
    const done = await examine(b.uri);
    assert.equal(done.superblock?.members[1]?.state, 'in-sync', 'leg 1 is recorded in sync after the first sync ended');
    assert.notEqual(done.superblock?.members[0]?.state, 'in-sync', 'leg 0, failed by hand, is recorded stale');
  });
  test('the first sync skips what leg 0 reports as hole: leg 1 stays sparse', async (t) => {
    const a = await legs.leg('sparse-a');
    const b = await legs.leg('sparse-b');
    await createArray([a, b]);
    const dataSize = await dataSizeOf(a);
    const image = writeImage(a, dataSize);
    const run = await startMetaMirror(dir, [a, b], 'sparse-1');
    try {
      await run.control.waitStates(['in-sync', 'in-sync'], 30_000);
      assertSameBytes(b.dataArea(dataSize), image, 'leg 1 holds the image');
      const allocated = statSync(b.file).blocks * 512;
      const done = logRecords(run.mirror.stderr(), 'resync complete').find((record) => record.leg === 1);
      t.diagnostic(`leg 1 file allocated ${(allocated / kMiB).toFixed(2)} MiB after the first sync (image data 12 MiB of ${(dataSize / kMiB).toFixed(2)} MiB); resync bytesDone ${String(done?.['bytesDone'])}`);
      assert.ok(allocated < dataSize / 2, `leg 1 keeps leg 0's holes: ${allocated} bytes allocated of a ${dataSize}-byte data area`);
    } finally {
      assert.equal(await run.stop('SIGTERM'), 0);
    }
  });
});
