/**
 * Issue 12 leftovers for write-mostly legs, against the real CLI over nbdkit memory legs:
 * `--write-mostly NAME` takes a leg name (given with NAME=URI, or an automatic one) and a leg's
 * URI parameter `write-mostly=1` marks it too. Under round-robin (which would spread reads over
 * every leg) the write-mostly legs serve no client read: the read counts in `enbd status --json`
 * stay 0 for them while the bytes written read back. `enbd leg add` of a URI with
 * write-mostly=1 is refused (it applies at start), and nothing is added.
 * Threads: test process main thread; the daemon, nbdkit and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { StatusResult } from '../../src/control/protocol.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { MemoryLegs, scratch, type Scratch } from '../helpers/tools.js';
import { run, skipUnlessTools } from '../helpers/serve.js';
import { assertSameBytes, enbdCli, startMirror, stopAllMirrors } from '../helpers/mirror.js';

const kLegBytes = 8 * 1024 * 1024;

describe('write-mostly legs by name and by URI parameter', { skip: skipUnlessTools('nbdkit') }, () => {
  let dir: Scratch;
  const legs = new MemoryLegs(() => dir, kLegBytes);

  before(() => {
    dir = scratch('enbd-write-mostly-');
  });

  after(async () => {
    await stopAllMirrors();
    await legs.stopAll();
    dir?.cleanup();
  });

  async function memoryLeg(): Promise<string> {
    return (await legs.start()).uri;
  }

  async function status(control: string): Promise<StatusResult> {
    const result = await run(process.execPath, [enbdCli, 'status', '--json', '--control', control], { timeoutMs: 60_000 });
    return JSON.parse(result.stdout) as StatusResult;
  }

  test('--write-mostly slow and ?write-mostly=1: those legs serve no reads', async () => {
    const [uriA, uriSlow, uriThird, uriAdded] = [await memoryLeg(), await memoryLeg(), await memoryLeg(), await memoryLeg()];
    const control = dir.path('m.ctl');
    const mirror = await startMirror({
      legs: [`a=${uriA}`, `slow=${uriSlow}`, `${uriThird}&write-mostly=1`],
      socketPath: dir.path('m.sock'),
      args: ['--control', control, '--write-mostly', 'slow', '--read-policy', 'round-robin'],
    });
    const before = await status(control);
    assert.deepEqual(before.legs.map((leg) => [leg.name, leg.state, leg.writeMostly]), [['a', 'in-sync', false], ['slow', 'in-sync', true], ['b', 'in-sync', true]]);
    const client = await NbdClient.connect(mirror.uri);
    try {
      const data = randomBytes(256 * 1024);
      await client.write(1024 * 1024, data);
      await client.flush();
      const reads: Array<Promise<Uint8Array>> = [];
      for (let index = 0; index < 64; index += 1) reads.push(client.read(1024 * 1024 + (index % 64) * 4096, 4096));
      const got = await Promise.all(reads);
      for (const [index, block] of got.entries()) assertSameBytes(block, data.subarray(index * 4096, index * 4096 + 4096), `read ${index}`);
    } finally {
      await client.close();
    }
    const after = await status(control);
    const readsOf = Object.fromEntries(after.legs.map((leg) => [leg.name, leg.reads ?? 0]));
    assert.ok((readsOf['a'] ?? 0) >= 64, `leg a served the reads: ${JSON.stringify(readsOf)}`);
    assert.equal(readsOf['slow'], 0, `the write-mostly leg slow served none: ${JSON.stringify(readsOf)}`);
    assert.equal(readsOf['b'], 0, `the write-mostly=1 leg served none: ${JSON.stringify(readsOf)}`);

    const added = await run(process.execPath, [enbdCli, 'leg', 'add', `${uriAdded}&write-mostly=1`, '--control', control], { timeoutMs: 60_000 });
    assert.notEqual(added.status, 0, 'leg add with write-mostly=1 is refused');
    assert.match(added.stderr, /write-mostly applies to legs given at start/);
    assert.equal((await status(control)).legs.filter((leg) => leg.state !== 'removed').length, 3, 'nothing was added');
    assert.equal(await mirror.stop(), 0);
  });
});
