/**
 * Exclusive claims of on-leg metadata (issue 11), against real `enbd mirror --metadata leg`
 * processes on nbdkit file legs: a second daemon on legs a live one holds is refused naming its
 * pid and starts once the first stopped; two daemons started at the same moment (on legs whose
 * writes are slow, so the assemblies overlap) never both serve; a member of the array that is
 * not given is refused unless --degraded, and the refused run leaves no claim.
 *
 * Threads: test process main thread; nbdkit, the daemon and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { scratch, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { assertSameBytes, readNbd, runMirrorCli, stopAllMirrors } from '../helpers/mirror.js';
import { MetaLegs, assembledRecord, createArray, examine, kMetaMirrorFlags, startMetaMirror, writeFlush } from '../helpers/meta-legs.js';

const kMiB = 1024 * 1024;
const kLegBytes = 32 * kMiB;


describe('enbd mirror --metadata leg: exclusive claims on nbdkit file legs', { skip: skipUnlessTools('nbdkit'), timeout: 120_000 }, () => {
  let dir: Scratch;
  let legs: MetaLegs;

  before(() => {
    dir = scratch('enbd-meta-claims-');
    legs = new MetaLegs(dir, kLegBytes);
  });

  after(async () => {
    await stopAllMirrors();
    await legs.stopAll();
    dir?.cleanup();
  });

  test('two daemons on the same legs: the second is refused naming the pid, and starts once the first stopped', async () => {
    const a = await legs.leg('s6-a');
    const b = await legs.leg('s6-b');
    await createArray([a, b], ['--assume-clean']);
    const first = await startMetaMirror(dir, [a, b], 's6-first');
    const pid = first.mirror.process.pid ?? -1;
    const second = await runMirrorCli(['--leg', a.uri, '--leg', b.uri, '--socket', dir.path('s6-second.sock'), '--control', 'none', ...kMetaMirrorFlags]);
    assert.notEqual(second.status, 0, `the second daemon is refused:\n${second.stdout}\n${second.stderr}`);
    assert.notEqual(second.status, null, 'the second daemon exited rather than serving');
    assert.match(second.stderr, new RegExp(`pid ${pid}\\b`), `the refusal names the running daemon's pid ${pid}`);
    assert.ok(first.mirror.alive(), 'the first daemon still runs');
    const data = randomBytes(256 * 1024);
    await writeFlush(first.mirror.uri, kMiB, data);
    assertSameBytes(await readNbd(first.mirror.uri, kMiB, data.length), data, 'the first daemon still serves');
    assert.equal(await first.stop('SIGTERM'), 0);
    const again = await startMetaMirror(dir, [a, b], 's6-again');
    try {
      assert.equal(assembledRecord(again.mirror.stderr(), 0).role, 'in-sync');
      assert.equal(assembledRecord(again.mirror.stderr(), 1).role, 'in-sync');
      assertSameBytes(await readNbd(again.mirror.uri, kMiB, data.length), data, 'the data through the second daemon');
    } finally {
      assert.equal(await again.stop('SIGTERM'), 0);
    }
  });
  test('a member not given is refused unless --degraded', async () => {
    const a = await legs.leg('s8-a');
    const b = await legs.leg('s8-b');
    await createArray([a, b], ['--assume-clean']);
    const alone = await runMirrorCli(['--leg', a.uri, '--socket', dir.path('s8.sock'), '--control', 'none', ...kMetaMirrorFlags]);
    assert.notEqual(alone.status, 0, `one leg of two is refused:\n${alone.stdout}\n${alone.stderr}`);
    assert.notEqual(alone.status, null);
    assert.match(alone.stderr, /member 1 of the array .* is not given/);
    assert.match(alone.stderr, /--degraded/);
    const examined = await examine(a.uri);
    assert.equal(examined.superblock?.owner, null, 'the refused run left no claim');
    assert.deepEqual(examined.superblock?.members.map((member) => member.state), ['in-sync', 'in-sync'], 'the refused run changed no member state');
  });

  test('two daemons started at the same moment on slow legs: at most one serves', async (t) => {
    // Metadata writes take 200 ms each, so the two assemblies overlap.
    const slow = ['--filter=delay', 'delay-write=200ms'];
    const a = await legs.leg('s9-a', slow);
    const b = await legs.leg('s9-b', slow);
    await createArray([a, b], ['--assume-clean']);
    for (const order of [[a, b], [b, a]]) {
      const outcomes = await Promise.allSettled([startMetaMirror(dir, [a, b], `s9-x${order[0] === a ? 0 : 1}`), startMetaMirror(dir, order, `s9-y${order[0] === a ? 0 : 1}`)]);
      const running = outcomes.filter((outcome) => outcome.status === 'fulfilled');
      const reasons = outcomes.filter((outcome): outcome is PromiseRejectedResult => outcome.status === 'rejected').map((outcome) => String(outcome.reason));
      t.diagnostic(`second daemon's legs ${order[0] === a ? 'A,B' : 'B,A'}: ${running.length} running; refusals: ${reasons.map((reason) => /claimed by another daemon|is in use by enbd pid \d+/.exec(reason)?.[0] ?? reason.slice(0, 200)).join(' | ')}`);
      try {
        assert.ok(running.length <= 1, 'at most one daemon serves the legs');
        for (const reason of reasons) assert.match(reason, /claimed by another daemon|is in use by enbd pid \d+/);
        if (running.length === 1) {
          const winner = (running[0] as PromiseFulfilledResult<Awaited<ReturnType<typeof startMetaMirror>>>).value;
          const data = randomBytes(64 * 1024);
          await writeFlush(winner.mirror.uri, 0, data);
          assertSameBytes(await readNbd(winner.mirror.uri, 0, data.length), data, 'the winner serves');
        }
      } finally {
        for (const outcome of running) assert.equal(await (outcome as PromiseFulfilledResult<Awaited<ReturnType<typeof startMetaMirror>>>).value.stop('SIGTERM'), 0);
      }
    }
  });
});
