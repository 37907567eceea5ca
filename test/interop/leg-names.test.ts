/**
 * Leg names against a real daemon (nbdkit memory legs, the real CLI):
 * - `--leg fast=URI` names a leg, the unnamed one gets the first automatic name (a);
 * - `enbd status` (table and --json) and the banner show the names;
 * - `leg fail NAME`, `leg reconnect URI` and `leg remove NAME` act on the named leg;
 * - `leg add URI` gets the next automatic name no leg held before (a removed name is not reused
 *   automatically), `leg add a=URI` gives a removed name again;
 * - an unknown name is refused with the legs there are, a bad name before anything is sent.
 * Threads: test process main thread; the daemon, nbdkit and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { StatusResult } from '../../src/control/protocol.js';
import { MemoryLegs, scratch, type Scratch } from '../helpers/tools.js';
import { run, skipUnlessTools } from '../helpers/serve.js';
import { enbdCli, startMirror, stopAllMirrors } from '../helpers/mirror.js';

const kLegBytes = 8 * 1024 * 1024;

describe('leg names', { skip: skipUnlessTools('nbdkit') }, () => {
  let dir: Scratch;
  const legs = new MemoryLegs(() => dir, kLegBytes);

  before(() => {
    dir = scratch('enbd-leg-names-');
  });

  after(async () => {
    await stopAllMirrors();
    await legs.stopAll();
    dir?.cleanup();
  });

  async function memoryLeg(): Promise<string> {
    return (await legs.start()).uri;
  }

  async function cli(control: string, args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
    return await run(process.execPath, [enbdCli, ...args, '--control', control], { timeoutMs: 60_000 });
  }

  async function ok(control: string, args: string[]): Promise<string> {
    const result = await cli(control, args);
    assert.equal(result.status, 0, `enbd ${args.join(' ')}: ${result.stdout}${result.stderr}`);
    return result.stdout;
  }

  async function names(control: string): Promise<Array<[string, number, string]>> {
    const result = await cli(control, ['status', '--json']);
    const status = JSON.parse(result.stdout) as StatusResult;
    return status.legs.map((leg) => [leg.name, leg.index, leg.state]);
  }

  async function waitInSync(control: string): Promise<void> {
    const result = await cli(control, ['wait', '--timeout', '60s']);
    assert.equal(result.status, 0, `enbd wait: ${result.stdout}${result.stderr}`);
  }

  test('named and automatic legs; names survive remove and add; accepted wherever an index is', async () => {
    const [uriA, uriB, uriC, uriD] = [await memoryLeg(), await memoryLeg(), await memoryLeg(), await memoryLeg()];
    const control = dir.path('m.ctl');
    const mirror = await startMirror({ legs: [`fast=${uriA}`, uriB], socketPath: dir.path('m.sock'), args: ['--control', control, '--reconnect-min', '50', '--reconnect-max', '200'] });
    assert.match(mirror.stdout(), new RegExp(`^  leg fast \\(0\\): ${uriA.replace(/[?.+*()[\]]/g, '\\$&')} `, 'm'), 'the banner names the leg');
    assert.match(mirror.stdout(), /^ {2}leg a \(1\): /m);
    assert.deepEqual(await names(control), [['fast', 0, 'in-sync'], ['a', 1, 'in-sync']]);
    const table = (await cli(control, ['status'])).stdout.split('\n');
    assert.ok(table.some((line) => /^fast\s+in-sync\s/.test(line)) && table.some((line) => /^a\s+in-sync\s/.test(line)), `the table shows the names:\n${table.join('\n')}`);

    assert.equal(await ok(control, ['leg', 'fail', 'a']), 'leg a: failed\n');
    assert.deepEqual((await names(control))[1], ['a', 1, 'failed']);
    assert.match(await ok(control, ['leg', 'reconnect', uriB]), /^leg a: (resyncing|in-sync)\n$/, 'the URI names the leg too');
    await waitInSync(control);

    assert.equal(await ok(control, ['leg', 'add', uriC]), 'leg b added: resyncing (full resync from an in-sync leg)\n');
    await waitInSync(control);
    assert.equal(await ok(control, ['leg', 'remove', 'a']), 'leg a removed\n');
    assert.deepEqual(await names(control), [['fast', 0, 'in-sync'], ['b', 2, 'in-sync']]);
    assert.equal(await ok(control, ['leg', 'add', uriD]), 'leg c added: resyncing (full resync from an in-sync leg)\n', 'a removed leg\'s name is not given automatically');
    await waitInSync(control);
    assert.equal(await ok(control, ['leg', 'remove', '1']), 'leg c removed\n', 'an index still works (c took the removed leg\'s index 1)');
    assert.equal(await ok(control, ['leg', 'add', `a=${uriB}`]), 'leg a added: resyncing (full resync from an in-sync leg)\n', 'a removed name given again');
    await waitInSync(control);
    assert.deepEqual((await names(control)).map(([name]) => name).sort(), ['a', 'b', 'fast']);

    const unknown = await cli(control, ['leg', 'fail', 'zz']);
    assert.equal(unknown.status, 1);
    assert.match(unknown.stderr, /^enbd: error: no leg "zz" \(legs: fast, [ab], [ab]; a name, an index or a leg's URI\)\n$/);
    const taken = await cli(control, ['leg', 'add', `b=${uriC}`]);
    assert.equal(taken.status, 1);
    assert.match(taken.stderr, /a leg is already named b|is already a leg/);
    const bad = await cli(control, ['leg', 'add', `x.y=${uriC}`]);
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /^enbd: error: <\[name=\]uri> must be \[NAME=\]URI with a NAME of 1 to 32 letters, digits, _ or - \(not all digits\)/);
  });
});
