/**
 * `enbd create` and `enbd examine` against real legs: an nbdkit memory leg, an nbdkit file leg
 * and a plain file leg (16 MiB each). Create writes one array UUID and distinct leg UUIDs on
 * every leg and leaves the data area alone; examine --json and the text report agree; a copy
 * corrupted by a direct write (NbdClient on one leg, nbdsh on another) makes examine use the
 * other copy and say so; create refuses legs that carry metadata (unless --force), legs of
 * different sizes; examine of a blank leg exits 1.
 * Threads: test process main thread; nbdkit and enbd are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { NbdClient } from '../../src/nbd/client/client.js';
import { computeLayout, defaultBitmapChunkBytes, superblockOffsets } from '../../src/meta/layout.js';
import { enbdCli, skipUnlessTools } from '../helpers/serve.js';
import { run, runOk, scratch, startNbdkit, unixUri, type Child, type RunResult, type Scratch } from '../helpers/tools.js';

const kLegBytes = 16 * 1024 * 1024;

interface ExamineJson {
  uri: string;
  usedCopy: number | null;
  copies: { copyIndex: number; status: string; reason: string | null; sequence: number | null }[];
  superblock: { arrayUuid: string; arrayName: string; legUuid: string; slotIndex: number; dataSizeBytes: number; members: { legUuid: string; state: string }[] } | null;
  dirtyChunks: number | null;
}

async function enbd(...args: string[]): Promise<RunResult> {
  return await run(process.execPath, [enbdCli, ...args], { timeoutMs: 30_000 });
}

async function examineJson(uri: string): Promise<ExamineJson> {
  const result = await enbd('examine', uri, '--json');
  assert.equal(result.status, 0, `examine ${uri}:\n${result.stderr}`);
  return JSON.parse(result.stdout) as ExamineJson;
}

describe('enbd create / enbd examine on real legs', { skip: skipUnlessTools('nbdkit', 'nbdsh') }, () => {
  let dir: Scratch;
  const servers: Child[] = [];
  let memoryUri: string;
  let nbdFileUri: string;
  let plainFile: string;
  let legs: string[];

  function sparse(name: string, sizeBytes: number): string {
    const path = dir.path(name);
    writeFileSync(path, '');
    truncateSync(path, sizeBytes);
    return path;
  }

  before(async () => {
    dir = scratch('enbd-meta-examine-');
    servers.push(await startNbdkit(dir.path('memory.sock'), ['memory', String(kLegBytes)]));
    servers.push(await startNbdkit(dir.path('file.sock'), ['file', sparse('nbd-file.img', kLegBytes)]));
    memoryUri = unixUri(dir.path('memory.sock'));
    nbdFileUri = unixUri(dir.path('file.sock'));
    plainFile = sparse('plain.img', kLegBytes);
    legs = [memoryUri, nbdFileUri, plainFile];
  });

  after(async () => {
    for (const server of servers) await server.stop();
    dir?.cleanup();
  });

  test('create writes one array UUID and distinct leg UUIDs on every leg; data untouched', async () => {
    await runOk('nbdsh', ['-u', memoryUri, '-c', 'h.pwrite(b"\\x5a" * 4096, 0)']);
    const created = await enbd('create', ...legs.flatMap((leg) => ['--leg', leg]), '--name', 'interop');
    assert.equal(created.status, 0, created.stderr);
    assert.match(created.stdout, /created array "interop" [0-9a-f-]{36} on 3 leg\(s\)/);
    const reports = await Promise.all(legs.map((leg) => examineJson(leg)));
    const layout = computeLayout(kLegBytes, defaultBitmapChunkBytes(kLegBytes));
    const arrayUuid = reports[0]?.superblock?.arrayUuid;
    assert.match(arrayUuid ?? '', /^[0-9a-f-]{36}$/);
    for (const [slot, report] of reports.entries()) {
      assert.ok(report.superblock !== null);
      assert.equal(report.superblock.arrayUuid, arrayUuid, `leg ${slot} in the same array`);
      assert.equal(report.superblock.arrayName, 'interop');
      assert.equal(report.superblock.slotIndex, slot);
      assert.equal(report.superblock.dataSizeBytes, layout.dataSizeBytes);
      assert.equal(report.superblock.members.length, 3);
      assert.equal(report.superblock.members[slot]?.legUuid, report.superblock.legUuid);
      assert.equal(report.superblock.members[slot]?.state, slot === 0 ? 'in-sync' : 'needs-full-sync');
      assert.deepEqual(report.copies.map((copy) => copy.status), ['valid', 'valid']);
      assert.equal(report.usedCopy, 1);
      assert.equal(report.dirtyChunks, 0);
    }
    assert.equal(new Set(reports.map((report) => report.superblock?.legUuid)).size, 3, 'leg UUIDs differ');
    // A leg stays a plain image: create wrote only the metadata area.
    const check = await run('nbdsh', ['-u', memoryUri, '-c', 'assert h.pread(4096, 0) == b"\\x5a" * 4096', '-c', `assert h.pread(${layout.metadataOffsetBytes - 4096}, 4096) == bytes(${layout.metadataOffsetBytes - 4096})`]);
    assert.equal(check.status, 0, check.stderr);
    const plain = readFileSync(plainFile);
    assert.ok(plain.subarray(0, layout.metadataOffsetBytes).every((byte) => byte === 0), 'plain leg data area untouched');
  });

  test('examine text report names the array, the used copy and the members', async () => {
    const json = await examineJson(nbdFileUri);
    const text = await enbd('examine', nbdFileUri);
    assert.equal(text.status, 0, text.stderr);
    assert.match(text.stdout, new RegExp(`Array UUID : ${json.superblock?.arrayUuid ?? 'x'}`));
    assert.match(text.stdout, /Superblock 1 : at \d+: valid, sequence 2, events 1 \(used\)/);
    assert.match(text.stdout, /Leg slot : 1 of 3/);
    assert.match(text.stdout, /\(this leg\)/);
  });

  test('a corrupted copy (NbdClient write, nbdsh write) makes examine use the other copy and say so', async () => {
    const offsets = superblockOffsets(kLegBytes);
    const client = await NbdClient.connect(memoryUri);
    try {
      await client.write(offsets[1] + 512, Buffer.alloc(512, 0xa5));
      await client.flush();
    } finally {
      await client.close();
    }
    const memory = await examineJson(memoryUri);
    assert.equal(memory.usedCopy, 0);
    assert.equal(memory.copies[1]?.status, 'invalid');
    assert.match(memory.copies[1]?.reason ?? '', /checksum mismatch/);
    assert.equal(memory.copies[0]?.status, 'valid');
    const text = await enbd('examine', memoryUri);
    assert.equal(text.status, 0, text.stderr);
    assert.match(text.stdout, /Used : copy 0 \(copy 1 is torn or invalid\)/);
    assert.match(text.stdout, /Superblock 1 : at \d+: INVALID: checksum mismatch/);

    await runOk('nbdsh', ['-u', nbdFileUri, '-c', `h.pwrite(b"\\x00" * 2048, ${offsets[0] + 2048})`, '-c', 'h.flush()']);
    const nbdFile = await examineJson(nbdFileUri);
    assert.equal(nbdFile.usedCopy, 1);
    assert.equal(nbdFile.copies[0]?.status, 'invalid');
    assert.equal(nbdFile.superblock?.slotIndex, 1, 'still the same superblock from copy 1');
  });

  test('create refuses legs with metadata without --force (legs unchanged), overwrites with it', async () => {
    const before = await examineJson(plainFile);
    const refused = await enbd('create', '--leg', plainFile, '--leg', sparse('fresh.img', kLegBytes));
    assert.equal(refused.status, 1);
    assert.match(refused.stderr, /^enbd: error: leg .*plain\.img already carries enbd metadata of array [0-9a-f-]{36}/m);
    assert.match(refused.stderr, /--force/);
    const blank = await enbd('examine', dir.path('fresh.img'));
    assert.equal(blank.status, 1, 'the fresh leg of the refused create got no metadata');
    const afterRefusal = await examineJson(plainFile);
    assert.equal(afterRefusal.superblock?.arrayUuid, before.superblock?.arrayUuid);
    // A leg with one torn copy still counts as carrying metadata.
    const torn = await enbd('create', '--leg', memoryUri);
    assert.equal(torn.status, 1);
    assert.match(torn.stderr, /already carries enbd metadata/);

    const forced = await enbd('create', '--leg', plainFile, '--leg', dir.path('fresh.img'), '--force', '--assume-clean', '--name', 'second');
    assert.equal(forced.status, 0, forced.stderr);
    assert.match(forced.stdout, new RegExp(`overwrote array ${before.superblock?.arrayUuid ?? 'x'}`));
    const [left, right] = [await examineJson(plainFile), await examineJson(dir.path('fresh.img'))];
    assert.notEqual(left.superblock?.arrayUuid, before.superblock?.arrayUuid);
    assert.equal(left.superblock?.arrayUuid, right.superblock?.arrayUuid);
    assert.deepEqual(right.superblock?.members.map((member) => member.state), ['in-sync', 'in-sync']);
  });

  test('create refuses legs of different sizes, naming each leg and size', async () => {
    const small = sparse('small.img', kLegBytes / 2);
    const result = await enbd('create', '--leg', small, '--leg', sparse('big.img', kLegBytes));
    assert.equal(result.status, 1);
    assert.match(result.stderr, /^enbd: error: legs differ in size/m);
    assert.ok(result.stderr.includes(`${small} is ${kLegBytes / 2} bytes`), result.stderr);
    assert.ok(result.stderr.includes(String(kLegBytes)), result.stderr);
  });

  test('create fails when two --leg values reach the same device', async () => {
    const path = sparse('twice.img', kLegBytes);
    const result = await enbd('create', '--leg', path, '--leg', `file://${path}`);
    assert.equal(result.status, 1);
    assert.match(result.stderr, /^enbd: error: leg .*twice\.img reads back slot 1's metadata .*both --leg values reach the same device/m);
  });

  test('examine of a blank leg and bad --bitmap-chunk values fail with enbd: error', async () => {
    const blank = await enbd('examine', sparse('blank.img', kLegBytes), '--json');
    assert.equal(blank.status, 1);
    assert.match(blank.stderr, /^enbd: error: .*carries no enbd metadata/m);
    assert.equal((JSON.parse(blank.stdout) as ExamineJson).usedCopy, null);
    const badChunk = await enbd('create', '--leg', sparse('chunk.img', kLegBytes), '--bitmap-chunk', '3000');
    assert.equal(badChunk.status, 1);
    assert.match(badChunk.stderr, /^enbd: error: bitmap chunk 3000 must be a power of two/m);
    const custom = await enbd('create', '--leg', dir.path('chunk.img'), '--bitmap-chunk', '64K');
    assert.equal(custom.status, 0, custom.stderr);
    assert.match(custom.stdout, /chunk 64\.0 KiB/);
  });
});
