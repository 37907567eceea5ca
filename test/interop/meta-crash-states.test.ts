/**
 * On-leg metadata across a stop in the middle of a leg's trouble (issue 11), with real `enbd
 * mirror --metadata leg` processes on nbdkit file legs:
 * | case                          | what is done                                                | promise checked                    |
 * |-------------------------------|-------------------------------------------------------------|------------------------------------|
 * | crash while degraded          | leg 1 down, write+flush, SIGKILL, leg 1 back, start          | leg 1 resyncs; new data on both legs, from leg 1 alone too |
 * | crash in the middle of resync | leg 1 misses 12 MiB, returns, resync throttled, SIGKILL      | the restart finishes the resync; legs identical |
 * | leg failed by the operator    | `enbd leg fail 0`, write, SIGTERM, start on both (swapped)   | leg 0 resyncs from leg 1; legs identical |
 * | two runs while degraded, a    | 256 MiB legs, 4 KiB chunks (2 bitmap pages): leg 1 down,    | leg 1 resyncs the writes of both   |
 * | two-page bitmap               | write; SIGTERM; run on leg 0 alone (--degraded), write      | runs, in both bitmap pages; legs identical |
 * Bytes are checked through the mirror and in the legs' files (data areas, byte for byte).
 *
 * Threads: test process main thread; nbdkit, the daemon and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readRange, scratch, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { assertSameBytes, readNbd, stopAllMirrors } from '../helpers/mirror.js';
import { MetaLegs, assembledRecord, assertSameDataAreas, createArray, dataSizeOf, examine, startMetaMirror, writeFlush } from '../helpers/meta-legs.js';

const kMiB = 1024 * 1024;
const kLegBytes = 32 * kMiB;


describe('enbd mirror --metadata leg: stops in the middle of a leg\'s trouble', { skip: skipUnlessTools('nbdkit'), timeout: 120_000 }, () => {
  let dir: Scratch;
  let legs: MetaLegs;

  before(() => {
    dir = scratch('enbd-meta-states-');
    legs = new MetaLegs(dir, kLegBytes);
  });

  after(async () => {
    await stopAllMirrors();
    await legs.stopAll();
    dir?.cleanup();
  });

  test('crash while degraded: after SIGKILL the missed write still reaches leg 1', async () => {
    const a = await legs.leg('cd-a');
    const b = await legs.leg('cd-b');
    await createArray([a, b], ['--assume-clean']);
    const dataSize = await dataSizeOf(a);
    const at = 6 * kMiB;
    const oldData = randomBytes(kMiB);
    const newData = randomBytes(kMiB);
    const first = await startMetaMirror(dir, [a, b], 'cd-1');
    await writeFlush(first.mirror.uri, at, oldData);
    await b.stop();
    await writeFlush(first.mirror.uri, at, newData);
    await first.control.waitLeg(1, 'out of sync', (leg) => leg.state !== 'in-sync');
    assert.equal(await first.stop('SIGKILL'), 128);
    await b.start();
    const second = await startMetaMirror(dir, [a, b], 'cd-2');
    try {
      const role1 = assembledRecord(second.mirror.stderr(), 1);
      assert.equal(role1.role, 'bitmap-resync', `leg 1 is stale: ${JSON.stringify(role1)}`);
      assert.ok(Number(role1.dirtyBytes) >= newData.length, `leg 1 has the missed write to copy: ${JSON.stringify(role1)}`);
      await second.control.waitStates(['in-sync', 'in-sync']);
      assertSameBytes(b.dataArea(dataSize), a.dataArea(dataSize), 'leg data areas after the resync');
      assertSameBytes(a.dataArea(dataSize).subarray(at, at + kMiB), newData, 'the legs hold the new bytes');
      assert.equal(await second.control.cliOk(['leg', 'fail', '0']), 'leg a: failed\n');
      assertSameBytes(await readNbd(second.mirror.uri, at, kMiB), newData, 'read from leg 1 alone');
    } finally {
      assert.equal(await second.stop('SIGTERM'), 0);
    }
  });

  test('crash in the middle of a resync: the restart resyncs the rest; legs identical', async (t) => {
    const a = await legs.leg('cr-a');
    const b = await legs.leg('cr-b');
    await createArray([a, b], ['--assume-clean']);
    const dataSize = await dataSizeOf(a);
    const missed = randomBytes(12 * kMiB);
    const first = await startMetaMirror(dir, [a, b], 'cr-1', ['--resync-rate-min', '1M', '--resync-rate-max', '2M']);
    await b.stop();
    await writeFlush(first.mirror.uri, 2 * kMiB, missed);
    await first.control.waitLeg(1, 'out of sync', (leg) => leg.state !== 'in-sync');
    await b.start();
    const resyncing = await first.control.waitLeg(1, 'resyncing with progress', (leg) => leg.state === 'resyncing' && (leg.resync?.bytesDone ?? 0) > 0);
    t.diagnostic(`killed with ${resyncing.resync?.bytesDone ?? 0} of ${resyncing.resync?.bytesTotal ?? 0} bytes resynced`);
    assert.ok((resyncing.resync?.bytesLeft ?? 0) > 0, 'the resync is not finished at the kill');
    assert.equal(await first.stop('SIGKILL'), 128);
    assert.ok(!b.dataArea(dataSize).subarray(2 * kMiB, 14 * kMiB).equals(missed), 'leg 1 did not have all of the missed write at the kill');
    const second = await startMetaMirror(dir, [a, b], 'cr-2');
    try {
      const role1 = assembledRecord(second.mirror.stderr(), 1);
      assert.notEqual(role1.role, 'in-sync', `leg 1 is not trusted after the interrupted resync: ${JSON.stringify(role1)}`);
      await second.control.waitStates(['in-sync', 'in-sync'], 30_000);
      assertSameBytes(b.dataArea(dataSize), a.dataArea(dataSize), 'leg data areas after the second resync');
      assertSameBytes(a.dataArea(dataSize).subarray(2 * kMiB, 14 * kMiB), missed, 'the legs hold the missed write');
      assert.equal(await second.control.cliOk(['leg', 'fail', '0']), 'leg a: failed\n');
      assertSameBytes(await readNbd(second.mirror.uri, 2 * kMiB, missed.length), missed, 'read from leg 1 alone');
    } finally {
      assert.equal(await second.stop('SIGTERM'), 0);
    }
  });

  test('a leg failed by the operator stays stale across a clean restart (legs given in swapped order)', async () => {
    const a = await legs.leg('of-a');
    const b = await legs.leg('of-b');
    await createArray([a, b], ['--assume-clean']);
    const dataSize = await dataSizeOf(a);
    const at = 10 * kMiB;
    const data = randomBytes(2 * kMiB);
    const first = await startMetaMirror(dir, [a, b], 'of-1');
    await writeFlush(first.mirror.uri, at, randomBytes(2 * kMiB));
    assert.equal(await first.control.cliOk(['leg', 'fail', '0']), 'leg a: failed\n');
    await writeFlush(first.mirror.uri, at, data);
    assert.equal(await first.stop('SIGTERM'), 0);
    const examinedB = await examine(b.uri);
    assert.notEqual(examinedB.superblock?.members[0]?.state, 'in-sync', `leg 1 records leg 0 as stale: ${JSON.stringify(examinedB.superblock?.members)}`);
    // Swapped: leg B is --leg 0 now, leg A (the failed one) --leg 1.
    const second = await startMetaMirror(dir, [b, a], 'of-2');
    try {
      const roleA = assembledRecord(second.mirror.stderr(), 1);
      assert.equal(roleA.role, 'bitmap-resync', `the failed leg resyncs: ${JSON.stringify(roleA)}`);
      assert.equal(assembledRecord(second.mirror.stderr(), 0).role, 'in-sync');
      await second.control.waitStates(['in-sync', 'in-sync']);
      assertSameBytes(a.dataArea(dataSize), b.dataArea(dataSize), 'leg data areas after the resync');
      assertSameBytes(a.dataArea(dataSize).subarray(at, at + data.length), data, 'the failed leg got the write it missed');
      for (let round = 0; round < 6; round += 1) assertSameBytes(await readNbd(second.mirror.uri, at, data.length), data, `read ${round}`);
    } finally {
      assert.equal(await second.stop('SIGTERM'), 0);
    }
  });
  test('two runs while degraded with a two-page bitmap: leg 1 gets the writes of both runs', async () => {
    const legBytes = 256 * kMiB;
    const a = await legs.leg('tp-a', [], legBytes);
    const b = await legs.leg('tp-b', [], legBytes);
    await createArray([a, b], ['--assume-clean', '--bitmap-chunk', '4K']);
    const examined = await examine(a.uri);
    const dataSize = examined.superblock?.dataSizeBytes ?? 0;
    assert.ok((examined.dirtyChunks ?? 0) === 0 && dataSize / 4096 > 32768, 'more chunks than one 4 KiB bitmap page holds');
    const writes = [
      { at: 1 * kMiB, data: randomBytes(64 * 1024), run: 1 },
      { at: 200 * kMiB + 4096, data: randomBytes(64 * 1024), run: 1 },
      { at: 230 * kMiB, data: randomBytes(128 * 1024), run: 2 },
      { at: 3 * kMiB, data: randomBytes(8 * 1024), run: 2 },
    ];
    const first = await startMetaMirror(dir, [a, b], 'tp-1');
    for (const one of writes) await writeFlush(first.mirror.uri, one.at, randomBytes(one.data.length));
    await b.stop();
    for (const one of writes.filter((entry) => entry.run === 1)) await writeFlush(first.mirror.uri, one.at, one.data);
    await first.control.waitLeg(1, 'out of sync', (leg) => leg.state !== 'in-sync');
    assert.equal(await first.stop('SIGTERM'), 0);
    const alone = await startMetaMirror(dir, [a], 'tp-2', ['--degraded']);
    for (const one of writes.filter((entry) => entry.run === 2)) await writeFlush(alone.mirror.uri, one.at, one.data);
    assert.equal(await alone.stop('SIGTERM'), 0);
    const marked = (await examine(a.uri)).dirtyChunks ?? 0;
    assert.ok(marked >= (2 * 64 * 1024 + 128 * 1024 + 8 * 1024) / 4096, `leg 0's bitmap still marks every write leg 1 missed (${marked} chunks)`);

    await b.start();
    const both = await startMetaMirror(dir, [a, b], 'tp-3');
    try {
      const role1 = assembledRecord(both.mirror.stderr(), 1);
      assert.equal(role1.role, 'bitmap-resync', `leg 1 is stale: ${JSON.stringify(role1)}`);
      await both.control.waitStates(['in-sync', 'in-sync'], 30_000);
      assertSameDataAreas(a, b, dataSize, 'after the resync');
      for (const one of writes) assertSameBytes(readRange(b.file, one.at, one.data.length), one.data, `leg 1 holds the run-${one.run} write at ${one.at}`);
      assert.equal(await both.control.cliOk(['leg', 'fail', '0']), 'leg a: failed\n');
      for (const one of writes) assertSameBytes(await readNbd(both.mirror.uri, one.at, one.data.length), one.data, `read from leg 1 alone at ${one.at}`);
    } finally {
      assert.equal(await both.stop('SIGTERM'), 0);
    }
  });
});
