/**
 * `enbd serve` under fio's nbd engine: deep-queue random writes with crc32c verification,
 * persistence checked by a verify-only run on a fresh connection, two jobs on two
 * connections at once (multi-conn), and a verify that must fail after the data is changed.
 * Runs are sized to take a few seconds.
 * Threads: test process main thread; server and fio are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { scratch, type RunResult, type Scratch } from '../helpers/tools.js';
import {
  assertServing,
  run,
  runOk,
  type ServerUnderTest,
  skipUnlessTools,
  startServerUnderTest,
} from '../helpers/serve.js';

const kSizeBytes = 64 * 1024 * 1024;

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number };
  write: { io_bytes: number };
}

describe('enbd serve + fio (nbd engine)', { skip: skipUnlessTools('fio', 'nbdsh', 'nbdinfo') }, () => {
  let dir: Scratch;
  let server: ServerUnderTest;
  let runIndex = 0;

  async function fio(args: string[]): Promise<{ result: RunResult; jobs: FioJob[] }> {
    runIndex += 1;
    const outputPath = dir.path(`fio-${runIndex}.json`);
    const result = await run('fio', [
      `--output=${outputPath}`,
      '--output-format=json',
      '--ioengine=nbd',
      `--uri=${server.uri()}`,
      '--bs=4k',
      ...args,
    ], { timeoutMs: 120_000 });
    let jobs: FioJob[] = [];
    try {
      jobs = (JSON.parse(readFileSync(outputPath, 'utf8')) as { jobs: FioJob[] }).jobs;
    } catch {
      // fio failed before writing JSON; the caller asserts on result.status.
    }
    return { result, jobs };
  }

  function assertClean(outcome: { result: RunResult; jobs: FioJob[] }, jobCount: number): void {
    const { result, jobs } = outcome;
    assert.equal(result.status, 0, `fio rc ${String(result.status)}: ${result.stdout}${result.stderr}`);
    assert.equal(jobs.length, jobCount);
    for (const job of jobs) assert.equal(job.error, 0, `job ${job.jobname} error ${job.error}`);
  }

  before(async () => {
    dir = scratch('enbd-fio-');
    writeFileSync(dir.path('disk.img'), '');
    truncateSync(dir.path('disk.img'), kSizeBytes);
    server = await startServerUnderTest({ file: dir.path('disk.img'), socketPath: dir.path('s.sock') });
  });

  after(async () => {
    await server?.stop();
    dir?.cleanup();
  });

  test('randwrite iodepth 32 with crc32c verify', async () => {
    const outcome = await fio([
      '--name=randverify',
      '--rw=randwrite',
      '--size=32M',
      '--iodepth=32',
      '--verify=crc32c',
      '--verify_fatal=1',
      '--do_verify=1',
    ]);
    assertClean(outcome, 1);
    const job = outcome.jobs[0];
    assert.ok(job);
    assert.equal(job.write.io_bytes, 32 * 1024 * 1024);
    assert.equal(job.read.io_bytes, 32 * 1024 * 1024, 'verify phase read everything back');
  });

  test('write with fsync, then verify_only on a new connection; a changed block fails verify', async () => {
    const common = ['--name=persist', '--rw=write', '--size=16M', '--offset=32M', '--iodepth=16', '--verify=crc32c'];
    assertClean(await fio([...common, '--do_verify=0', '--fsync=8']), 1);
    const verified = await fio([...common, '--verify_only=1', '--verify_fatal=1']);
    assertClean(verified, 1);
    assert.equal(verified.jobs[0]?.read.io_bytes, 16 * 1024 * 1024);
    // Change one 4 KiB block through NBD: verify_only must now fail (proves it checks).
    await runOk('nbdsh', ['-u', server.uri(), '-c', `h.pwrite(b"\\xee" * 4096, ${32 * 1024 * 1024 + 8 * 4096})`]);
    const broken = await fio([...common, '--verify_only=1', '--verify_fatal=1']);
    const failed = broken.result.status !== 0 || broken.jobs.some((job) => job.error !== 0);
    assert.ok(failed, 'verify_only must detect the changed block');
    await assertServing(server);
  });

  test('numjobs=2: two connections writing and verifying disjoint ranges', async () => {
    const outcome = await fio([
      '--name=multiconn',
      '--rw=randwrite',
      '--numjobs=2',
      '--size=16M',
      '--offset_increment=16M',
      '--iodepth=16',
      '--verify=crc32c',
      '--verify_fatal=1',
      '--do_verify=1',
      '--group_reporting=0',
    ]);
    assertClean(outcome, 2);
    for (const job of outcome.jobs) assert.equal(job.read.io_bytes, 16 * 1024 * 1024);
  });
});
