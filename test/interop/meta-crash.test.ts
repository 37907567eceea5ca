/**
 * Crash safety of on-leg metadata (issue 11): a real `enbd mirror --metadata leg` on two nbdkit
 * file legs is SIGKILLed under a fio random-write load (crc32c verify headers), at a random
 * moment, several times in a row. After each kill the daemon is started again on the same legs;
 * it must see the unclean stop, resync what the write-intent bitmap marks from leg 0, and then:
 * - the legs' data areas are identical byte for byte (the writes in flight at the kill may have
 *   reached one leg and not the other; the resync must settle them);
 * - a fio verify-only pass over a region written (and fsynced) before the first kill passes,
 *   and a fresh fio write+verify pass over the crashed region passes;
 * - the diagnostic says how many 4 KiB blocks differed between the legs right after the kill
 *   and how many MiB the restart resynced against the device size.
 * Leg 1 sits behind nbdkit's delay filter (writes 15 ms slower) so that the kill usually finds
 * writes that reached leg 0 only.
 * fio cannot verify the writes of the killed job itself (which ones landed is unknowable to
 * it), so the crashed region is checked by the byte comparison of the legs.
 *
 * Threads: test process main thread; nbdkit, the daemon and fio are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { requires, runOk, scratch, startChild, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { assertSameBytes, stopAllMirrors } from '../helpers/mirror.js';
import { MetaLegs, assembledRecord, createArray, dataSizeOf, examine, logRecords, startMetaMirror, type MetaMirror } from '../helpers/meta-legs.js';

const kMiB = 1024 * 1024;
const kLegBytes = 32 * kMiB;
const kBlock = 4096;
/** Written once before the first kill and verified after every restart. */
const kBaseOffset = 0;
const kBaseBytes = 8 * kMiB;
/** The region under load at each kill. */
const kLoadOffset = 8 * kMiB;
const kLoadBytes = 16 * kMiB;
const kKills = 3;

function fioArgs(uri: string, name: string, offsetBytes: number, sizeBytes: number, extra: string[]): string[] {
  return [
    `--name=${name}`, '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', `--bs=${kBlock}`,
    `--offset=${offsetBytes}`, `--size=${sizeBytes}`, '--iodepth=16', '--verify=crc32c',
    '--verify_fatal=1', '--verify_state_save=0', ...extra,
  ];
}

function differingBlocks(left: Buffer, right: Buffer, offsetBytes: number, lengthBytes: number): number {
  let count = 0;
  for (let at = offsetBytes; at < offsetBytes + lengthBytes; at += kBlock) {
    if (!left.subarray(at, at + kBlock).equals(right.subarray(at, at + kBlock))) count += 1;
  }
  return count;
}

describe('enbd mirror --metadata leg: SIGKILL under fio load, restart, resync', { skip: skipUnlessTools('nbdkit', 'fio'), timeout: 120_000 }, () => {
  let dir: Scratch;
  let legs: MetaLegs;

  before(() => {
    dir = scratch('enbd-meta-crash-');
    legs = new MetaLegs(dir, kLegBytes);
  });

  after(async () => {
    await stopAllMirrors();
    await legs.stopAll();
    dir?.cleanup();
  });

  test(`${kKills} kills at random moments: legs identical after each restart's resync, fio verify passes`, async (t) => {
    if (!requires(t, 'nbdkit', 'fio')) return;
    const a = await legs.leg('crash-a');
    // Leg 1 writes a little slower, so the writes in flight at a kill have often reached leg 0
    // and not leg 1: the legs really differ before the resync.
    const b = await legs.leg('crash-b', ['--filter=delay', 'delay-write=15ms']);
    await createArray([a, b], ['--assume-clean']);
    const dataSize = await dataSizeOf(a);
    assert.ok(kLoadOffset + kLoadBytes <= dataSize, 'the load region lies inside the data area');
    let mirror: MetaMirror = await startMetaMirror(dir, [a, b], 'crash-0');
    try {
      const base = fioArgs(mirror.mirror.uri, 'base', kBaseOffset, kBaseBytes, ['--randseed=4242']);
      await runOk('fio', [...base, '--do_verify=0', '--end_fsync=1'], { timeoutMs: 60_000 });

      for (let kill = 1; kill <= kKills; kill += 1) {
        const uri = mirror.mirror.uri;
        const before = (await mirror.control.status()).stats.writeRequests;
        const load = startChild('fio', fioArgs(uri, `load${kill}`, kLoadOffset, kLoadBytes, [`--randseed=${1000 + kill}`, '--do_verify=0', '--time_based', '--runtime=20']));
        // Kill at a random moment once the load is flowing.
        const deadline = Date.now() + 20_000;
        while ((await mirror.control.status()).stats.writeRequests < before + 200) {
          assert.ok(Date.now() < deadline, `fio's writes reach the mirror:\n${load.output()}`);
          await sleep(20);
        }
        const delayMs = Math.floor(Math.random() * 1500);
        await sleep(delayMs);
        const writesAtKill = (await mirror.control.status()).stats.writeRequests - before;
        mirror.control.close();
        assert.equal(await mirror.mirror.stop('SIGKILL'), 128, 'the daemon died of SIGKILL');
        // fio sees the connection die; it may also hang on it, so it gets SIGKILL after a grace.
        const fioExit = await Promise.race([
          new Promise<number | null>((resolve) => load.process.once('exit', (code) => resolve(code))),
          sleep(2000).then(async () => await load.stop('SIGKILL')),
        ]);
        const legA = a.dataArea(dataSize);
        const legB = b.dataArea(dataSize);
        const differed = differingBlocks(legA, legB, 0, dataSize);
        const sb = await examine(a.uri);
        assert.equal(sb.superblock?.state, 'active', 'the killed daemon left its claim (state active)');
        assert.notEqual(sb.superblock?.owner, null);

        mirror = await startMetaMirror(dir, [a, b], `crash-${kill}`);
        const stderr = mirror.mirror.stderr();
        const role0 = assembledRecord(stderr, 0);
        const role1 = assembledRecord(stderr, 1);
        assert.equal(role0.role, 'in-sync', `leg 0 is the source after the unclean stop: ${JSON.stringify(role0)}`);
        assert.equal(role1.role, 'bitmap-resync', `leg 1 resyncs the marked chunks after the unclean stop: ${JSON.stringify(role1)}`);
        assert.ok(logRecords(stderr, 'assembly').some((record) => /stale claim/.test(String(record['note']))), `the restart took over the stale claim:\n${stderr.slice(0, 3000)}`);
        await mirror.control.waitStates(['in-sync', 'in-sync'], 30_000);
        const marked = Number(role1.dirtyBytes);
        const copied = (await mirror.control.legs())[1]?.resyncedBytes ?? Number.NaN;
        t.diagnostic(`kill ${kill}: ${delayMs} ms into the load (${writesAtKill} writes), fio exit ${String(fioExit)}; ${differed} blocks differed between the legs; leg 1 marked ${(marked / kMiB).toFixed(2)} MiB, resynced ${(copied / kMiB).toFixed(2)} MiB (status resyncedBytes) of ${(dataSize / kMiB).toFixed(2)} MiB`);
        assert.ok(marked < dataSize, 'a bitmap resync, not a full copy');
        assert.ok(copied <= marked, `the restart copied no more than the bitmap marked (${copied} of ${marked} bytes)`);
        assertSameBytes(b.dataArea(dataSize), a.dataArea(dataSize), `kill ${kill}: leg data areas after the resync`);
        await runOk('fio', [...fioArgs(mirror.mirror.uri, 'base', kBaseOffset, kBaseBytes, ['--randseed=4242']), '--verify_only=1'], { timeoutMs: 60_000 });
      }
      // The crashed region still takes writes and reads them back verified.
      await runOk('fio', [...fioArgs(mirror.mirror.uri, 'after', kLoadOffset, kLoadBytes, ['--randseed=77']), '--do_verify=1'], { timeoutMs: 60_000 });
      await mirror.control.waitStates(['in-sync', 'in-sync']);
      assert.equal(await mirror.stop('SIGTERM'), 0, 'clean stop at the end');
      assertSameBytes(b.dataArea(dataSize), a.dataArea(dataSize), 'leg data areas after the clean stop');
      const final = await examine(b.uri);
      assert.equal(final.superblock?.state, 'clean');
      assert.equal(final.superblock?.owner, null);
      assert.equal(final.dirtyChunks, 0, 'a clean stop with every leg in sync zeroes the bitmap');
    } finally {
      if (mirror.mirror.alive()) await mirror.stop('SIGKILL');
    }
  });
});
