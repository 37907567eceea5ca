/**
 * Flag and config errors, table-driven, against the real CLI: value-taking flags of every command
 * and config keys of `enbd mirror --config` (every mirror flag and key is checked in-process by
 * test/unit/cli/settings-errors.test.ts; a CLI start-up per row is slow), each with a bad value. Each must exit
 * 2 (a usage error, as commander's own) with one line in one form:
 *   enbd: error: FLAG must be WHAT, got VALUE
 * where FLAG is the flag as written (`--ring-slots`) or the key and file (`legTimeoutMs in
 * bad.yaml`), and no error code (ENBD_ERR_...) or internal name (ring.slotCount, params.leg)
 * appears. No daemon is needed: values are checked before anything opens or connects.
 * Thread: test main thread; the CLI runs as child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, mkdirSync, openSync, truncateSync, writeFileSync } from 'node:fs';
import { scratch, type Scratch } from '../helpers/tools.js';
import { enbdCli } from '../helpers/mirror.js';
import { run } from '../helpers/serve.js';

/** [args, the flag as named in the message, the value as shown] */
type Row = [string[], string, string];

describe('flag and config errors: one form, the flag as written, exit 2', () => {
  let dir: Scratch;
  let leg = '';

  before(() => {
    dir = scratch('enbd-flag-errors-');
    leg = dir.path('leg.img');
    closeSync(openSync(leg, 'w'));
    truncateSync(leg, 16 * 1024 * 1024);
  });

  after(() => dir?.cleanup());

  async function refusedWith(args: string[], flag: string, value: string): Promise<void> {
    const result = await run(process.execPath, [enbdCli, ...args], { timeoutMs: 30_000 });
    const first = result.stderr.split('\n')[0] ?? '';
    assert.equal(result.status, 2, `enbd ${args.join(' ')} exits 2, got ${String(result.status)}: ${result.stderr}`);
    const escaped = (text: string): string => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    assert.match(first, new RegExp(`^enbd: error: ${escaped(flag)} must be .+, got ${escaped(value)}$`), `enbd ${args.join(' ')}`);
    assert.doesNotMatch(result.stderr, /ENBD_ERR|ring\.|params\.|slotCount|options\.|undefined|NaN/, `no codes or internal names: ${result.stderr}`);
    assert.equal(result.stdout, '', 'nothing on stdout');
  }

  /** Runs the rows four at a time (each is a node start-up; the machine has 2 cores). */
  async function refusedAll(rows: Row[]): Promise<void> {
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < rows.length) {
        const [args, flag, value] = rows[next++] as Row;
        await refusedWith(args, flag, value);
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
  }

  const mirrorRows = (): Row[] => {
    const m = (...args: string[]): string[] => ['mirror', '--leg', leg, '--socket', dir.path('m.sock'), ...args];
    return [
      [m('--ring-slots', '3'), '--ring-slots', '3'],
      [m('--slot-bytes', '1000'), '--slot-bytes', '1000'],
      [m('--leg-timeout', '50ms'), '--leg-timeout', '50ms'],
      [m('--resync-rate-min', 'fast'), '--resync-rate-min', 'fast'],
      [m('--listen', '99999'), '--listen', '99999'],
      [m('--log-level', 'loud'), '--log-level', 'loud'],
      [['mirror', '--leg', `x.y=${leg}`], '--leg', JSON.stringify(`x.y=${leg}`)],
      [['mirror', '--leg', 'b='], '--leg', '"b="'],
    ];
  };

  test('enbd mirror: every flag', async () => {
    await refusedAll(mirrorRows());
  });

  test('enbd mirror --config: every key named as written in the file', async () => {
    // every key is checked in-process by test/unit/cli/settings-errors.test.ts; these go through the CLI
    const rows: Array<[string, unknown, string]> = [['ringSlots', 3, '3'], ['legTimeoutMs', '50ms', '50ms'], ['readOnly', 'yes please', '"yes please"']];
    await refusedAll(rows.map(([key, value, shown], at) => {
      const file = dir.path(`bad${at}/bad.yaml`);
      mkdirSync(dir.path(`bad${at}`));
      writeFileSync(file, JSON.stringify({ legs: [leg], socket: dir.path('c.sock'), [key]: value }));
      return [['mirror', '--config', file], `${key} in bad.yaml`, shown];
    }));
    const file = dir.path('bad.yaml');
    writeFileSync(file, JSON.stringify({ legs: [{ name: 'a b', uri: leg }] }));
    await refusedWith(['mirror', '--config', file], 'the leg name in legs in bad.yaml', '"a b"');
    writeFileSync(file, JSON.stringify({ legs: leg }));
    await refusedWith(['mirror', '--config', file], 'legs in bad.yaml', leg);
    // a flag still wins over the file, and is named as the flag
    writeFileSync(file, JSON.stringify({ legs: [leg], ringSlots: 3 }));
    await refusedWith(['mirror', '--config', file, '--ring-slots', '5'], '--ring-slots', '5');
    writeFileSync(file, JSON.stringify({ legs: [leg], bogusKey: 1 }));
    const unknown = await run(process.execPath, [enbdCli, 'mirror', '--config', file], { timeoutMs: 30_000 });
    assert.equal(unknown.status, 2);
    assert.match(unknown.stderr, /^enbd: error: bogusKey in bad\.yaml is not a setting \(settings: legs, /);
  });

  test('enbd serve, create and the client commands', async () => {
    const rows: Row[] = [
      [['serve', leg, '--io', 'fast'], '--io', 'fast'],
      [['serve', leg, '--max-payload', 'lots'], '--max-payload', 'lots'],
      [['serve', leg, '-p', '70000'], '-p/--port', '70000'],
      [['create', '--leg', leg, '--bitmap-chunk', '3000'], '--bitmap-chunk', '3000'],
      [['status', '--watch', '--interval', '5'], '--interval', '5'],
      [['status', '--watch', '--count', '0'], '--count', '0'],
      [['wait', '--timeout', 'soon'], '--timeout', 'soon'],
      [['resync', 'rate', '--min', 'fast'], '--min', 'fast'],
      [['leg', 'fail', '99'], '<leg>', '99'],
      [['leg', 'add', '7=/tmp/x.img'], '<[name=]uri>', '"7=/tmp/x.img"'],
      [['log-level', 'loud'], '<level>', 'loud'],
    ];
    await refusedAll(rows);
  });
});
