/**
 * Issue 12: systemd socket activation (LISTEN_PID/LISTEN_FDS) for `enbd serve` and `enbd
 * mirror`, driven by libnbd's captive mode, which passes a listening socket as fd 3:
 * `nbdinfo --size -- [ enbd serve FILE ]`, `nbdcopy -- [ enbd serve FILE ] OUT` (bytes equal),
 * and nbdsh's connect_systemd_socket_activation writing through a mirror (both legs hold it).
 * Threads: test process main thread; enbd is a child of the libnbd tools.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { readRange, scratch, type Scratch } from '../helpers/tools.js';
import { runOk, skipUnlessTools } from '../helpers/serve.js';
import { enbdCli } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;

describe('socket activation', { skip: skipUnlessTools('nbdinfo', 'nbdcopy', 'nbdsh') }, () => {
  let dir: Scratch;
  let seq = 0;

  before(() => {
    dir = scratch('enbd-activation-');
  });

  after(() => {
    dir?.cleanup();
  });

  function sparse(bytes: number): string {
    seq += 1;
    const path = dir.path(`f${seq}.img`);
    const fd = openSync(path, 'w');
    ftruncateSync(fd, bytes);
    closeSync(fd);
    return path;
  }

  test('serve: nbdinfo --size and nbdcopy out through an inherited socket', async () => {
    const source = dir.path('source.img');
    const data = randomBytes(4 * kMiB);
    writeFileSync(source, data);
    const size = await runOk('nbdinfo', ['--size', '--', '[', process.execPath, enbdCli, 'serve', source, '--log-level', 'warn', ']']);
    assert.equal(size.stdout.trim(), String(data.length));
    const out = dir.path('out.img');
    await runOk('nbdcopy', ['--', '[', process.execPath, enbdCli, 'serve', source, '--log-level', 'warn', ']', out]);
    assert.ok(readFileSync(out).equals(data), 'the copy equals the served file');
  });

  test('mirror: nbdsh writes through an inherited socket; both legs hold the data', async () => {
    const legs = [sparse(8 * kMiB), sparse(8 * kMiB)];
    const argv = [process.execPath, enbdCli, 'mirror', '--leg', legs[0] ?? '', '--leg', legs[1] ?? '', '--metadata', 'none', '--control', 'none', '--log-level', 'warn'];
    const code = [
      `h.connect_systemd_socket_activation(${JSON.stringify(argv)})`,
      'assert h.get_size() == 8 * 1024 * 1024',
      'h.pwrite(b"\\x3c" * 65536, 2 * 1024 * 1024)',
      'h.flush()',
      'assert h.pread(65536, 2 * 1024 * 1024) == b"\\x3c" * 65536',
      'h.shutdown()',
    ].join('\n');
    await runOk('nbdsh', ['-c', code], { timeoutMs: 60_000 });
    for (const leg of legs) assert.ok(readRange(leg, 2 * kMiB, 65536).every((byte) => byte === 0x3c), `${leg} holds the write`);
  });
});
