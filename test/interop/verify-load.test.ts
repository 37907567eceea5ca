/**
 * Online verify under load and checksum resync (issue 14) against a real `enbd mirror` over
 * nbdkit file legs (the scribble and repair cases are in verify.test.ts):
 * - verify rounds while fio writes through the export: zero mismatches;
 * - --resync-verify: a leg added with mostly the same bytes gets only the differing chunks
 *   copied (resyncedBytes), the rest is matched (status), and ends identical;
 * - --verify-interval starts checks by itself; `enbd verify stop` ends a rate-limited verify
 *   early; a second start while one runs is refused.
 *
 * Threads: test process main thread; nbdkit, the daemon, the CLI and fio are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { VerifyProgressView } from '../../src/control/protocol.js';
import { run, skipUnlessTools } from '../helpers/serve.js';
import { FileLeg, assertLegsIdentical } from '../helpers/meta-legs.js';
import { VerifyRig, scribble } from '../helpers/verify-rig.js';

const kMiB = 1024 * 1024;
const kLegBytes = 32 * kMiB;
const kChunkBytes = 64 * 1024;

describe('enbd verify: under write load; checksum resync', { skip: skipUnlessTools('nbdkit', 'fio') }, () => {
  let rig: VerifyRig;

  before(() => {
    rig = new VerifyRig('enbd-verify-');
  });

  after(async () => {
    await rig?.close();
  });

  test('verify under a fio write load reports zero mismatches', async () => {
    const [left, right] = await rig.fileLegs(2, randomBytes(kLegBytes)) as [FileLeg, FileLeg];
    const { mirror, control } = await rig.mirrorOf([left.uri, right.uri]);
    try {
      const fio = run('fio', [
        '--name=load', '--ioengine=nbd', `--uri=${mirror.uri}`, '--rw=randwrite', '--bs=4k,64k',
        '--bsrange=4k-128k', '--iodepth=16', `--size=${kLegBytes}`, '--time_based', '--runtime=5',
      ], { timeoutMs: 60_000 });
      let rounds = 0;
      let checked = 0;
      let fioDone = false;
      void fio.then(() => (fioDone = true));
      while (!fioDone || rounds === 0) {
        const result = await rig.verify(control);
        assert.equal(result.mismatchChunks, 0, `round ${rounds}: ${JSON.stringify(result)}`);
        checked += result.bytesChecked;
        rounds += 1;
      }
      const outcome = await fio;
      assert.equal(outcome.status, 0, `fio: ${outcome.stdout}${outcome.stderr}`);
      assert.ok(checked >= kLegBytes, `verified at least the device once under load (${checked} bytes in ${rounds} rounds)`);
      const status = await control.status();
      assert.equal(status.verify?.mismatchChunksTotal, 0);
      assert.deepEqual(status.legs.map((leg) => leg.state), ['in-sync', 'in-sync']);
    } finally {
      control.close();
      await mirror.stop();
    }
    assertLegsIdentical([left, right], kLegBytes, 'after the load');
  });

  test('--resync-verify: a full resync copies only the chunks that differ', async () => {
    const original = randomBytes(kLegBytes);
    const [source, added] = await rig.fileLegs(2, original) as [FileLeg, FileLeg];
    const differing = [2, 50, 51, 400];
    for (const chunk of differing) scribble(added, chunk * kChunkBytes + 777, Buffer.alloc(64, 0x5a));
    const { mirror, control } = await rig.mirrorOf([source.uri], ['--resync-verify']);
    try {
      const out = await control.cliOk(['leg', 'add', added.uri]);
      assert.match(out, /leg b added/);
      const leg = await control.waitLeg(1, 'in-sync', (view) => view.state === 'in-sync', 40_000);
      assert.equal(leg.resyncedBytes, differing.length * kChunkBytes, 'only the differing chunks were copied');
      const status = await control.status();
      assert.deepEqual(status.verify?.resyncVerify, [{ leg: 1, matchedBytes: kLegBytes - differing.length * kChunkBytes, differentBytes: differing.length * kChunkBytes }]);
    } finally {
      control.close();
      await mirror.stop();
    }
    const data = assertLegsIdentical([source, added], kLegBytes, 'after the checksum resync');
    assert.ok(data.equals(original));
    assert.ok(readFileSync(added.file).equals(original));
  });
  test('--verify-interval starts a check on its own', async () => {
    const [left, right] = await rig.fileLegs(2, randomBytes(kLegBytes)) as [FileLeg, FileLeg];
    const { mirror, control } = await rig.mirrorOf([left.uri, right.uri], ['--verify-interval', '300ms', '--verify-threads', '1']);
    try {
      const deadline = Date.now() + 30_000;
      let current: VerifyProgressView | null = null;
      while (Date.now() < deadline) {
        const status = await control.status();
        current = status.verify?.current ?? null;
        assert.equal(status.verify?.threads, 1);
        if (current !== null && !current.running) break;
        await sleep(50);
      }
      assert.ok(current !== null && !current.running, `a scheduled verify ran to its end: ${JSON.stringify(current)}`);
      assert.equal(current.reason, 'schedule');
      assert.equal(current.repair, false);
      assert.equal(current.mismatchChunks, 0);
      assert.equal(current.bytesChecked, kLegBytes);
    } finally {
      control.close();
      await mirror.stop();
    }
  });
  test('verify stop ends a slow verify early; a second start while one runs is refused', async () => {
    const [left, right] = await rig.fileLegs(2, randomBytes(kLegBytes)) as [FileLeg, FileLeg];
    const { mirror, control } = await rig.mirrorOf([left.uri, right.uri]);
    try {
      const client = rig.client(control);
      await client.call('verify.start', { rate: 1024 * 1024 });
      await assert.rejects(client.call('verify.start', {}), /already running/);
      const refused = await control.cli(['verify', 'start', '--range', '5:abc']);
      assert.notEqual(refused.status, 0, 'a bad --range is refused');
      const out = await control.cliOk(['verify', 'stop']);
      assert.match(out, /verify stopped: /);
      const stopped = await rig.waitVerifyDone(control);
      assert.equal(stopped.stopped, true);
      assert.ok(stopped.bytesDone < kLegBytes, `stopped early (${stopped.bytesDone} bytes done)`);
      assert.deepEqual((await client.call('verify.stop', {})).stopped, false, 'nothing left to stop');
    } finally {
      control.close();
      await mirror.stop();
    }
  });
});
