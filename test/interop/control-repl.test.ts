/**
 * `enbd repl` against a running `enbd mirror` (legs: nbdkit memory) while a client keeps
 * writing and reading through the export: expressions, `.legs`, `.slots`, `.bitmap`, an
 * expression that throws, a promise, an endless loop (interrupted by the daemon's bound), then
 * `.exit` and end of stdin. The daemon keeps serving throughout, and after.
 * Threads: test process main thread (the write loop runs here); daemon, nbdkit and the REPL
 * are child processes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { NbdClient } from '../../src/nbd/client/client.js';
import { scratch, startNbdkit, toolEnv, unixUri, type Child, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { enbdCli, readNbd, startMirror, stopAllMirrors } from '../helpers/mirror.js';

const kMiB = 1024 * 1024;
const kPrompt = 'enbd> ';
const kMorePrompt = '... ';
const kAnswerTimeoutMs = 20_000;

/** A REPL child driven line by line: `ask` writes a line and returns what came before the next prompt. */
class ReplSession {
  private output = '';
  private answeredAt = 0;
  private readonly exited: Promise<number | null>;

  constructor(readonly child: ChildProcessWithoutNullStreams) {
    child.stdout.on('data', (chunk: Buffer) => (this.output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (this.output += chunk.toString()));
    child.stdin.on('error', () => undefined);
    this.exited = new Promise((resolve) => child.once('exit', (code) => resolve(code)));
  }

  static start(control: string): ReplSession {
    return new ReplSession(spawn(process.execPath, [enbdCli, 'repl', '--control', control], { env: toolEnv, stdio: ['pipe', 'pipe', 'pipe'] }));
  }

  /** Waits until the output (past `from`) ends with a prompt: 'enbd> ', or '... ' for more input. */
  private async waitForPrompt(from: number): Promise<string> {
    const deadline = Date.now() + kAnswerTimeoutMs;
    for (;;) {
      const prompt = [kPrompt, kMorePrompt].find((candidate) => this.output.length >= from + candidate.length && this.output.endsWith(candidate));
      if (prompt !== undefined) {
        this.answeredAt = this.output.length;
        return this.output.slice(from, this.output.length - prompt.length);
      }
      if (this.child.exitCode !== null) assert.fail(`repl exited ${this.child.exitCode}:\n${this.output}`);
      if (Date.now() > deadline) assert.fail(`no prompt after ${kAnswerTimeoutMs} ms:\n${this.output}`);
      await sleep(20);
    }
  }

  async ready(): Promise<string> {
    return await this.waitForPrompt(0);
  }

  async ask(line: string): Promise<string> {
    const from = this.answeredAt;
    this.child.stdin.write(line + '\n');
    return (await this.waitForPrompt(from)).trim();
  }

  async exit(how: 'command' | 'eof'): Promise<number | null> {
    if (how === 'command') this.child.stdin.write('.exit\n');
    else this.child.stdin.end();
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 10_000);
    const code = await this.exited;
    clearTimeout(timer);
    return code;
  }

  get text(): string {
    return this.output;
  }
}

describe('enbd repl: inspecting a live daemon while it serves I/O', { skip: skipUnlessTools('nbdkit') }, () => {
  let dir: Scratch;
  const children: Child[] = [];

  before(() => {
    dir = scratch('enbd-ctl-repl-');
  });

  after(async () => {
    await stopAllMirrors();
    await Promise.all(children.map(async (child) => await child.stop('SIGKILL')));
    dir?.cleanup();
  });

  test('expressions, .legs, .slots, .bitmap, errors and .exit, with writes running', async () => {
    const legs: string[] = [];
    for (const name of ['a', 'b']) {
      const socket = dir.path(`${name}.sock`);
      children.push(await startNbdkit(socket, ['memory', '64M']));
      legs.push(unixUri(socket));
    }
    const control = dir.path('m.ctl');
    const mirror = await startMirror({ legs, socketPath: dir.path('m.sock'), args: ['--control', control] });

    // A write loop through the export for the whole session: it must never fail or stall.
    const writer = await NbdClient.connect(mirror.uri);
    let writes = 0;
    let writing = true;
    const block = randomBytes(64 * 1024);
    const loop = (async () => {
      while (writing) {
        await writer.write((writes % 512) * block.length, block);
        writes += 1;
      }
    })();

    const repl = ReplSession.start(control);
    try {
      assert.match(await repl.ready(), /enbd repl attached to .*m\.ctl/);
      assert.equal(await repl.ask('legs.length'), '2');
      assert.equal(await repl.ask('legs.map((leg) => leg.state).join()'), "'in-sync,in-sync'");
      assert.equal(await repl.ask('mirror.sizeBytes'), String(64 * kMiB));
      assert.match(await repl.ask('stats().writeRequests > 0'), /^true$/);

      const table = await repl.ask('.legs');
      assert.match(table, /^LEG\s+STATE\s+IN-FLIGHT\s+LATENCY\s+DIRTY\s+URI$/m);
      assert.match(table, /^a\s+in-sync\s/m, 'leg 0 is listed by its automatic name');
      assert.match(table, /^b\s+in-sync\s/m);

      assert.match(await repl.ask('.slots'), /^ring: 256 slots of 256\.0 KiB, \d+ free, \d+ requests in use/);
      assert.match(await repl.ask('.bitmap 1'), /^leg 1 dirty map: 0 B dirty \(0 chunks of 4\.0 KiB\) of 64\.0 MiB\npages: /);
      assert.match(await repl.ask('.bitmap 7'), /^enbd: error: no leg 7/);

      assert.match(await repl.ask("throw new Error('boom')"), /^Uncaught Error: boom/);
      assert.match(await repl.ask('legs[5].state'), /^Uncaught TypeError: Cannot read properties of undefined/);
      assert.match(await repl.ask('mirror.legStats()'), /latencySumMs: [\d.]+/, 'a promise is awaited');
      assert.equal(await repl.ask('let seen = legs.length'), 'undefined');
      assert.equal(await repl.ask('seen + 1'), '3', 'declarations persist in a session');
      assert.equal(await repl.ask('function twice(x) {'), '', 'an incomplete line asks for more');
      assert.equal(await repl.ask('return 2 * x }'), 'undefined');
      assert.equal(await repl.ask('twice(21)'), '42');
      const before = writes;
      assert.match(await repl.ask('while (true) {}'), /^Uncaught Error: Script execution timed out after \d+ms/);
      await sleep(200);
      assert.ok(writes > before, 'writes go on after the interrupted loop');

      assert.equal(await repl.exit('command'), 0, `repl exits 0 on .exit:\n${repl.text}`);
    } finally {
      if (repl.child.exitCode === null) repl.child.kill('SIGKILL');
    }

    // Detaching left the daemon untouched: it serves, and a new session works (end of stdin).
    assert.ok(mirror.alive(), 'daemon still running');
    const writesAfterExit = writes;
    await sleep(300);
    assert.ok(writes > writesAfterExit, 'the write loop still makes progress');
    const read = await readNbd(mirror.uri, 0, block.length);
    assert.ok(read.equals(block), 'a read through the export returns what was written');
    const second = ReplSession.start(control);
    await second.ready();
    assert.equal(await second.ask('legs.length'), '2');
    assert.equal(await second.exit('eof'), 0, 'end of stdin leaves the REPL with 0');

    writing = false;
    await loop;
    await writer.close();
    assert.ok(writes > 0);
    assert.equal(await mirror.stop(), 0, `mirror exits 0:\n${mirror.stderr()}`);
  });
});
