/**
 * Leg names recorded in the on-leg metadata (issue 12), through the real CLI on file legs:
 * `enbd create`, then a mirror started with `--leg fast=A --leg B` (B gets the automatic name a)
 * and stopped; started again with no names the legs keep fast and a, also with the legs given
 * in the other order (a name follows its leg, not its position); a name given on the command
 * line wins over the recorded one and is recorded in turn.
 * Threads: test process main thread; the daemons and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, openSync } from 'node:fs';
import type { StatusResult } from '../../src/control/protocol.js';
import { scratch, type Scratch } from '../helpers/tools.js';
import { run } from '../helpers/serve.js';
import { enbdCli, startMirror, stopAllMirrors } from '../helpers/mirror.js';

const kLegBytes = 8 * 1024 * 1024;

describe('leg names recorded in the member table', () => {
  let dir: Scratch;
  let seq = 0;

  before(() => {
    dir = scratch('enbd-leg-names-meta-');
  });

  after(async () => {
    await stopAllMirrors();
    dir?.cleanup();
  });

  function file(name: string): string {
    const path = dir.path(name);
    const fd = openSync(path, 'w');
    ftruncateSync(fd, kLegBytes);
    closeSync(fd);
    return path;
  }

  /** Starts the mirror with `legs`, returns [name, uri] per leg from `enbd status --json`, stops it cleanly. */
  async function namesAfterStart(legs: string[]): Promise<Array<[string, string]>> {
    seq += 1;
    const control = dir.path(`m${seq}.ctl`);
    const mirror = await startMirror({ legs, socketPath: dir.path(`m${seq}.sock`), args: ['--metadata', 'leg', '--control', control] });
    const result = await run(process.execPath, [enbdCli, 'status', '--json', '--control', control], { timeoutMs: 60_000 });
    assert.equal(mirror.alive(), true, mirror.stderr());
    const status = JSON.parse(result.stdout) as StatusResult;
    assert.equal(await mirror.stop(), 0, `clean stop: ${mirror.stderr()}`);
    return status.legs.map((leg) => [leg.name, leg.uri]);
  }

  test('names survive a restart without names, follow their legs, and a given name wins', async () => {
    const [legA, legB] = [file('a.img'), file('b.img')];
    const created = await run(process.execPath, [enbdCli, 'create', '--leg', legA, '--leg', legB, '--assume-clean'], { timeoutMs: 60_000 });
    assert.equal(created.status, 0, created.stdout + created.stderr);
    const [uriA, uriB] = [legA, legB];
    assert.deepEqual(await namesAfterStart([`fast=${legA}`, legB]), [['fast', uriA], ['a', uriB]]);
    assert.deepEqual(await namesAfterStart([legA, legB]), [['fast', uriA], ['a', uriB]], 'no names given: the recorded ones');
    assert.deepEqual(await namesAfterStart([legB, legA]), [['a', uriB], ['fast', uriA]], 'the names follow their legs');
    assert.deepEqual(await namesAfterStart([`other=${legA}`, legB]), [['other', uriA], ['a', uriB]], 'a given name wins');
    assert.deepEqual(await namesAfterStart([legA, legB]), [['other', uriA], ['a', uriB]], 'and is recorded');
  });
});
