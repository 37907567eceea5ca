/**
 * `enbd mirror` refusals and lifecycle: legs of different sizes, --size smaller (works, exports
 * that size) and larger than a leg (refused), an unreachable leg, unsupported URIs, bad flag
 * values, bad config files (and a YAML / JSON config that works), and SIGTERM (exit 0 after
 * the legs were flushed, seen in an nbdkit log filter).
 * Every refusal must exit non-zero with `enbd: error: ...` (1) or a commander usage error (2)
 * on stderr naming the offending leg or value.
 * Threads: test process main thread; the mirror and legs are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { NbdClient } from '../../src/nbd/client/client.js';
import { run, runOk, scratch, startNbdkit, unixUri, waitFor, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { assertFilled, runMirrorCli, startMirror, startMirrorArgs, stopAllMirrors, type CliResult } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;
const kBigBytes = 4 * kMiB;
const kSmallBytes = 2 * kMiB;

describe('enbd mirror: errors, config and shutdown', { skip: skipUnlessTools('nbdkit', 'nbdinfo', 'qemu-io', 'nbdsh') }, () => {
  let dir: Scratch;
  let big: string;
  let small: string;
  let other: string;

  before(() => {
    dir = scratch('enbd-mirror-errors-');
    big = sparse('big.img', kBigBytes);
    small = sparse('small.img', kSmallBytes);
    other = sparse('other.img', kBigBytes);
  });

  after(async () => {
    await stopAllMirrors();
    dir?.cleanup();
  });

  function sparse(name: string, sizeBytes: number): string {
    const path = dir.path(name);
    writeFileSync(path, '');
    truncateSync(path, sizeBytes);
    return path;
  }

  /** Runs the CLI (always with a scratch socket so a wrong success never takes port 10809). */
  async function refused(args: string[], exitCode = 1): Promise<CliResult> {
    const result = await runMirrorCli([...args, '--socket', dir.path('refused.sock'), '--log-level', 'warn'], { cwd: dir.dir });
    assert.notEqual(result.status, null, `enbd mirror ${args.join(' ')} should have exited, but it served:\n${result.stdout}`);
    assert.equal(result.status, exitCode, `exit code for ${args.join(' ')}:\n${result.stderr}`);
    assert.doesNotMatch(result.stdout, /export:/, 'no banner on failure');
    if (exitCode === 1) assert.match(result.stderr, /^enbd: error: /m);
    return result;
  }

  test('legs of different sizes without --size: exit 1 naming both legs and sizes', async () => {
    const { stderr } = await refused(['--leg', big, '--leg', small]);
    assert.ok(stderr.includes(big), stderr);
    assert.ok(stderr.includes(small), stderr);
    assert.ok(stderr.includes(String(kBigBytes)), stderr);
    assert.ok(stderr.includes(String(kSmallBytes)), stderr);
    assert.match(stderr, /--size/, 'suggests --size');
  });

  test('--size smaller than the legs: exports that size, writes reach both legs', async () => {
    const socketPath = dir.path('sized.sock');
    const mirror = await startMirror({ legs: [big, small], socketPath, args: ['--size', '1M'] });
    assert.match(mirror.stdout(), /1048576 bytes mirrored across 2 legs/);
    const size = await runOk('nbdinfo', ['--size', mirror.uri]);
    assert.equal(Number(size.stdout.trim()), kMiB);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x6b 1020k 4k', '-c', 'read -P 0x6b 1020k 4k', mirror.uri]);
    // Past the exported size: refused by the server (libnbd strict mode off so it is sent).
    const past = await runMirrorProbe(mirror.uri, kMiB);
    assert.notEqual(past, 0, 'a write past --size is refused');
    assert.equal(await mirror.stop(), 0);
    for (const path of [big, small]) {
      const image = readFileSync(path);
      assertFilled(image, 1020 * 1024, 4096, 0x6b, path);
      assertFilled(image, kMiB, 4096, 0, `${path} past --size untouched`);
    }
  });

  test('--size larger than a leg: exit 1 naming the size and the legs', async () => {
    const { stderr } = await refused(['--leg', big, '--leg', small, '--size', '3M']);
    assert.ok(stderr.includes(String(3 * kMiB)), stderr);
    assert.ok(stderr.includes(small) && stderr.includes(String(kSmallBytes)), stderr);
  });

  test('unreachable leg: exit 1 naming the leg', async () => {
    const leg = 'nbd+unix:///?socket=/nonexistent.sock';
    const { stderr } = await refused(['--leg', big, '--leg', leg]);
    assert.ok(stderr.includes(leg), stderr);
  });

  test('missing file leg: exit 1 naming the path', async () => {
    const leg = dir.path('no-such-dir/leg.img');
    const { stderr } = await refused(['--leg', big, '--leg', leg]);
    assert.ok(stderr.includes(leg), stderr);
  });

  for (const uri of ['nbds://x', 'http://x', 'nbd://']) {
    test(`bad leg URI ${uri}: exit 1 naming it`, async () => {
      const { stderr } = await refused(['--leg', big, '--leg', uri]);
      assert.ok(stderr.includes(uri), stderr);
    });
  }

  const badFlags: Array<[string[], RegExp]> = [
    [['--copy-mode', 'bogus'], /copy-mode.*bogus/],
    [['--placement', 'nowhere'], /placement.*nowhere/],
    // The message names the flag as written and the value, no internal names.
    [['--ring-slots', '3'], /^enbd: error: --ring-slots must be a power of two from 2 to 4096, got 3$/m],
    [['--ring-slots', '0'], /^enbd: error: --ring-slots must be a power of two from 2 to 4096, got 0$/m],
    [['--slot-bytes', '1000'], /^enbd: error: --slot-bytes must be a multiple of 4K from 4K to 32M, got 1000$/m],
    [['--leg-timeout', '50ms'], /^enbd: error: --leg-timeout must be 0 \(never\) or at least 100ms: .*got 50ms$/m],
    [['--size', 'abc'], /--size.*abc/],
    [['--listen', '99999'], /--listen.*99999/],
    [['--leg-timeout', '-5'], /leg-timeout.*-5/],
  ];
  for (const [flags, message] of badFlags) {
    test(`bad flag value ${flags.join(' ')}: exit 1 with a clear message`, async () => {
      const { stderr } = await refused(['--leg', big, ...flags]);
      assert.match(stderr, message);
    });
  }

  test('commander usage errors exit 2: unknown option, bad --log-level choice', async () => {
    const unknown = await refused(['--leg', big, '--bogus'], 2);
    assert.match(unknown.stderr, /unknown option '--bogus'/);
    const level = await runMirrorCli(['--leg', big, '--socket', dir.path('refused.sock'), '--log-level', 'loud'], { cwd: dir.dir });
    assert.equal(level.status, 2);
    assert.match(level.stderr, /loud/);
  });

  test('bad config files: unknown key, invalid YAML, legs not a list, missing file → exit 1', async () => {
    const unknownKey = dir.path('unknown.yaml');
    writeFileSync(unknownKey, `legs: [${big}]\nringslots: 8\n`);
    assert.match((await refused(['--config', unknownKey])).stderr, /ringslots/);
    const invalid = dir.path('invalid.yaml');
    writeFileSync(invalid, 'legs: [unclosed\n  - : : :\n');
    assert.ok((await refused(['--config', invalid])).stderr.includes(invalid));
    const notList = dir.path('notlist.json');
    writeFileSync(notList, JSON.stringify({ legs: big }));
    assert.match((await refused(['--config', notList])).stderr, /legs/);
    const missing = dir.path('missing.yaml');
    assert.ok((await refused(['--config', missing])).stderr.includes(missing));
    const badValue = dir.path('badvalue.yaml');
    writeFileSync(badValue, `legs: [${big}]\ncopyMode: sideways\n`);
    assert.match((await refused(['--config', badValue])).stderr, /sideways/);
  });

  test('a YAML config with legs works (flags win over the file)', async () => {
    const socketPath = dir.path('yaml.sock');
    const config = dir.path('mirror.yaml');
    writeFileSync(config, [
      '# mirror under test',
      'legs:',
      `  - ${big}`,
      `  - file://${other}`,
      `socket: ${socketPath}`,
      'size: 2M',
      'placement: inline',
      'ringSlots: 32',
      'logLevel: warn',
      '',
    ].join('\n'));
    const mirror = await startMirrorArgs(['--config', config, '--size', '3M'], dir.dir);
    assert.deepEqual(mirror.uris, [unixUri(socketPath)]);
    assert.match(mirror.stdout(), new RegExp(`${3 * kMiB} bytes mirrored across 2 legs`), 'flag --size wins over size: 2M');
    const size = await runOk('nbdinfo', ['--size', mirror.uri]);
    assert.equal(Number(size.stdout.trim()), 3 * kMiB);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 2M 64k', mirror.uri]);
    assert.equal(await mirror.stop(), 0);
    assertFilled(readFileSync(big), 2 * kMiB, 64 * 1024, 0x42, 'leg 0 (path)');
    assertFilled(readFileSync(other), 2 * kMiB, 64 * 1024, 0x42, 'leg 1 (file:// URI)');
  });

  test('a JSON config works too', async () => {
    const socketPath = dir.path('json.sock');
    const config = dir.path('mirror.json');
    writeFileSync(config, JSON.stringify({ legs: [big, other], socket: socketPath, copyMode: 'per-leg', logLevel: 'warn' }));
    const mirror = await startMirrorArgs(['--config', config], dir.dir);
    const size = await runOk('nbdinfo', ['--size', mirror.uri]);
    assert.equal(Number(size.stdout.trim()), kBigBytes);
    assert.equal(await mirror.stop(), 0);
  });

  async function withLoggedLeg(body: (legUri: string, logPath: string) => Promise<void>): Promise<void> {
    const logPath = dir.path(`leg-${Date.now()}.log`);
    const legSocket = dir.path('logged.sock');
    const nbdkit = await startNbdkit(legSocket, ['--filter=log', 'memory', String(kBigBytes), `logfile=${logPath}`]);
    try {
      await body(unixUri(legSocket), logPath);
    } finally {
      await nbdkit.stop();
    }
  }

  async function writeAndWaitForLog(uri: string, logPath: string, value: number): Promise<NbdClient> {
    const client = await NbdClient.connect(uri);
    await client.write(0, Buffer.alloc(64 * 1024, value));
    await waitFor('the write in the leg log', () => /Write id=\d+ offset=0x0 count=0x10000/.test(readFileSync(logPath, 'utf8')));
    return client;
  }

  async function assertLegsHold(legUri: string, value: number): Promise<void> {
    const check = await NbdClient.connect(legUri);
    try {
      assertFilled(await check.read(0, 64 * 1024), 0, 64 * 1024, value, 'nbdkit leg');
    } finally {
      await check.close();
    }
    assertFilled(readFileSync(other), 0, 64 * 1024, value, 'file leg');
  }

  test('SIGTERM: exit 0, every leg flushed after the signal, data on both legs', async () => {
    await withLoggedLeg(async (legUri, logPath) => {
      const mirror = await startMirror({ legs: [legUri, other], socketPath: dir.path('term.sock') });
      const client = await writeAndWaitForLog(mirror.uri, logPath, 0x99);
      await client.close();
      const logged = readFileSync(logPath, 'utf8');
      assert.equal(await mirror.stop('SIGTERM'), 0, `exit code after SIGTERM:\n${mirror.stderr()}`);
      const afterSignal = readFileSync(logPath, 'utf8').slice(logged.length);
      assert.match(afterSignal, /Flush id=\d+ return=0/, `a successful Flush reached the leg after SIGTERM:\n${afterSignal}`);
      assert.match(afterSignal, /Disconnect/, 'the mirror disconnected from the leg');
      await assertLegsHold(legUri, 0x99);
    });
  });

  // Regression: NbdServer.close() used to await net.Server.close(cb), whose callback waits for
  // every client to leave, so SIGTERM hung while an idle client stayed connected.
  test('SIGTERM with an idle client still connected: exit 0 and legs flushed', async () => {
    await withLoggedLeg(async (legUri, logPath) => {
      const mirror = await startMirror({ legs: [legUri, other], socketPath: dir.path('term-idle.sock') });
      const client = await writeAndWaitForLog(mirror.uri, logPath, 0x5c);
      try {
        const logged = readFileSync(logPath, 'utf8');
        // A liveness bound, not a timing assertion: the client never leaves by itself.
        assert.equal(await mirror.stop('SIGTERM', 12_000), 0, `exit code after SIGTERM:\n${mirror.stderr()}`);
        const afterSignal = readFileSync(logPath, 'utf8').slice(logged.length);
        assert.match(afterSignal, /Flush id=\d+ return=0/, `a successful Flush reached the leg after SIGTERM:\n${afterSignal}`);
        await assertLegsHold(legUri, 0x5c);
      } finally {
        client.destroy();
      }
    });
  });
});

/** Sends a 4 KiB write at `offsetBytes` with libnbd's client-side checks off; its exit code. */
async function runMirrorProbe(uri: string, offsetBytes: number): Promise<number | null> {
  const script = `h.set_strict_mode(0)\ntry:\n    h.pwrite(b"x" * 4096, ${offsetBytes})\nexcept nbd.Error as e:\n    print(e.errno)\n    raise SystemExit(3)\n`;
  const result = await run('nbdsh', ['-n', '-c', `h.connect_uri(${JSON.stringify(uri)})`, '-c', script]);
  return result.status;
}
