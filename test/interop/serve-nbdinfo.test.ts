/**
 * `enbd serve` seen by nbdinfo (libnbd): handshake, export info, every transmission flag,
 * block sizes, meta contexts, LIST, base:allocation map and size, over a Unix socket and TCP,
 * writable and read-only. ENBD_TEST_REFERENCE=nbdkit runs the same checks against nbdkit.
 * Threads: test process main thread; the server is a child process.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { openSync, writeSync, closeSync, ftruncateSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { scratch, type Scratch } from '../helpers/tools.js';
import {
  assertServing,
  enbdCli,
  referenceKind,
  run,
  runOk,
  type ServerUnderTest,
  skipUnlessTools,
  startServerUnderTest,
} from '../helpers/serve.js';

const kSizeBytes = 64 * 1024 * 1024;
const kDataOffsetBytes = 4 * 1024 * 1024;
const kDataBytes = 1024 * 1024;
const kName = 'disk1';
const kDescription = 'enbd interop disk';

interface ExportJson {
  'export-name': string;
  'export-size': number;
  description?: string;
  contexts?: string[];
  is_read_only: boolean;
  is_rotational: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
}

interface InfoJson {
  protocol: string;
  TLS: boolean;
  structured: boolean;
  exports: ExportJson[];
}

function makeBackingFile(path: string): Buffer {
  const data = randomBytes(kDataBytes);
  const fd = openSync(path, 'w');
  ftruncateSync(fd, kSizeBytes);
  writeSync(fd, data, 0, data.length, kDataOffsetBytes);
  closeSync(fd);
  return data;
}

async function infoJson(uri: string, extra: string[] = []): Promise<InfoJson> {
  const result = await runOk('nbdinfo', ['--json', ...extra, uri]);
  return JSON.parse(result.stdout) as InfoJson;
}

function assertWritableExport(info: ExportJson): void {
  assert.equal(info['export-size'], kSizeBytes);
  assert.equal(info.is_read_only, false);
  assert.equal(info.is_rotational, false);
  assert.equal(info.can_cache, true, 'SEND_CACHE');
  assert.equal(info.can_df, true, 'SEND_DF');
  assert.equal(info.can_fast_zero, true, 'SEND_FAST_ZERO');
  assert.equal(info.can_flush, true, 'SEND_FLUSH');
  assert.equal(info.can_fua, true, 'SEND_FUA');
  assert.equal(info.can_multi_conn, true, 'CAN_MULTI_CONN');
  assert.equal(info.can_trim, true, 'SEND_TRIM');
  assert.equal(info.can_zero, true, 'SEND_WRITE_ZEROES');
  assert.equal(info.block_size_minimum, 1);
  assert.equal(info.block_size_preferred, 4096);
  assert.equal(info.block_size_maximum, 32 * 1024 * 1024);
  assert.ok(info.contexts?.includes('base:allocation'), `contexts: ${JSON.stringify(info.contexts)}`);
}

interface MapEntry {
  offset: number;
  length: number;
  type: number;
}

function parseMap(stdout: string): MapEntry[] {
  return stdout
    .trim()
    .split('\n')
    .map((line) => {
      const [offset, length, type] = line.trim().split(/\s+/).map(Number);
      assert.ok(offset !== undefined && length !== undefined && type !== undefined, `bad map line ${line}`);
      return { offset, length, type };
    });
}

describe('enbd serve + nbdinfo', { skip: skipUnlessTools('nbdinfo') }, () => {
  let dir: Scratch;
  let server: ServerUnderTest;
  let readOnlyServer: ServerUnderTest;

  before(async () => {
    dir = scratch('enbd-nbdinfo-');
    makeBackingFile(dir.path('disk.img'));
    server = await startServerUnderTest({
      file: dir.path('disk.img'),
      socketPath: dir.path('rw.sock'),
      name: kName,
      description: kDescription,
      tcp: true,
    });
    readOnlyServer = await startServerUnderTest({
      file: dir.path('disk.img'),
      socketPath: dir.path('ro.sock'),
      readOnly: true,
    });
  });

  after(async () => {
    await server?.stop();
    await readOnlyServer?.stop();
    dir?.cleanup();
  });

  test('plain nbdinfo output over the Unix socket', async () => {
    const { stdout } = await runOk('nbdinfo', [server.uri()]);
    assert.match(stdout, /protocol: newstyle-fixed without TLS, using structured packets/);
    // NBD_INFO_NAME may give the canonical name for the default export (spec allows it).
    assert.match(stdout, new RegExp(`export="(|${kName})":`));
    assert.match(stdout, new RegExp(`export-size: ${kSizeBytes} `));
    assert.match(stdout, /base:allocation/);
    assert.match(stdout, /is_read_only: false/);
    assert.match(stdout, /can_fua: true/);
    assert.match(stdout, /block_size_preferred: 4096/);
  });

  test('nbdinfo --json: size, every flag, block sizes, contexts (default export)', async () => {
    const info = await infoJson(server.uri());
    assert.equal(info.protocol, 'newstyle-fixed');
    assert.equal(info.TLS, false);
    assert.equal(info.structured, true);
    assert.equal(info.exports.length, 1);
    const only = info.exports[0];
    assert.ok(only);
    assert.ok(['', kName].includes(only['export-name']), `export-name ${only['export-name']}`);
    assertWritableExport(only);
  });

  test('nbdinfo --json on the named export, with description', async () => {
    const info = await infoJson(server.uri(kName));
    const only = info.exports[0];
    assert.ok(only);
    assert.equal(only['export-name'], kName);
    assert.equal(only.description, kDescription);
    assertWritableExport(only);
  });

  test('nbdinfo --json over TCP', async () => {
    const info = await infoJson(server.tcpUri());
    assert.equal(info.structured, true);
    const only = info.exports[0];
    assert.ok(only);
    assertWritableExport(only);
    const named = await runOk('nbdinfo', ['--size', server.tcpUri(kName)]);
    assert.equal(named.stdout.trim(), String(kSizeBytes));
  });

  test('nbdinfo --list lists the export(s), each with the file size', async () => {
    for (const uri of [server.uri(), server.tcpUri()]) {
      const info = await infoJson(uri, ['--list']);
      assert.ok(info.exports.length >= 1);
      const names = info.exports.map((entry) => entry['export-name']);
      assert.ok(names.includes(kName), `--list names: ${JSON.stringify(names)}`);
      for (const entry of info.exports) {
        assert.equal(entry['export-size'], kSizeBytes);
        assertWritableExport(entry);
      }
    }
  });

  test('nbdinfo --size over Unix and TCP', async () => {
    assert.equal((await runOk('nbdinfo', ['--size', server.uri()])).stdout.trim(), String(kSizeBytes));
    assert.equal((await runOk('nbdinfo', ['--size', server.tcpUri()])).stdout.trim(), String(kSizeBytes));
  });

  test('nbdinfo --map covers the export; written data is not reported as zero', async () => {
    for (const uri of [server.uri(), server.tcpUri()]) {
      const mapText = (await runOk('nbdinfo', ['--map', uri])).stdout;
      const context = `${uri}:\n${mapText}`;
      let next = 0;
      for (const entry of parseMap(mapText)) {
        assert.equal(entry.offset, next, `extents are contiguous; ${context}`);
        assert.ok(entry.length > 0, context);
        assert.ok(entry.type >= 0 && entry.type <= 3, `type ${entry.type}; ${context}`);
        const end = entry.offset + entry.length;
        const overlapsData = entry.offset < kDataOffsetBytes + kDataBytes && end > kDataOffsetBytes;
        if (overlapsData) assert.equal(entry.type & 2, 0, `data range reported as zero; ${context}`);
        next = end;
      }
      assert.equal(next, kSizeBytes, `map covers the whole export; ${context}`);
      const totals = (await runOk('nbdinfo', ['--map', '--totals', uri])).stdout;
      assert.match(totals, /\d+\s+[\d.]+%\s+\d/);
    }
  });

  test('nbdinfo --can / --is answer per flag', async () => {
    for (const key of ['flush', 'fua', 'trim', 'zero', 'fast-zero', 'df', 'multi-conn', 'cache', 'structured-reply']) {
      const result = await run('nbdinfo', ['--can', key, server.uri()]);
      assert.equal(result.status, 0, `--can ${key}: ${result.stderr}`);
    }
    assert.equal((await run('nbdinfo', ['--is', 'read-only', server.uri()])).status, 2);
    assert.equal((await run('nbdinfo', ['--is', 'read-only', readOnlyServer.uri()])).status, 0);
  });

  test('read-only export: is_read_only and no write-ish flags', async () => {
    const info = await infoJson(readOnlyServer.uri());
    const only = info.exports[0];
    assert.ok(only);
    assert.equal(only['export-size'], kSizeBytes);
    assert.equal(only.is_read_only, true);
    assert.equal(only.can_fua, false, 'SEND_FUA is write-ish: dropped on a read-only export (as nbdkit -r does)');
    assert.equal(only.can_trim, false);
    assert.equal(only.can_zero, false);
    assert.equal(only.can_fast_zero, false);
    assert.ok(only.contexts?.includes('base:allocation'));
    for (const key of ['trim', 'zero', 'fua']) {
      assert.equal((await run('nbdinfo', ['--can', key, readOnlyServer.uri()])).status, 2, `--can ${key}`);
    }
  });

  test('an unknown export name is refused and the server keeps serving', async () => {
    const result = await run('nbdinfo', ['--size', server.uri('no-such-export')]);
    assert.notEqual(result.status, 0);
    assert.match(result.stderr, /no-such-export|No such file|unknown/i);
    await assertServing(server);
  });
});

describe('enbd serve lifecycle', { skip: skipUnlessTools('nbdinfo') }, () => {
  test('SIGTERM stops the server with exit status 0', async (t) => {
    const dir = scratch('enbd-life-');
    t.after(() => dir.cleanup());
    makeBackingFile(dir.path('disk.img'));
    const server = await startServerUnderTest({ file: dir.path('disk.img'), socketPath: dir.path('s.sock') });
    await assertServing(server);
    const codes = await server.stop('SIGTERM');
    assert.deepEqual(codes, [0], server.output());
  });

  test('bad command lines fail with a clear message', { skip: referenceKind === 'nbdkit' ? 'enbd CLI only' : false }, async (t) => {
    const dir = scratch('enbd-cli-');
    t.after(() => dir.cleanup());
    makeBackingFile(dir.path('disk.img'));
    const cases: Array<{ args: string[]; codes: number[]; pattern: RegExp }> = [
      { args: ['serve', dir.path('missing.img'), '--socket', dir.path('a.sock')], codes: [1, 2], pattern: /missing\.img/ },
      { args: ['serve', dir.path('disk.img'), '--socket', dir.path('b.sock'), '--bogus-flag'], codes: [2], pattern: /bogus-flag/ },
      { args: ['serve', dir.path('disk.img'), '--socket', dir.path('c.sock'), '--max-payload', 'lots'], codes: [1, 2], pattern: /max-payload|lots/ },
      { args: ['serve'], codes: [2], pattern: /file/ },
    ];
    for (const entry of cases) {
      const result = await run(process.execPath, [enbdCli, ...entry.args], { timeoutMs: 20_000 });
      assert.ok(entry.codes.includes(result.status ?? -1), `${entry.args.join(' ')} -> ${String(result.status)}: ${result.stderr}`);
      assert.match(result.stderr, entry.pattern);
    }
  });
});
