/**
 * `enbd serve` driven command by command through libnbd's Python binding (what nbdsh runs):
 * WRITE(+FUA), READ, FLUSH, TRIM, WRITE_ZEROES(+NO_HOLE, +FAST_ZERO), CACHE, BLOCK_STATUS
 * (+REQ_ONE), structured READ with DF, a simple-reply client, a non-fixed newstyle client,
 * the option phase step by step, and the server's errno for requests libnbd would normally
 * refuse to send (strict mode off). Data written through NBD is checked in the backing file.
 *
 * Each case is one Python script run with /usr/bin/python3 (Debian's python has `nbd`); the
 * script prints one JSON object of observations on its last line, asserted here in node.
 * Threads: test process main thread; server and python are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, truncateSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { readRange, scratch, type Scratch } from '../helpers/tools.js';
import {
  assertServing,
  runOk,
  type ServerUnderTest,
  skipUnlessTools,
  startServerUnderTest,
} from '../helpers/serve.js';

const kSizeBytes = 32 * 1024 * 1024;
const kName = 'named';

const kPrelude = String.raw`
import nbd, sys, json, errno as errno_module
out = {}
def err_name(fn):
    try:
        fn()
        return 'OK'
    except nbd.Error as e:
        code = e.errno
        if isinstance(code, int):
            return errno_module.errorcode.get(code, str(code))
        return str(code)
def connect(uri, strict=True, structured=True, meta=True):
    h = nbd.NBD()
    if not structured:
        h.set_request_structured_replies(False)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    if not strict:
        h.set_strict_mode(0)
    return h
def pattern():
    with open(sys.argv[2], 'rb') as f:
        return f.read()
`;

describe('enbd serve + nbdsh (libnbd python)', { skip: skipUnlessTools('nbdsh', 'nbdinfo') }, () => {
  let dir: Scratch;
  let server: ServerUnderTest;
  let readOnlyServer: ServerUnderTest;
  let patternPath: string;
  let pattern: Buffer;
  let scriptIndex = 0;

  /** Runs the script with argv [uri, patternPath, ...extra]; returns its JSON observations. */
  async function python(body: string, uri: string, extra: string[] = []): Promise<Record<string, unknown>> {
    scriptIndex += 1;
    const path = dir.path(`case-${scriptIndex}.py`);
    writeFileSync(path, `${kPrelude}\n${body}\nprint(json.dumps(out))\n`);
    const result = await runOk('/usr/bin/python3', [path, uri, patternPath, ...extra], { timeoutMs: 60_000 });
    const lines = result.stdout.trim().split('\n');
    return JSON.parse(lines[lines.length - 1] ?? '{}') as Record<string, unknown>;
  }

  before(async () => {
    dir = scratch('enbd-nbdsh-');
    writeFileSync(dir.path('disk.img'), '');
    truncateSync(dir.path('disk.img'), kSizeBytes);
    pattern = randomBytes(65536);
    patternPath = dir.path('pattern.bin');
    writeFileSync(patternPath, pattern);
    server = await startServerUnderTest({ file: dir.path('disk.img'), socketPath: dir.path('rw.sock'), name: kName });
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

  test('nbdsh -c: pwrite with FUA, pread, flush (the documented one-liner)', async () => {
    const offset = 3 * 65536;
    await runOk('nbdsh', [
      '-u',
      server.uri(),
      '-c',
      `h.pwrite(b"enbd"*128, ${offset}, nbd.CMD_FLAG_FUA)`,
      '-c',
      `assert h.pread(512, ${offset}) == b"enbd"*128`,
      '-c',
      'h.flush()',
    ]);
    assert.equal(readRange(server.file, offset, 512).toString(), 'enbd'.repeat(128));
    // The same check can fail: a wrong expectation makes nbdsh exit non-zero.
    await assert.rejects(runOk('nbdsh', ['-u', server.uri(), '-c', `assert h.pread(4, ${offset}) == b"nope"`]));
  });

  test('pwrite+FUA / pread / flush; bytes land in the backing file', async () => {
    const offset = 1024 * 1024 + 512;
    const seen = await python(
      String.raw`
h = connect(sys.argv[1])
data = pattern()
h.pwrite(data, ${offset}, nbd.CMD_FLAG_FUA)
out['readback'] = h.pread(len(data), ${offset}) == data
h.pwrite(data[:4096], ${offset} + 65536)
h.flush()
out['readback2'] = h.pread(4096, ${offset} + 65536) == data[:4096]
out['structured'] = h.get_structured_replies_negotiated()
h.shutdown()
`,
      server.uri(),
    );
    assert.deepEqual(seen, { readback: true, readback2: true, structured: true });
    assert.ok(readRange(server.file, offset, pattern.length).equals(pattern));
    assert.ok(readRange(server.file, offset + 65536, 4096).equals(pattern.subarray(0, 4096)));
  });

  test('trim, zero (+NO_HOLE, +FAST_ZERO), cache', async () => {
    const base = 4 * 1024 * 1024;
    const seen = await python(
      String.raw`
h = connect(sys.argv[1])
data = pattern()
for i in range(4):
    h.pwrite(data, ${base} + i * 65536)
h.trim(65536, ${base})
h.trim(4096, ${base} + 65536, nbd.CMD_FLAG_FUA)
h.pwrite(data, ${base})
out['after_trim_rewrite'] = h.pread(65536, ${base}) == data
h.zero(65536, ${base} + 65536)
out['zero'] = h.pread(65536, ${base} + 65536) == bytes(65536)
h.zero(65536, ${base} + 2 * 65536, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
out['zero_no_hole'] = h.pread(65536, ${base} + 2 * 65536) == bytes(65536)
out['fast_zero'] = err_name(lambda: h.zero(65536, ${base} + 3 * 65536, nbd.CMD_FLAG_FAST_ZERO))
out['fast_zero_read'] = h.pread(65536, ${base} + 3 * 65536) == bytes(65536)
h.cache(65536, ${base})
out['after_cache'] = h.pread(65536, ${base}) == data
h.flush()
h.shutdown()
`,
      server.uri(),
    );
    assert.equal(seen['after_trim_rewrite'], true);
    assert.equal(seen['zero'], true);
    assert.equal(seen['zero_no_hole'], true);
    assert.equal(seen['after_cache'], true);
    // FAST_ZERO: either done quickly (range reads as zero) or refused with ENOTSUP, range untouched.
    if (seen['fast_zero'] === 'OK') assert.equal(seen['fast_zero_read'], true);
    else assert.equal(seen['fast_zero'], 'ENOTSUP');
    assert.ok(readRange(server.file, base, 65536).equals(pattern));
    assert.ok(readRange(server.file, base + 65536, 2 * 65536).equals(Buffer.alloc(2 * 65536)));
  });

  test('block_status with and without REQ_ONE', async () => {
    const base = 8 * 1024 * 1024;
    const seen = await python(
      String.raw`
h = connect(sys.argv[1])
h.pwrite(pattern(), ${base})
out['can_meta'] = h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
calls = []
def cb(meta, offset, entries, err):
    calls.append([meta, offset, list(entries)])
    return 0
h.block_status(1 << 20, ${base}, cb)
out['all'] = calls
calls = []
h.block_status(1 << 20, ${base}, cb, nbd.CMD_FLAG_REQ_ONE)
out['one'] = calls
h.shutdown()
`,
      server.uri(),
    );
    assert.equal(seen['can_meta'], true);
    for (const key of ['all', 'one']) {
      const calls = seen[key] as Array<[string, number, number[]]>;
      assert.equal(calls.length, 1, `${key}: one callback per selected context`);
      const [meta, offset, entries] = calls[0] ?? ['', -1, []];
      assert.equal(meta, 'base:allocation');
      assert.equal(offset, base);
      assert.ok(entries.length >= 2 && entries.length % 2 === 0, `${key}: entries ${JSON.stringify(entries)}`);
      const firstLength = entries[0] ?? 0;
      const firstFlags = entries[1] ?? -1;
      assert.ok(firstLength > 0);
      assert.equal(firstFlags & 2, 0, 'written data must not be reported as zero');
      assert.ok(firstFlags >= 0 && firstFlags <= 3);
      if (key === 'one') {
        assert.equal(entries.length, 2, 'REQ_ONE: exactly one extent');
        assert.ok(firstLength <= 1 << 20, 'REQ_ONE: extent within the request');
      }
    }
  });

  test('pread_structured with DF: one content chunk, data intact', async () => {
    const base = 12 * 1024 * 1024;
    const seen = await python(
      String.raw`
h = connect(sys.argv[1])
data = pattern()
h.pwrite(data, ${base})
out['can_df'] = h.can_df()
chunks = []
def chunk(buf, offset, status, err):
    chunks.append([bytes(buf), offset, status])
    return 0
buf = h.pread_structured(len(data), ${base}, chunk, nbd.CMD_FLAG_DF)
out['data_ok'] = bytes(buf) == data
out['chunks'] = [[c[1], c[2], len(c[0])] for c in chunks]
out['chunk_data_ok'] = all(c[2] != nbd.READ_DATA or c[0] == data[c[1] - ${base}:c[1] - ${base} + len(c[0])] for c in chunks)
out['READ_DATA'] = nbd.READ_DATA
h.shutdown()
`,
      server.uri(),
    );
    assert.equal(seen['can_df'], true);
    assert.equal(seen['data_ok'], true);
    assert.equal(seen['chunk_data_ok'], true);
    const chunks = seen['chunks'] as Array<[number, number, number]>;
    assert.equal(chunks.length, 1, `DF: not fragmented, got ${JSON.stringify(chunks)}`);
    assert.deepEqual(chunks[0], [base, seen['READ_DATA'], 65536]);
  });

  test('simple-reply client (no structured replies)', async () => {
    const seen = await python(
      String.raw`
h = connect(sys.argv[1], structured=False, meta=False)
out['structured'] = h.get_structured_replies_negotiated()
data = pattern()
h.pwrite(data, 16 << 20, nbd.CMD_FLAG_FUA)
out['readback'] = h.pread(len(data), 16 << 20) == data
h.zero(4096, 16 << 20)
out['zeroed'] = h.pread(4096, 16 << 20) == bytes(4096)
h.set_strict_mode(0)
out['past_end'] = err_name(lambda: h.pread(1024, h.get_size() - 512))
out['still_ok'] = h.pread(512, (16 << 20) + 4096) == data[4096:4608]
h.shutdown()
`,
      server.uri(),
    );
    assert.deepEqual(seen, { structured: false, readback: true, zeroed: true, past_end: 'EINVAL', still_ok: true });
  });

  test('non-fixed newstyle client (EXPORT_NAME), default and named export', async () => {
    const seen = await python(
      String.raw`
res = {}
for key, uri in (('default', sys.argv[1]), ('named', sys.argv[3])):
    h = nbd.NBD()
    h.set_handshake_flags(0)
    h.connect_uri(uri)
    data = pattern()[:8192]
    h.pwrite(data, 20 << 20)
    res[key] = [h.get_protocol(), h.get_size(), h.pread(8192, 20 << 20) == data]
    h.shutdown()
out.update(res)
`,
      server.uri(),
      [server.uri(kName)],
    );
    assert.deepEqual(seen, {
      default: ['newstyle', kSizeBytes, true],
      named: ['newstyle', kSizeBytes, true],
    });
  });

  test('option phase step by step: LIST, LIST_META_CONTEXT, INFO, GO; unknown export', async () => {
    const seen = await python(
      String.raw`
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
names = []
h.opt_list(lambda name, desc: names.append(name))
out['list'] = names
h.add_meta_context('base:')
contexts = []
h.opt_list_meta_context(lambda ctx: contexts.append(ctx))
out['contexts'] = contexts
h.opt_info()
out['info_size'] = h.get_size()
out['info_ro'] = h.is_read_only()
h.set_export_name('no-such-export')
out['bogus_info'] = err_name(lambda: h.opt_info())
out['bogus_go'] = err_name(lambda: h.opt_go())
h.set_export_name('')
h.clear_meta_contexts()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.opt_go()
out['go_size'] = h.get_size()
out['meta'] = h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
out['read'] = len(h.pread(4096, 0))
h.shutdown()
`,
      server.uri(),
    );
    assert.ok((seen['list'] as string[]).includes(kName), `LIST: ${JSON.stringify(seen['list'])}`);
    assert.ok((seen['contexts'] as string[]).includes('base:allocation'));
    assert.equal(seen['info_size'], kSizeBytes);
    assert.equal(seen['info_ro'], false);
    assert.equal(seen['bogus_info'], 'ENOENT', 'ERR_UNKNOWN maps to ENOENT in libnbd');
    assert.equal(seen['bogus_go'], 'ENOENT');
    assert.equal(seen['go_size'], kSizeBytes);
    assert.equal(seen['meta'], true);
    assert.equal(seen['read'], 4096);
  });

  test('server errno for bad requests (strict mode off)', async () => {
    const seen = await python(
      String.raw`
h = connect(sys.argv[1], strict=False)
S = h.get_size()
out['read_past_end'] = err_name(lambda: h.pread(1024, S - 512))
out['read_at_end'] = err_name(lambda: h.pread(512, S))
out['write_past_end'] = err_name(lambda: h.pwrite(b'x' * 1024, S - 512))
out['write_far'] = err_name(lambda: h.pwrite(b'x' * 512, 1 << 40))
out['zero_past_end'] = err_name(lambda: h.zero(1024, S - 512))
out['trim_past_end'] = err_name(lambda: h.trim(1024, S - 512))
out['cache_past_end'] = err_name(lambda: h.cache(1024, S - 512))
out['status_past_end'] = err_name(lambda: h.block_status(1024, S + 512, lambda *a: 0))
out['write_fast_zero'] = err_name(lambda: h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FAST_ZERO))
out['write_no_hole'] = err_name(lambda: h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_NO_HOLE))
out['trim_fast_zero'] = err_name(lambda: h.trim(512, 0, nbd.CMD_FLAG_FAST_ZERO))
out['read_req_one'] = err_name(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE))
out['read_unknown_flag'] = err_name(lambda: h.pread(512, 0, 0x40))
out['still_ok'] = err_name(lambda: h.pread(512, 0))
h.shutdown()
h = connect(sys.argv[1], strict=False)
out['read_too_big'] = err_name(lambda: h.pread(33 * 1024 * 1024, 0))
out['after_too_big'] = err_name(lambda: h.pread(512, 0))
h.shutdown()
`,
      server.uri(),
    );
    assert.equal(seen['read_past_end'], 'EINVAL');
    assert.equal(seen['read_at_end'], 'EINVAL');
    assert.equal(seen['write_past_end'], 'ENOSPC');
    assert.equal(seen['write_far'], 'ENOSPC');
    assert.equal(seen['zero_past_end'], 'ENOSPC');
    assert.ok(['EINVAL', 'ENOSPC'].includes(String(seen['trim_past_end'])), `trim: ${String(seen['trim_past_end'])}`);
    assert.equal(seen['cache_past_end'], 'EINVAL');
    assert.equal(seen['status_past_end'], 'EINVAL');
    assert.equal(seen['write_fast_zero'], 'EINVAL');
    assert.equal(seen['write_no_hole'], 'EINVAL');
    assert.equal(seen['trim_fast_zero'], 'EINVAL');
    assert.equal(seen['read_req_one'], 'EINVAL');
    assert.equal(seen['read_unknown_flag'], 'EINVAL');
    assert.equal(seen['still_ok'], 'OK');
    assert.ok(['EINVAL', 'EOVERFLOW'].includes(String(seen['read_too_big'])), `too big: ${String(seen['read_too_big'])}`);
    assert.equal(seen['after_too_big'], 'OK');
    await assertServing(server);
  });

  test('read-only export: write, trim, zero -> EPERM; reads and cache fine', async () => {
    const seen = await python(
      String.raw`
h = connect(sys.argv[1], strict=False)
out['ro'] = h.is_read_only()
out['write'] = err_name(lambda: h.pwrite(b'x' * 512, 0))
out['write_fua'] = err_name(lambda: h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA))
out['trim'] = err_name(lambda: h.trim(512, 0))
out['zero'] = err_name(lambda: h.zero(512, 0))
out['read'] = err_name(lambda: h.pread(512, 0))
out['cache'] = err_name(lambda: h.cache(512, 0))
h.shutdown()
`,
      readOnlyServer.uri(),
    );
    assert.deepEqual(seen, {
      ro: true,
      write: 'EPERM',
      write_fua: 'EPERM',
      trim: 'EPERM',
      zero: 'EPERM',
      read: 'OK',
      cache: 'OK',
    });
    const before = readRange(server.file, 0, 512);
    assert.ok(!before.equals(Buffer.alloc(512, 'x')), 'read-only export did not write');
    await assertServing(readOnlyServer);
  });
});
