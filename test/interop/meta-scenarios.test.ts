/**
 * The operator scenarios of issue 11 against real `enbd mirror --metadata leg` processes whose
 * legs are nbdkit file servers (stopped, restarted, blanked and corrupted between or during
 * runs). Each one checks real outcomes: bytes read through the mirror, the legs' data areas
 * compared byte for byte after the resync, exit status and error text of refusals, and what
 * `enbd examine --json` reports.
 *
 * | scenario                 | what is done                                              | promise checked                    |
 * |--------------------------|-----------------------------------------------------------|------------------------------------|
 * | restart while degraded   | B down, write+flush, SIGTERM, B back, start                | B resyncs; new data everywhere, also from B alone |
 * | blank leg at runtime     | B's nbdkit restarted on a blank file while enbd runs      | full resync, legs identical        |
 * | blank leg at restart     | B's file blanked between runs                              | full resync, legs identical        |
 * | torn superblock          | the newest copy of A's superblock overwritten             | examine: invalid, other copy used; mirror assembles |
 *
 * The refusals (other arrays, no metadata, split brain, two daemons) are in meta-refusals.test.ts.
 *
 * Threads: test process main thread; nbdkit, the daemon and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, writeSync } from 'node:fs';
import { NbdClient } from '../../src/nbd/client/client.js';
import { scratch, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { assertSameBytes, readNbd, stopAllMirrors } from '../helpers/mirror.js';
import { MetaLegs, assembledRecord, createArray, dataSizeOf, enbd, examine, logRecords, startMetaMirror, writeFlush, assertLegsIdentical } from '../helpers/meta-legs.js';

const kMiB = 1024 * 1024;
const kLegBytes = 32 * kMiB;



describe('enbd mirror --metadata leg: issue 11 scenarios on nbdkit file legs', { skip: skipUnlessTools('nbdkit'), timeout: 120_000 }, () => {
  let dir: Scratch;
  let legs: MetaLegs;

  before(() => {
    dir = scratch('enbd-meta-scen-');
    legs = new MetaLegs(dir, kLegBytes);
  });

  after(async () => {
    await stopAllMirrors();
    await legs.stopAll();
    dir?.cleanup();
  });

  test('restart while degraded: the stale leg resyncs; every read, and leg 1 alone, return the new data', async () => {
    const a = await legs.leg('s1-a');
    const b = await legs.leg('s1-b');
    await createArray([a, b], ['--assume-clean']);
    const dataSize = await dataSizeOf(a);
    const at = 4 * kMiB;
    const oldData = randomBytes(2 * kMiB);
    const newData = randomBytes(2 * kMiB);

    const first = await startMetaMirror(dir, [a, b], 's1-run1');
    await writeFlush(first.mirror.uri, at, oldData);
    await first.control.waitStates(['in-sync', 'in-sync']);
    await b.stop();
    await writeFlush(first.mirror.uri, at, newData);
    await first.control.waitLeg(1, 'out of sync', (leg) => leg.state !== 'in-sync');
    assert.equal(await first.stop('SIGTERM'), 0, `clean stop:\n${first.mirror.stderr()}`);
    assertSameBytes(b.dataArea(dataSize).subarray(at, at + oldData.length), oldData, 'leg 1 file still holds the old bytes');
    const examinedA = await examine(a.uri);
    assert.equal(examinedA.superblock?.state, 'clean');
    assert.notEqual(examinedA.superblock?.members[1]?.state, 'in-sync', `leg 0 records leg 1 as stale: ${JSON.stringify(examinedA.superblock?.members)}`);

    await b.start();
    const second = await startMetaMirror(dir, [a, b], 's1-run2');
    try {
      const assembled = assembledRecord(second.mirror.stderr(), 1);
      assert.equal(assembled.role, 'bitmap-resync', `leg 1 comes up stale, resyncing what the bitmap marks: ${JSON.stringify(assembled)}`);
      assert.match(String(assembled.why), /stale/);
      assert.ok(Number(assembled.dirtyBytes) >= newData.length, `leg 1 has at least the missed write to copy: ${JSON.stringify(assembled)}`);
      assert.equal(assembledRecord(second.mirror.stderr(), 0).role, 'in-sync');
      await second.control.waitStates(['in-sync', 'in-sync']);
      for (let round = 0; round < 8; round += 1) {
        assertSameBytes(await readNbd(second.mirror.uri, at, newData.length), newData, `read ${round} through the mirror`);
      }
      const area = assertLegsIdentical([a, b], dataSize, 'after the resync');
      assertSameBytes(area.subarray(at, at + newData.length), newData, 'the legs hold the new bytes');
      assert.equal(await second.control.cliOk(['leg', 'fail', '0']), 'leg 0: failed\n');
      assertSameBytes(await readNbd(second.mirror.uri, at, newData.length), newData, 'read from leg 1 alone');
    } finally {
      assert.equal(await second.stop('SIGTERM'), 0);
    }
  });

  test('blank leg at runtime: leg 1 restarted on an empty file is fully resynced, not "missed no writes"', async () => {
    const a = await legs.leg('s3-a');
    const b = await legs.leg('s3-b');
    await createArray([a, b], ['--assume-clean']);
    const dataSize = await dataSizeOf(a);
    const content = randomBytes(dataSize);
    const run = await startMetaMirror(dir, [a, b], 's3-run');
    try {
      // Every byte of the device is non-trivial, so only a full copy makes the legs equal.
      const client = await NbdClient.connect(run.mirror.uri);
      try {
        for (let offset = 0; offset < dataSize; offset += 4 * kMiB) await client.write(offset, content.subarray(offset, Math.min(dataSize, offset + 4 * kMiB)));
        await client.flush();
      } finally {
        await client.close();
      }
      await run.control.waitStates(['in-sync', 'in-sync']);
      await b.stop();
      b.blank(kLegBytes);
      await b.start();
      // The idle probe notices the lost connection; the reconnect finds a blank leg.
      await run.control.waitLeg(1, 'out of sync at least once', (leg) => leg.state !== 'in-sync' || logRecords(run.mirror.stderr(), 'returning leg is not the one that left: its contents are unknown, full resync').length > 0);
      await run.control.waitStates(['in-sync', 'in-sync'], 30_000);
      const unknown = logRecords(run.mirror.stderr(), 'returning leg is not the one that left: its contents are unknown, full resync');
      assert.equal(unknown.length, 1, `the returning blank leg was recognised as unknown:\n${run.mirror.stderr().slice(-4000)}`);
      assert.match(String(unknown[0]?.['problem']), /no enbd metadata/);
      assertSameBytes(b.dataArea(dataSize), content, 'the blank leg now holds the whole device');
      assertLegsIdentical([a, b], dataSize, 'after the full resync');
      assertSameBytes(await readNbd(run.mirror.uri, 0, dataSize), content, 'read of the whole device');
      assert.equal((await examine(b.uri)).superblock?.arrayUuid, (await examine(a.uri)).superblock?.arrayUuid, 'the blank leg got this array\'s metadata again');
    } finally {
      assert.equal(await run.stop('SIGTERM'), 0);
    }
  });

  test('blank leg at restart: a leg blanked between runs is a new member, fully resynced', async () => {
    const a = await legs.leg('s3r-a');
    const b = await legs.leg('s3r-b');
    await createArray([a, b], ['--assume-clean']);
    const dataSize = await dataSizeOf(a);
    const content = randomBytes(dataSize);
    const first = await startMetaMirror(dir, [a, b], 's3r-run1');
    const client = await NbdClient.connect(first.mirror.uri);
    for (let offset = 0; offset < dataSize; offset += 4 * kMiB) await client.write(offset, content.subarray(offset, Math.min(dataSize, offset + 4 * kMiB)));
    await client.flush();
    await client.close();
    assert.equal(await first.stop('SIGTERM'), 0);
    await b.stop();
    b.blank(kLegBytes);
    await b.start();
    const second = await startMetaMirror(dir, [a, b], 's3r-run2');
    try {
      const assembled = assembledRecord(second.mirror.stderr(), 1);
      assert.equal(assembled.role, 'full-resync', `the blank leg gets a full resync: ${JSON.stringify(assembled)}`);
      await second.control.waitStates(['in-sync', 'in-sync'], 30_000);
      assertSameBytes(b.dataArea(dataSize), content, 'the blanked leg holds the whole device again');
      assertLegsIdentical([a, b], dataSize, 'after the full resync');
      assertSameBytes(await readNbd(second.mirror.uri, 0, dataSize), content, 'read of the whole device');
    } finally {
      assert.equal(await second.stop('SIGTERM'), 0);
    }
  });

  test('torn superblock: the newest copy corrupted; examine says so and uses the other; the mirror assembles', async (t) => {
    const a = await legs.leg('s7-a');
    const b = await legs.leg('s7-b');
    await createArray([a, b], ['--assume-clean']);
    const dataSize = await dataSizeOf(a);
    const data = randomBytes(kMiB);
    const run1 = await startMetaMirror(dir, [a, b], 's7-run1');
    await writeFlush(run1.mirror.uri, 3 * kMiB, data);
    assert.equal(await run1.stop('SIGTERM'), 0);

    const before = await examine(a.uri);
    assert.ok(before.usedCopy !== null);
    const newest = before.copies[before.usedCopy] as { offsetBytes: number; sequence: number | null };
    const other = 1 - before.usedCopy;
    assert.equal(before.copies[other]?.status, 'valid', 'the other copy is valid before the corruption');
    // A torn write: a few bytes in the middle of the newest copy, straight into the leg file.
    const fd = openSync(a.file, 'r+');
    writeSync(fd, Buffer.from([0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04]), 0, 8, newest.offsetBytes + 100);
    closeSync(fd);
    const torn = await examine(a.uri);
    assert.equal(torn.copies[before.usedCopy]?.status, 'invalid', `examine reports the corrupted copy invalid: ${JSON.stringify(torn.copies)}`);
    assert.equal(torn.usedCopy, other, 'examine uses the other copy');
    assert.equal(torn.superblock?.legUuid, before.superblock?.legUuid, 'the same leg identity from the older copy');
    const text = await enbd('examine', a.uri);
    assert.equal(text.status, 0, text.stderr);
    assert.match(text.stdout, new RegExp(`Used : copy ${other} \\(copy ${before.usedCopy} is torn or invalid\\)`));

    const run2 = await startMetaMirror(dir, [a, b], 's7-run2');
    try {
      const roles = [assembledRecord(run2.mirror.stderr(), 0), assembledRecord(run2.mirror.stderr(), 1)];
      t.diagnostic(`assembled with a torn copy on leg 0: ${roles.map((record) => `leg ${String(record.leg)} ${String(record.role)} (${String(record.why)}, ${String(record.dirtyBytes)} bytes marked)`).join('; ')}`);
      await run2.control.waitStates(['in-sync', 'in-sync'], 30_000);
      assertSameBytes(await readNbd(run2.mirror.uri, 3 * kMiB, kMiB), data, 'the data read back');
      assertLegsIdentical([a, b], dataSize, 'after assembling with a torn copy');
    } finally {
      assert.equal(await run2.stop('SIGTERM'), 0);
    }
    const healed = await examine(a.uri);
    assert.deepEqual(healed.copies.map((copy) => copy.status), ['valid', 'valid'], 'the clean stop rewrote the torn copy');
  });
});
