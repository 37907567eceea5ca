/**
 * Online verify and checksum resync (issue 14) against a real `enbd mirror` over nbdkit file
 * legs, driven with the real CLI (`enbd verify start|stop`, `enbd status --json`, `enbd leg add`):
 * - bytes scribbled on one leg's file behind the mirror's back: verify reports exactly those
 *   chunks (count and logged ranges), --repair makes the legs byte-identical from the
 *   reference (leg 0 with two legs; the majority with three), a second verify finds nothing;
 * (verify under a fio load and checksum resync: verify-load.test.ts)
 *
 * Threads: test process main thread; nbdkit, the daemon, the CLI and fio are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { VerifyProgressView } from '../../src/control/protocol.js';
import { freePort } from '../helpers/tools.js';
import { parseExposition, valueOf } from '../unit/metrics/exposition.js';
import { skipUnlessTools } from '../helpers/serve.js';
import type { MirrorProcess } from '../helpers/mirror.js';
import { FileLeg, assertLegsIdentical, logRecords } from '../helpers/meta-legs.js';
import type { MirrorControl } from '../helpers/fault-legs.js';
import { VerifyRig, scribble } from '../helpers/verify-rig.js';

const kMiB = 1024 * 1024;
const kLegBytes = 32 * kMiB;
const kChunkBytes = 64 * 1024;

describe('enbd verify: online check and repair', { skip: skipUnlessTools('nbdkit') }, () => {
  let rig: VerifyRig;

  before(() => {
    rig = new VerifyRig('enbd-verify-');
  });

  after(async () => {
    await rig?.close();
  });

  /** `enbd verify start ARGS` with the real CLI, then waits for it to end. */
  async function verifyCli(control: MirrorControl, args: string[] = []): Promise<VerifyProgressView> {
    const out = await control.cliOk(['verify', 'start', ...args]);
    assert.match(out, /verify .*started/);
    return await rig.waitVerifyDone(control);
  }

  function mismatchOffsets(mirror: MirrorProcess, since: number): number[] {
    return logRecords(mirror.stderr().slice(since), 'verify: legs differ').map((record) => Number(record['offsetBytes'])).sort((a, b) => a - b);
  }

  test('scribbled chunks are reported exactly; --repair makes the legs identical from leg 0', async () => {
    const original = randomBytes(kLegBytes);
    const [left, right] = await rig.fileLegs(2, original) as [FileLeg, FileLeg];
    const port = await freePort();
    const { mirror, control } = await rig.mirrorOf([left.uri, right.uri], ['--metrics', `127.0.0.1:${port}`]);
    try {
      // Chunks 3, 4 (one scribble across their border), 100 and the last one, on leg 1 only.
      scribble(right, 4 * kChunkBytes - 10, Buffer.alloc(20, 0xa5));
      scribble(right, 100 * kChunkBytes + 12345, Buffer.from('not what leg 0 holds'));
      scribble(right, kLegBytes - 1, Buffer.from([original[kLegBytes - 1]! ^ 0xff]));
      const expected = [3, 4, 100, kLegBytes / kChunkBytes - 1].map((chunk) => chunk * kChunkBytes);
      let logged = mirror.stderr().length;
      const checked = await verifyCli(control);
      assert.equal(checked.stopped, false);
      assert.equal(checked.mismatchChunks, 4, JSON.stringify(checked));
      assert.equal(checked.bytesChecked, kLegBytes, 'random data: nothing skipped as zero');
      assert.deepEqual(mismatchOffsets(mirror, logged), expected);
      const status = await control.status();
      assert.equal(status.verify?.mismatchChunksTotal, 4);
      assert.deepEqual(status.legs.map((leg) => leg.state), ['in-sync', 'in-sync'], 'a verify fails no leg');
      const shown = await control.cliOk(['status']);
      assert.match(shown, /verify \(check, last\): complete .* 4 mismatched chunks/);
      const scraped = parseExposition(await (await fetch(`http://127.0.0.1:${port}/metrics`)).text());
      assert.equal(valueOf(scraped, 'enbd_verify_mismatch_chunks_total'), 4);
      assert.equal(valueOf(scraped, 'enbd_verify_checked_bytes_total'), kLegBytes);
      assert.equal(valueOf(scraped, 'enbd_verify_running'), 0);
      assert.equal(valueOf(scraped, 'enbd_verify_done_ratio'), 1);

      logged = mirror.stderr().length;
      const repaired = await rig.verify(control, { repair: true });
      assert.equal(repaired.mismatchChunks, 4);
      assert.equal(repaired.repairedChunks, 4);
      const choices = logRecords(mirror.stderr().slice(logged), 'verify: repairing from the reference leg');
      assert.equal(choices.length, 4);
      for (const choice of choices) {
        assert.equal(choice['reference'], 0);
        assert.equal(choice['why'], 'first');
      }
      const data = assertLegsIdentical([left, right], kLegBytes, 'after verify --repair');
      assert.ok(data.equals(original), 'both legs hold leg 0\'s (the original) bytes');
      const again = await rig.verify(control);
      assert.equal(again.mismatchChunks, 0);
    } finally {
      control.close();
      await mirror.stop();
    }
  });

  test('three legs: the majority is the reference; --range limits the check', async () => {
    const original = randomBytes(kLegBytes);
    const three = await rig.fileLegs(3, original);
    const [first] = three as [FileLeg];
    const { mirror, control } = await rig.mirrorOf(three.map((leg) => leg.uri));
    try {
      scribble(first, 7 * kChunkBytes + 99, Buffer.alloc(300, 0x11)); // leg 0 is the odd one out
      scribble(first, 300 * kChunkBytes, Buffer.alloc(10, 0x22)); // outside the range below
      const ranged = await verifyCli(control, ['--range', `${4 * kChunkBytes}:${8 * kChunkBytes}`, '--repair']);
      assert.equal(ranged.lengthBytes, 8 * kChunkBytes);
      assert.equal(ranged.mismatchChunks, 1);
      assert.equal(ranged.repairedChunks, 1);
      const logged = mirror.stderr().length;
      const repaired = await rig.verify(control, { repair: true });
      assert.equal(repaired.mismatchChunks, 1, 'the chunk outside the first range');
      const choices = logRecords(mirror.stderr().slice(logged), 'verify: repairing from the reference leg');
      assert.equal(choices.length, 1);
      for (const choice of choices) {
        assert.equal(choice['why'], 'majority');
        assert.deepEqual(choice['rewritten'], [0]);
      }
      const data = assertLegsIdentical(three, kLegBytes, 'after a majority repair');
      assert.ok(data.equals(original), 'leg 0 got the majority\'s bytes back');
    } finally {
      control.close();
      await mirror.stop();
    }
  });

});
