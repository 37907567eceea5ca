/**
 * Issue 12: when stderr is the journal ($JOURNAL_STREAM = stderr's device:inode, as systemd
 * sets it), every log line starts with its syslog priority (`<6>` info, `<3>` error, ...), so
 * `journalctl -p err` works; without it (or when it names another file) the lines are plain
 * JSON. The daemon's stderr is a file here, and JOURNAL_STREAM names that file.
 * Threads: test process main thread; enbd is a child process.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, fstatSync, ftruncateSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { syslogPriority } from '../../src/core/log.js';
import { scratch, toolEnv, unixAccepts, waitFor, type Scratch } from '../helpers/tools.js';
import { enbdCli } from '../helpers/mirror.js';

describe('journal priorities', () => {
  let dir: Scratch;

  before(() => {
    dir = scratch('enbd-journal-');
  });

  after(() => {
    dir?.cleanup();
  });

  test('syslogPriority maps every pino level', () => {
    assert.deepEqual([60, 50, 40, 30, 20, 10].map(syslogPriority), [2, 3, 4, 6, 7, 7]);
  });

  async function mirrorWithStderrFile(journal: 'same' | 'other' | 'none'): Promise<string[]> {
    const legs = ['a', 'b'].map((name) => {
      const path = dir.path(`${journal}-${name}.img`);
      const fd = openSync(path, 'w');
      ftruncateSync(fd, 4 * 1024 * 1024);
      closeSync(fd);
      return path;
    });
    const config = dir.path(`${journal}.yaml`);
    const socket = dir.path(`${journal}.sock`);
    writeFileSync(config, `legs: [${legs.join(', ')}]\nsocket: ${socket}\nlogLevel: info\n`);
    const logPath = dir.path(`${journal}.log`);
    const logFd = openSync(logPath, 'w');
    const stats = fstatSync(logFd, { bigint: true });
    const env: NodeJS.ProcessEnv = { ...toolEnv, ENBD_LOG_JSON: '1' };
    if (journal === 'same') env['JOURNAL_STREAM'] = `${stats.dev}:${stats.ino}`;
    if (journal === 'other') env['JOURNAL_STREAM'] = `${stats.dev}:${stats.ino + 1n}`;
    const child = spawn(process.execPath, [enbdCli, 'mirror', '--config', config, '--metadata', 'none', '--control', 'none'], { env, stdio: ['ignore', 'ignore', logFd] });
    closeSync(logFd);
    const exited = new Promise<number | null>((resolveExit) => child.once('exit', (code) => resolveExit(code)));
    try {
      await waitFor('the mirror to listen', () => readFileSync(logPath, 'utf8').includes('listening on Unix socket'), 20_000);
      assert.ok(await unixAccepts(socket));
      writeFileSync(config, 'legs: [broken\n'); // the reload fails: an error line
      child.kill('SIGHUP');
      await waitFor('the reload error', () => readFileSync(logPath, 'utf8').includes('SIGHUP: reload failed'), 10_000);
    } finally {
      child.kill('SIGTERM');
    }
    assert.equal(await exited, 0);
    return readFileSync(logPath, 'utf8').split('\n').filter((line) => line !== '');
  }

  test('stderr is the journal: <priority> before every line; error lines are <3>', async () => {
    const lines = await mirrorWithStderrFile('same');
    for (const line of lines) assert.match(line, /^<[2-7]>\{"level":\d+/, line);
    const listening = lines.find((line) => line.includes('listening on Unix socket')) ?? '';
    assert.match(listening, /^<6>\{"level":30,/);
    const failed = lines.find((line) => line.includes('SIGHUP: reload failed')) ?? '';
    assert.match(failed, /^<3>\{"level":50,/);
  });

  test('JOURNAL_STREAM naming another file, or none: plain JSON lines', async () => {
    for (const journal of ['other', 'none'] as const) {
      const lines = await mirrorWithStderrFile(journal);
      assert.ok(lines.length > 0);
      for (const line of lines) assert.match(line, /^\{"level":\d+/, `${journal}: ${line}`);
    }
  });
});
