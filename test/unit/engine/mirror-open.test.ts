/**
 * MirrorDevice.open / close on file legs (no external tools): refusals carry stable error
 * codes and name the legs; geometry comes from the legs (or sizeBytes); close() leaves
 * nothing running (no timer or worker keeping the process alive).
 * Threads: test main thread; the mirror's actor workers (workers placement) or inline.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { truncateSync, writeFileSync } from 'node:fs';
import { createLogger } from '../../../src/core/log.js';
import { MirrorDevice } from '../../../src/engine/mirror.js';
import { kConnectionActorEntry } from '../../../src/cli/actor-entry.js';
import { scratch, type Scratch } from '../../helpers/tools.js';

const kMiB = 1024 * 1024;
const logger = createLogger({ level: 'silent', pretty: false });

function codeOf(error: unknown): string | undefined {
  return typeof error === 'object' && error !== null && 'code' in error ? String((error as { code: unknown }).code) : undefined;
}

describe('MirrorDevice.open / close', () => {
  let dir: Scratch;
  let big: string;
  let small: string;

  before(() => {
    dir = scratch('enbd-mirror-open-');
    big = dir.path('big.img');
    small = dir.path('small.img');
    writeFileSync(big, '');
    truncateSync(big, 2 * kMiB);
    writeFileSync(small, '');
    truncateSync(small, kMiB);
  });

  after(() => dir?.cleanup());

  test('no legs: ENBD_ERR_CONFIG', async () => {
    await assert.rejects(MirrorDevice.open({ legs: [], logger }), (error) => codeOf(error) === 'ENBD_ERR_CONFIG');
  });

  test('bad URI: ENBD_ERR_URI naming it', async () => {
    await assert.rejects(MirrorDevice.open({ legs: [big, 'gopher://x'], logger }), (error) => {
      assert.equal(codeOf(error), 'ENBD_ERR_URI');
      assert.match((error as Error).message, /gopher:\/\/x/);
      return true;
    });
  });

  test('workers placement without the worker entry: ENBD_ERR_CONFIG naming actorEntry', async () => {
    await assert.rejects(MirrorDevice.open({ legs: [big], logger }), (error) => {
      assert.equal(codeOf(error), 'ENBD_ERR_CONFIG');
      assert.match((error as Error).message, /actorEntry/);
      return true;
    });
  });

  test('legs of different sizes: ENBD_ERR_CONFIG naming both; sizeBytes picks a common size', async () => {
    await assert.rejects(MirrorDevice.open({ legs: [big, small], logger, placement: 'inline' }), (error) => {
      assert.equal(codeOf(error), 'ENBD_ERR_CONFIG');
      assert.ok((error as Error).message.includes(big) && (error as Error).message.includes(small));
      return true;
    });
    const mirror = await MirrorDevice.open({ legs: [big, small], logger, placement: 'inline', sizeBytes: kMiB / 2 });
    try {
      assert.equal(mirror.sizeBytes, kMiB / 2);
      assert.deepEqual(mirror.legStatus().map((leg) => leg.state), ['in-sync', 'in-sync']);
    } finally {
      await mirror.close();
    }
  });

  test('missing file leg: ENBD_ERR_LEG naming it', async () => {
    const missing = dir.path('missing/leg.img');
    await assert.rejects(MirrorDevice.open({ legs: [big, missing], logger, actorEntry: kConnectionActorEntry }), (error) => {
      assert.equal(codeOf(error), 'ENBD_ERR_LEG');
      assert.ok((error as Error).message.includes(missing));
      return true;
    });
  });

  // Regression: MirrorDevice.close() used to leave its 5 s shutdown-race timer running.
  test('close() leaves no timer behind', async () => {
    const mirror = await MirrorDevice.open({ legs: [big, dir.path('big.img')], logger, sizeBytes: kMiB, actorEntry: kConnectionActorEntry });
    const timersBefore = process.getActiveResourcesInfo().filter((name) => name === 'Timeout').length;
    await mirror.close();
    const timersAfter = process.getActiveResourcesInfo().filter((name) => name === 'Timeout').length;
    assert.ok(timersAfter <= timersBefore, `timers before close ${timersBefore}, after ${timersAfter}`);
  });
});
