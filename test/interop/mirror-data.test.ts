/**
 * `enbd mirror` data path with real peers: legs mixing `nbdkit memory` (Unix socket),
 * `enbd serve FILE` and plain file legs; qemu-io pattern I/O (write/read -P, write -z, discard,
 * flush, FUA write) and fio randwrite with crc32c verification through the mirror; then every
 * leg is read out (nbdcopy for NBD legs, the file itself for file legs) and compared byte for
 * byte with each other, with what was read back through the mirror, and with the patterns.
 * Variants: 2 and 3 legs, --placement inline, --copy-mode per-leg, TCP --listen.
 * Threads: test process main thread; the mirror, legs and tools are child processes.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { freePort, run, runOk, scratch, startNbdkit, unixUri, type Child, type RunResult, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools, startServerUnderTest, type ServerUnderTest } from '../helpers/serve.js';
import {
  assertFilled,
  assertSameBytes,
  copyLegOut,
  readLegFile,
  startMirror,
  stopAllMirrors,
  type MirrorProcess,
  type StartMirrorOptions,
} from '../helpers/mirror.js';

const kMiB = 1024 * 1024;
const kLegBytes = 64 * kMiB;
const kFioOffsetBytes = 8 * kMiB;
/** qemu-io discards [kDiscardOffset, +kDiscardBytes): see the BUG test at the end. */
const kDiscardOffsetBytes = 2 * kMiB;
const kDiscardBytes = 512 * 1024;

type LegKind = 'nbdkit' | 'serve' | 'file' | 'file-uri';

interface Leg {
  kind: LegKind;
  /** The URI or path given to --leg. */
  spec: string;
  /** Reads the whole leg. */
  contents(): Promise<Buffer>;
}

interface Fixture {
  dir: Scratch;
  legs: Leg[];
  children: Child[];
  servers: ServerUnderTest[];
}

const fixtures: Fixture[] = [];

after(async () => {
  await stopAllMirrors();
  for (const fixture of fixtures) {
    await Promise.all(fixture.children.map(async (child) => await child.stop()));
    await Promise.all(fixture.servers.map(async (server) => await server.stop()));
    fixture.dir.cleanup();
  }
});

function sparseFile(path: string, sizeBytes: number): string {
  writeFileSync(path, '');
  truncateSync(path, sizeBytes);
  return path;
}

async function makeLegs(kinds: LegKind[]): Promise<Fixture> {
  const fixture: Fixture = { dir: scratch('enbd-mirror-data-'), legs: [], children: [], servers: [] };
  fixtures.push(fixture);
  const { dir } = fixture;
  for (const [index, kind] of kinds.entries()) {
    if (kind === 'nbdkit') {
      const socketPath = dir.path(`leg${index}.sock`);
      fixture.children.push(await startNbdkit(socketPath, ['memory', String(kLegBytes)]));
      const uri = unixUri(socketPath);
      fixture.legs.push({ kind, spec: uri, contents: async () => await copyLegOut(uri, dir.path(`leg${index}.out`)) });
    } else if (kind === 'serve') {
      const file = sparseFile(dir.path(`leg${index}.img`), kLegBytes);
      const server = await startServerUnderTest({ file, socketPath: dir.path(`leg${index}.sock`), kind: 'enbd' });
      fixture.servers.push(server);
      // Read through the NBD leg (what the mirror talks to), not only its backing file.
      fixture.legs.push({ kind, spec: server.uri(), contents: async () => await copyLegOut(server.uri(), dir.path(`leg${index}.out`)) });
    } else {
      const file = sparseFile(dir.path(`leg${index}.img`), kLegBytes);
      const spec = kind === 'file' ? file : `file://${file}`;
      fixture.legs.push({ kind, spec, contents: async () => readLegFile(file) });
    }
  }
  return fixture;
}

function assertOk(result: RunResult, what: string): void {
  assert.equal(result.status, 0, `${what} rc ${String(result.status)}:\n${result.stdout}\n${result.stderr}`);
}

/** qemu-io pattern sequence through the mirror; qemu-io checks each read pattern itself. */
async function qemuPatterns(uri: string): Promise<void> {
  const result = await run('qemu-io', [
    '-f', 'raw',
    '-c', 'write -P 0x5a 0 1M',
    '-c', 'read -P 0x5a 0 1M',
    '-c', 'write -z 256k 64k',
    '-c', 'read -P 0 256k 64k',
    '-c', 'read -P 0x5a 320k 704k',
    '-c', `write -P 0x33 ${kDiscardOffsetBytes} 1M`,
    '-c', `discard ${kDiscardOffsetBytes} ${kDiscardBytes}`,
    '-c', `read -P 0x33 ${kDiscardOffsetBytes + kDiscardBytes} ${kMiB - kDiscardBytes}`,
    '-c', 'flush',
    '-c', 'write -f -P 0x11 4M 4k',
    '-c', 'read -P 0x11 4M 4k',
    '-c', 'write -P 0xc3 5M 3k',
    '-c', 'write -P 0x3c 5243904 5k',
    '-c', 'read -P 0xc3 5M 1k',
    '-c', 'read -P 0x3c 5243904 5k',
    uri,
  ], { timeoutMs: 60_000 });
  assertOk(result, 'qemu-io');
  assert.doesNotMatch(result.stdout + result.stderr, /Pattern verification failed|error/i);
}

async function fioVerify(uri: string, sizeBytes: number, dir: Scratch): Promise<void> {
  const outputPath = dir.path(`fio-${Date.now()}.json`);
  const result = await run('fio', [
    '--name=mirror-randwrite',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=randwrite',
    '--bs=4k',
    `--offset=${kFioOffsetBytes}`,
    `--size=${sizeBytes}`,
    '--iodepth=32',
    '--verify=crc32c',
    '--verify_fatal=1',
    '--do_verify=1',
    '--output-format=json',
    `--output=${outputPath}`,
  ], { timeoutMs: 120_000 });
  assertOk(result, 'fio');
  const jobs = (JSON.parse(readFileSync(outputPath, 'utf8')) as { jobs: Array<{ error: number; write: { io_bytes: number }; read: { io_bytes: number } }> }).jobs;
  assert.equal(jobs.length, 1);
  assert.equal(jobs[0]?.error, 0);
  assert.equal(jobs[0]?.write.io_bytes, sizeBytes, 'fio wrote the whole range');
  assert.equal(jobs[0]?.read.io_bytes, sizeBytes, 'fio verified the whole range');
}

/** Compares two images except the discarded range (TRIM may leave old data or zeros). */
function assertSameOutsideDiscard(left: Buffer, right: Buffer, what: string): void {
  assertSameBytes(left.subarray(0, kDiscardOffsetBytes), right.subarray(0, kDiscardOffsetBytes), what);
  const end = kDiscardOffsetBytes + kDiscardBytes;
  assertSameBytes(left.subarray(end), right.subarray(end), what);
}

/** The patterns written by qemuPatterns and fio, checked on one image. */
function assertPatterns(image: Buffer, fioBytes: number, what: string): void {
  assertFilled(image, 0, 256 * 1024, 0x5a, `${what} 0x5a head`);
  assertFilled(image, 256 * 1024, 64 * 1024, 0, `${what} write -z`);
  assertFilled(image, 320 * 1024, 704 * 1024, 0x5a, `${what} 0x5a tail`);
  assertFilled(image, kDiscardOffsetBytes + kDiscardBytes, kMiB - kDiscardBytes, 0x33, `${what} 0x33`);
  const discarded = image.subarray(kDiscardOffsetBytes, kDiscardOffsetBytes + kDiscardBytes);
  const odd = discarded.findIndex((byte) => byte !== 0 && byte !== 0x33);
  assert.equal(odd, -1, `${what}: every discarded byte reads as zero or the old data`);
  assertFilled(image, 4 * kMiB, 4096, 0x11, `${what} FUA write`);
  assertFilled(image, 5 * kMiB, 1024, 0xc3, `${what} 0xc3`);
  assertFilled(image, 5 * kMiB + 1024, 5 * 1024, 0x3c, `${what} 0x3c`);
  assertFilled(image, 5 * kMiB + 6 * 1024, kMiB - 6 * 1024, 0, `${what} untouched`);
  for (let offset = kFioOffsetBytes; offset < kFioOffsetBytes + fioBytes; offset += 4096) {
    const block = image.subarray(offset, offset + 4096);
    if (block.every((byte) => byte === 0)) assert.fail(`${what}: fio block at ${offset} is all zeros (write lost)`);
  }
  assertFilled(image, kFioOffsetBytes + fioBytes, kLegBytes - kFioOffsetBytes - fioBytes, 0, `${what} after fio range`);
}

interface Scenario {
  legs: LegKind[];
  args?: string[];
  tcp?: boolean;
  fioBytes: number;
  /** nbdcopy request size for reads through the mirror (small --max-payload). */
  requestBytes?: number;
}

async function runScenario(scenario: Scenario): Promise<void> {
  const fixture = await makeLegs(scenario.legs);
  const { dir } = fixture;
  const options: StartMirrorOptions = { legs: fixture.legs.map((leg) => leg.spec), args: scenario.args ?? [] };
  let port = 0;
  if (scenario.tcp === true) {
    port = await freePort();
    options.listen = `127.0.0.1:${port}`;
  } else {
    options.socketPath = dir.path('mirror.sock');
  }
  const mirror: MirrorProcess = await startMirror(options);
  const uri = scenario.tcp === true ? `nbd://127.0.0.1:${port}/` : unixUri(dir.path('mirror.sock'));
  assert.deepEqual(mirror.uris, [uri], 'banner lists exactly the export asked for');
  const size = await runOk('nbdinfo', ['--size', uri]);
  assert.equal(Number(size.stdout.trim()), kLegBytes);

  await qemuPatterns(uri);
  await fioVerify(uri, scenario.fioBytes, dir);
  const throughMirror = await copyLegOut(uri, dir.path('mirror.out'), scenario.requestBytes);
  assertPatterns(throughMirror, scenario.fioBytes, 'read through the mirror');

  assert.equal(await mirror.stop('SIGTERM'), 0, `mirror exits 0 on SIGTERM:\n${mirror.stderr()}`);
  const images: Buffer[] = [];
  for (const leg of fixture.legs) images.push(await leg.contents());
  for (const [index, image] of images.entries()) {
    const what = `leg ${index} (${fixture.legs[index]?.kind})`;
    assert.equal(image.length, kLegBytes, `${what} size`);
    assertPatterns(image, scenario.fioBytes, what);
    assertSameOutsideDiscard(image, throughMirror, `${what} vs read through the mirror`);
    if (index > 0) assertSameOutsideDiscard(image, images[0] as Buffer, `${what} vs leg 0`);
  }
}

describe('enbd mirror: data reaches every leg identically', { skip: skipUnlessTools('nbdkit', 'qemu-io', 'fio', 'nbdcopy', 'nbdinfo') }, () => {
  test('2 legs: nbdkit memory + plain file', async () => {
    await runScenario({ legs: ['nbdkit', 'file'], fioBytes: 32 * kMiB });
  });

  test('3 legs: nbdkit memory + enbd serve + file:// leg', async () => {
    await runScenario({ legs: ['nbdkit', 'serve', 'file-uri'], fioBytes: 32 * kMiB });
  });

  test('--placement inline, 3 legs', async () => {
    await runScenario({ legs: ['serve', 'nbdkit', 'file'], args: ['--placement', 'inline'], fioBytes: 16 * kMiB });
  });

  test('--copy-mode per-leg, 3 legs', async () => {
    await runScenario({ legs: ['file', 'serve', 'nbdkit'], args: ['--copy-mode', 'per-leg'], fioBytes: 16 * kMiB });
  });

  test('TCP --listen 127.0.0.1:PORT, nbd://127.0.0.1:PORT/', async () => {
    await runScenario({ legs: ['nbdkit', 'file'], tcp: true, fioBytes: 16 * kMiB });
  });

  test('small ring (64 slots of 4K): requests larger than a slot and ring back-pressure', async () => {
    await runScenario({ legs: ['nbdkit', 'file'], args: ['--ring-slots', '64', '--slot-bytes', '4K', '--max-payload', '32K'], fioBytes: 8 * kMiB, requestBytes: 32 * 1024 });
  });

  // Regression: file legs ignore TRIM while nbdkit memory legs zero the range; the mirror now
  // sends TRIM to legs as WRITE_ZEROES (without NO_HOLE) so every leg stays identical.
  test('discard leaves every leg identical (nbdkit memory + file)', async () => {
    const fixture = await makeLegs(['nbdkit', 'file']);
    const socketPath = fixture.dir.path('mirror.sock');
    const mirror = await startMirror({ legs: fixture.legs.map((leg) => leg.spec), socketPath });
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 1M', '-c', 'discard 0 512k', '-c', 'flush', unixUri(socketPath)]);
    assert.equal(await mirror.stop(), 0);
    const images = await Promise.all(fixture.legs.map(async (leg) => await leg.contents()));
    assertFilled(images[0] as Buffer, 512 * 1024, 512 * 1024, 0x77, 'leg 0 undiscarded half');
    assertSameBytes(images[1] as Buffer, images[0] as Buffer, 'file leg vs nbdkit leg after discard');
  });
});
