/**
 * `enbd status --watch` on a real terminal: tmux panes of 80 and 120 columns run it against a
 * mirror of two nbdkit memory legs while leg b is failed, reconnected and resynced (with a
 * resync ceiling, so the bar is on screen for a while); `tmux capture-pane` then checks what a
 * person sees: no line longer than the pane, the header complete, each leg exactly once, the
 * bar complete while the resync runs, and after it finishes each leg once more, in sync, with
 * the event lines above the table.
 * Threads: test process main thread; the daemon, nbdkit, tmux and the CLI are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { randomBytes } from 'node:crypto';
import { NbdClient } from '../../src/nbd/client/client.js';
import { scratch, startNbdkit, unixUri, type Child, type Scratch } from '../helpers/tools.js';
import { run, skipUnlessTools } from '../helpers/serve.js';
import { enbdCli, startMirror, stopAllMirrors } from '../helpers/mirror.js';

const kLegBytes = 32 * 1024 * 1024;

describe('enbd status --watch in tmux at 80 and 120 columns', { skip: skipUnlessTools('nbdkit', 'tmux') }, () => {
  let dir: Scratch;
  const children: Child[] = [];
  let tmuxSocket = '';

  before(() => {
    dir = scratch('enbd-watch-');
    tmuxSocket = dir.path('tmux.sock');
  });

  after(async () => {
    await run('tmux', ['-S', tmuxSocket, 'kill-server'], { timeoutMs: 10_000 }).catch(() => undefined);
    await stopAllMirrors();
    await Promise.all(children.map(async (child) => await child.stop('SIGKILL')));
    dir?.cleanup();
  });

  async function tmux(args: string[]): Promise<string> {
    const result = await run('tmux', ['-S', tmuxSocket, ...args], { timeoutMs: 10_000 });
    assert.equal(result.status, 0, `tmux ${args.join(' ')}: ${result.stderr}`);
    return result.stdout;
  }

  async function capture(pane: string): Promise<string[]> {
    const text = await tmux(['capture-pane', '-p', '-t', pane]);
    return text.split('\n').map((line) => line.trimEnd());
  }

  async function waitScreen(pane: string, what: string, predicate: (lines: string[]) => boolean, timeoutMs = 60_000): Promise<string[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const lines = await capture(pane);
      if (predicate(lines)) return lines;
      if (Date.now() > deadline) assert.fail(`${pane}: timed out waiting for ${what}; screen:\n${lines.join('\n')}`);
      await sleep(200);
    }
  }

  async function cli(control: string, args: string[]): Promise<string> {
    const result = await run(process.execPath, [enbdCli, ...args, '--control', control], { timeoutMs: 60_000 });
    assert.equal(result.status, 0, `enbd ${args.join(' ')}: ${result.stdout}${result.stderr}`);
    return result.stdout;
  }

  function checkScreen(lines: string[], width: number, pane: string): void {
    const screen = lines.join('\n');
    for (const line of lines) assert.ok(line.length <= width, `${pane}: a line of ${line.length} columns:\n${screen}`);
    const joined = lines.join(' ').replace(/\s+/g, ' ');
    for (const part of ['export "": 32.0 MiB (33554432 bytes)', 'ring', 'slots in use', 'resync:', 'floor 1.0 MiB/s', 'ceiling 4.0 MiB/s']) {
      assert.ok(joined.includes(part), `${pane}: the header has "${part}":\n${screen}`);
    }
    for (const name of ['a', 'b']) {
      const rows = lines.filter((line) => new RegExp(`^${name}\\s+(in-sync|resyncing|failed|probation|degraded|fencing|reconnecting)\\s`).test(line));
      assert.equal(rows.length, 1, `${pane}: leg ${name} once:\n${screen}`);
    }
  }

  test('resync under --watch: within the width, header whole, each leg once, bar whole', async () => {
    const sockets = [dir.path('leg0.sock'), dir.path('leg1.sock')];
    for (const socket of sockets) children.push(await startNbdkit(socket, ['memory', String(kLegBytes)]));
    const control = dir.path('m.ctl');
    const mirror = await startMirror({
      legs: sockets.map((socket) => unixUri(socket)),
      socketPath: dir.path('m.sock'),
      args: ['--control', control, '--reconnect-min', '50', '--reconnect-max', '200', '--resync-rate-min', '1M', '--resync-rate-max', '4M'],
    });
    const watch = `${process.execPath} ${enbdCli} status --watch --interval 200 --control ${control}`;
    await tmux(['new-session', '-d', '-s', 'w80', '-x', '80', '-y', '40', watch]);
    await tmux(['new-session', '-d', '-s', 'w120', '-x', '120', '-y', '40', watch]);
    const panes: Array<[string, number]> = [['w80', 80], ['w120', 120]];
    for (const [pane, width] of panes) {
      const lines = await waitScreen(pane, 'both legs in sync', (screen) => screen.filter((line) => /^[ab]\s+in-sync\s/.test(line)).length === 2);
      checkScreen(lines, width, pane);
    }

    await cli(control, ['leg', 'fail', 'b']);
    const client = await NbdClient.connect(mirror.uri);
    try {
      // 8 MiB written while b is out: at 4 MiB/s its resync is on screen for about 2 s at least
      for (let at = 0; at < 8; at += 1) await client.write(at * 1024 * 1024, randomBytes(1024 * 1024));
      await client.flush();
    } finally {
      await client.close();
    }
    await cli(control, ['leg', 'reconnect', 'b']);
    for (const [pane, width] of panes) {
      const lines = await waitScreen(pane, 'a resync bar', (screen) => screen.some((line) => /^\s+\[[#-]+\]\s+[\d.]+%/.test(line)));
      checkScreen(lines, width, pane);
      const bar = lines.find((line) => /^\s+\[[#-]+\]/.test(line)) ?? '';
      assert.match(bar, /^\s+\[[#-]{10,}\]\s+[\d.]+% [\d.]+ [KMG]?i?B\/s ETA /, `${pane}: the bar is whole, with percent, rate and ETA:\n${lines.join('\n')}`);
      assert.ok(lines.some((line) => /^\d\d:\d\d:\d\d leg b: failed/.test(line)), `${pane}: the event line is there, on its own line:\n${lines.join('\n')}`);
    }
    for (const [pane, width] of panes) {
      const lines = await waitScreen(pane, 'the resync to finish', (screen) =>
        screen.filter((line) => /^[ab]\s+in-sync\s/.test(line)).length === 2 && !screen.some((line) => /^\s+\[[#-]+\]/.test(line)));
      checkScreen(lines, width, pane);
      const firstEvent = lines.findIndex((line) => /^\d\d:\d\d:\d\d leg b:/.test(line));
      const header = lines.findIndex((line) => line.startsWith('export '));
      assert.ok(firstEvent >= 0 && header > firstEvent, `${pane}: event lines are above the table:\n${lines.join('\n')}`);
      assert.ok(!lines.slice(header).some((line) => /^\d\d:\d\d:\d\d /.test(line)), `${pane}: no event line inside the table:\n${lines.join('\n')}`);
    }
  });
});
