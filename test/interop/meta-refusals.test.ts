/**
 * The refusals of issue 11 against real `enbd mirror --metadata leg` processes on nbdkit file
 * legs, and what the operator does next: legs of two arrays, legs with no metadata, split brain
 * (refused, then converged with --force-source). Claims (two daemons, a member not given) are in
 * meta-claims.test.ts.
 * Each checks the exit status and the error text, that the refused run changed nothing, and the
 * bytes once the operator's next step ran (legs' data areas identical, reads through the mirror).
 *
 * | scenario                 | what is done                                              | promise checked                    |
 * |--------------------------|-----------------------------------------------------------|------------------------------------|
 * | different / foreign legs | A+B and C+D created apart; mirror A+C; legs with no meta  | refused, naming both arrays / enbd create |
 * | split brain              | A alone writes X, B alone writes Y, then A+B              | refused; --force-source 0 converges to A |
 * | no split brain (history) | A+C write X; A+B (B resyncs) write Y; then B+C            | accepted without --force-source: B's  |
 * |                          |                                                           | generation history holds C's; C resyncs |
 *
 * Threads: test process main thread; nbdkit, the daemon and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { NbdClient } from '../../src/nbd/client/client.js';
import { scratch, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { assertSameBytes, readNbd, runMirrorCli, stopAllMirrors } from '../helpers/mirror.js';
import { MetaLegs, createArray, dataSizeOf, examine, kMetaMirrorFlags, startMetaMirror, writeFlush, assertLegsIdentical } from '../helpers/meta-legs.js';

const kMiB = 1024 * 1024;
const kLegBytes = 32 * kMiB;



describe('enbd mirror --metadata leg: issue 11 refusals on nbdkit file legs', { skip: skipUnlessTools('nbdkit'), timeout: 120_000 }, () => {
  let dir: Scratch;
  let legs: MetaLegs;

  before(() => {
    dir = scratch('enbd-meta-refuse-');
    legs = new MetaLegs(dir, kLegBytes);
  });

  after(async () => {
    await stopAllMirrors();
    await legs.stopAll();
    dir?.cleanup();
  });

  test('different arrays are refused naming both; legs with no metadata are refused naming enbd create', async () => {
    const a = await legs.leg('s4-a');
    const b = await legs.leg('s4-b');
    const c = await legs.leg('s4-c');
    const d = await legs.leg('s4-d');
    await createArray([a, b], ['--assume-clean', '--name', 'first']);
    await createArray([c, d], ['--assume-clean', '--name', 'second']);
    const arrayAb = (await examine(a.uri)).superblock?.arrayUuid ?? 'x';
    const arrayCd = (await examine(c.uri)).superblock?.arrayUuid ?? 'y';
    assert.notEqual(arrayAb, arrayCd);
    const mixed = await runMirrorCli(['--leg', a.uri, '--leg', c.uri, '--socket', dir.path('s4.sock'), '--control', 'none', ...kMetaMirrorFlags]);
    assert.notEqual(mixed.status, 0, `mixing arrays is refused:\n${mixed.stdout}\n${mixed.stderr}`);
    assert.notEqual(mixed.status, null, 'the daemon exited rather than serving');
    assert.ok(mixed.stderr.includes(arrayAb) && mixed.stderr.includes(arrayCd), `the refusal names both arrays:\n${mixed.stderr}`);
    assert.match(mixed.stderr, /different arrays/);

    const e = await legs.leg('s4-e');
    const f = await legs.leg('s4-f');
    const none = await runMirrorCli(['--leg', e.uri, '--leg', f.uri, '--socket', dir.path('s4b.sock'), '--control', 'none', ...kMetaMirrorFlags]);
    assert.notEqual(none.status, 0, `legs without metadata are refused:\n${none.stdout}\n${none.stderr}`);
    assert.notEqual(none.status, null);
    assert.match(none.stderr, /enbd create/);
    // Nothing was written to the refused legs.
    assert.equal((await examine(e.uri, false)).usedCopy, null);
    assert.equal((await examine(c.uri)).superblock?.owner, null, 'the refused run left no claim on leg C');
  });

  test('split brain is refused; --force-source 0 converges both legs to leg 0\'s version', async () => {
    const a = await legs.leg('s5-a');
    const b = await legs.leg('s5-b');
    await createArray([a, b], ['--assume-clean']);
    const dataSize = await dataSizeOf(a);
    const common = randomBytes(dataSize);
    const both = await startMetaMirror(dir, [a, b], 's5-both');
    const client = await NbdClient.connect(both.mirror.uri);
    for (let offset = 0; offset < dataSize; offset += 4 * kMiB) await client.write(offset, common.subarray(offset, Math.min(dataSize, offset + 4 * kMiB)));
    await client.flush();
    await client.close();
    assert.equal(await both.stop('SIGTERM'), 0);

    const x = randomBytes(kMiB);
    const y = randomBytes(kMiB);
    const onA = await startMetaMirror(dir, [a], 's5-a', ['--degraded']);
    await writeFlush(onA.mirror.uri, 2 * kMiB, x);
    assert.equal(await onA.stop('SIGTERM'), 0);
    const onB = await startMetaMirror(dir, [b], 's5-b', ['--degraded']);
    await writeFlush(onB.mirror.uri, 8 * kMiB, y);
    assert.equal(await onB.stop('SIGTERM'), 0);
    const versionA = a.dataArea(dataSize);
    assertSameBytes(versionA.subarray(2 * kMiB, 3 * kMiB), x, 'leg 0 holds X');
    assertSameBytes(b.dataArea(dataSize).subarray(8 * kMiB, 9 * kMiB), y, 'leg 1 holds Y');

    const refused = await runMirrorCli(['--leg', a.uri, '--leg', b.uri, '--socket', dir.path('s5.sock'), '--control', 'none', ...kMetaMirrorFlags]);
    assert.notEqual(refused.status, 0, `split brain is refused:\n${refused.stdout}\n${refused.stderr}`);
    assert.notEqual(refused.status, null);
    assert.match(refused.stderr, /split brain/);
    assert.match(refused.stderr, /--force-source/);

    const forced = await startMetaMirror(dir, [a, b], 's5-forced', ['--force-source', '0']);
    try {
      await forced.control.waitStates(['in-sync', 'in-sync'], 30_000);
      assertSameBytes(await readNbd(forced.mirror.uri, 8 * kMiB, kMiB), versionA.subarray(8 * kMiB, 9 * kMiB), 'Y\'s range reads leg 0\'s version');
      assertSameBytes(await readNbd(forced.mirror.uri, 2 * kMiB, kMiB), x, 'X reads back');
      const area = assertLegsIdentical([a, b], dataSize, 'after --force-source 0');
      assertSameBytes(area, versionA, 'both legs equal leg 0\'s version');
    } finally {
      assert.equal(await forced.stop('SIGTERM'), 0);
    }
  });

  test('legs that each record the other stale are no split brain when one went on from the other\'s generation: assembled, the stale one resynced', async () => {
    const a = await legs.leg('s6-a');
    const b = await legs.leg('s6-b');
    const c = await legs.leg('s6-c');
    await createArray([a, b, c], ['--assume-clean']);
    const dataSize = await dataSizeOf(a);
    const x = randomBytes(kMiB);
    const y = randomBytes(kMiB);
    // A + C without B: X. Then A + B without C: B resyncs X from A, then Y.
    const ac = await startMetaMirror(dir, [a, c], 's6-ac', ['--degraded']);
    await writeFlush(ac.mirror.uri, 2 * kMiB, x);
    assert.equal(await ac.stop('SIGTERM'), 0);
    const ab = await startMetaMirror(dir, [a, b], 's6-ab', ['--degraded']);
    await ab.control.waitStates(['in-sync', 'in-sync'], 30_000);
    await writeFlush(ab.mirror.uri, 8 * kMiB, y);
    assert.equal(await ab.stop('SIGTERM'), 0);
    // B records C stale (it left in the A + B run) and C records B stale (the A + C run): the
    // member tables alone look like a split brain. B's history holds C's last generation.
    const onB = (await examine(b.uri)).superblock;
    const onC = (await examine(c.uri)).superblock;
    assert.equal(onB?.members[2]?.state, 'needs-resync');
    assert.equal(onC?.members[1]?.state, 'needs-resync');
    const lastOfC = onC?.generations?.[0];
    assert.ok(lastOfC !== undefined && (onB?.generations ?? []).includes(lastOfC), `B's history ${JSON.stringify(onB?.generations)} holds C's generation ${String(lastOfC)}`);
    assert.ok(!c.dataArea(dataSize).subarray(8 * kMiB, 9 * kMiB).equals(y), 'C lacks Y before the B + C run');

    const bc = await startMetaMirror(dir, [b, c], 's6-bc', ['--degraded']);
    try {
      await bc.control.waitStates(['in-sync', 'in-sync'], 30_000);
      assertSameBytes(await readNbd(bc.mirror.uri, 2 * kMiB, kMiB), x, 'X reads back');
      assertSameBytes(await readNbd(bc.mirror.uri, 8 * kMiB, kMiB), y, 'Y reads back');
      const area = assertLegsIdentical([b, c], dataSize, 'B and C after the resync');
      assertSameBytes(area.subarray(8 * kMiB, 9 * kMiB), y, 'C holds Y now');
    } finally {
      assert.equal(await bc.stop('SIGTERM'), 0);
    }
  });
});
