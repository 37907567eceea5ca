/**
 * Fault-injecting legs and control-socket helpers for the suites that run a real `enbd mirror`
 * process against real nbdkit legs:
 * - `FaultLegs`: nbdkit legs on Unix sockets in one scratch dir, every child reaped by `stopAll`:
 *   `fileLeg` (nbdkit file, optionally behind filters: error with a trigger file, delay, ...),
 *   `memoryLeg`, and `lateWriteLeg` (an nbdkit sh plugin over a file whose pwrite sleeps while
 *   a one-shot flag file exists, then still lands: a "zombie" write);
 * - `MirrorControl`: status polling through the daemon's control socket (ControlClient), leg
 *   state waits, pushed leg-state events, and the real CLI for operator commands;
 * - `logLinesAboutLeg`: counts the daemon's pino JSON lines that name one leg.
 *
 * Threads: test process main thread; nbdkit, the daemon and the CLI are child processes.
 * Invariants: every nbdkit started here is in `children` until `stopAll` (SIGKILL, then also
 * SIGCONT for one that a test stopped); waits are bounded by generous deadlines and never
 * asserted as durations.
 */
import { chmodSync, truncateSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import assert from 'node:assert/strict';
import { ControlClient } from '../../src/control/client.js';
import type { ControlEvent, LegView, StatusResult } from '../../src/control/protocol.js';
import { enbdCli, run } from './serve.js';
import { startNbdkit, unixUri, type Child, type Scratch } from './tools.js';

export interface FaultLeg {
  /** Backing file (null for a memory leg). */
  file: string | null;
  socket: string;
  uri: string;
  child: Child;
}

export interface LateWriteLeg extends FaultLeg {
  file: string;
  /** While this file exists the next pwrite takes it (one shot), sleeps, then writes. */
  flag: string;
  /** Created by that slept pwrite once its bytes are in the file. */
  landed: string;
}

export class FaultLegs {
  private readonly children: Child[] = [];
  private seq = 0;

  constructor(private readonly dir: Scratch) {}

  /** A sparse file of `sizeBytes`. */
  image(name: string, sizeBytes: number): string {
    const path = this.dir.path(name);
    writeFileSync(path, '');
    truncateSync(path, sizeBytes);
    return path;
  }

  private nextSocket(): string {
    this.seq += 1;
    return this.dir.path(`leg${this.seq}.sock`);
  }

  private async start(socket: string, pluginArgs: string[], filters: string[]): Promise<Child> {
    const child = await startNbdkit(socket, pluginArgs, filters.map((filter) => `--filter=${filter}`));
    this.children.push(child);
    return child;
  }

  /** `nbdkit [--filter=F ...] file FILE [params]`. */
  async fileLeg(file: string, filters: string[] = [], params: string[] = []): Promise<FaultLeg> {
    const socket = this.nextSocket();
    const child = await this.start(socket, ['file', file, ...params], filters);
    return { file, socket, uri: unixUri(socket), child };
  }

  /** `nbdkit memory SIZE`. */
  async memoryLeg(sizeBytes: number): Promise<FaultLeg> {
    const socket = this.nextSocket();
    const child = await this.start(socket, ['memory', String(sizeBytes)], []);
    return { file: null, socket, uri: unixUri(socket), child };
  }

  /**
   * nbdkit sh plugin over `file`: reads and writes go to the file with dd (thread model
   * parallel, so a sleeping pwrite holds up nothing else). A pwrite that finds `flag` removes
   * it, sleeps `sleepSeconds`, writes its bytes anyway and then creates `landed`.
   */
  async lateWriteLeg(file: string, sizeBytes: number, sleepSeconds: number): Promise<LateWriteLeg> {
    const socket = this.nextSocket();
    const flag = `${socket}.slow`;
    const landed = `${socket}.landed`;
    const script = `${socket}.sh`;
    writeFileSync(script, [
      '#!/bin/sh',
      '# nbdkit sh plugin written by test/helpers/fault-legs.ts (late "zombie" writes)',
      'case "$1" in',
      `  get_size) echo ${sizeBytes} ;;`,
      '  thread_model) echo parallel ;;',
      '  can_write|can_flush) exit 0 ;;',
      `  pread) exec dd if='${file}' skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;`,
      '  pwrite)',
      `    slept=0; if rm '${flag}' 2>/dev/null; then slept=1; sleep ${sleepSeconds}; fi`,
      `    dd of='${file}' seek="$4" count="$3" oflag=seek_bytes iflag=count_bytes,fullblock conv=notrunc status=none || exit 1`,
      `    if [ "$slept" = 1 ]; then touch '${landed}'; fi ;;`,
      '  flush) exit 0 ;;',
      '  *) exit 2 ;;',
      'esac',
      '',
    ].join('\n'));
    chmodSync(script, 0o755);
    const child = await this.start(socket, ['sh', script], []);
    return { file, socket, uri: unixUri(socket), child, flag, landed };
  }

  /** Kills every leg (a stopped one is continued so it can die) and waits for the exits. */
  async stopAll(): Promise<void> {
    await Promise.all(this.children.map(async (child) => {
      child.process.kill('SIGCONT');
      await child.stop('SIGKILL');
    }));
  }
}

export interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** The daemon's control socket: status polling, waits on leg states, pushed events, the CLI. */
export class MirrorControl {
  readonly events: ControlEvent[] = [];

  private constructor(readonly path: string, private readonly client: ControlClient) {}

  static async connect(path: string, subscribe = false): Promise<MirrorControl> {
    const client = await ControlClient.connect(path);
    const control = new MirrorControl(path, client);
    if (subscribe) await client.subscribe((event) => control.events.push(event));
    return control;
  }

  close(): void {
    this.client.close();
  }

  async status(): Promise<StatusResult> {
    return await this.client.call('status', {}, 10_000);
  }

  async legs(): Promise<LegView[]> {
    return (await this.status()).legs;
  }

  async states(): Promise<string[]> {
    return (await this.legs()).map((leg) => leg.state);
  }

  /** Polls status until `predicate` holds for leg `index`; fails with the last view. */
  async waitLeg(index: number, what: string, predicate: (leg: LegView) => boolean, timeoutMs = 20_000): Promise<LegView> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const legs = await this.legs();
      const leg = legs[index];
      if (leg !== undefined && predicate(leg)) return leg;
      if (Date.now() > deadline) {
        assert.fail(`leg ${index} never became ${what} within ${timeoutMs} ms: ${JSON.stringify(legs.map((view) => [view.state, view.failureReason]))}`);
      }
      await sleep(50);
    }
  }

  async waitStates(wanted: string[], timeoutMs = 20_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const states = await this.states();
      if (states.join() === wanted.join()) return;
      if (Date.now() > deadline) assert.fail(`leg states never became ${wanted.join(',')} within ${timeoutMs} ms (now ${states.join(',')})`);
      await sleep(50);
    }
  }

  /** Runs `enbd ARGS --control PATH` with the real CLI. */
  async cli(args: string[]): Promise<CliResult> {
    return await run(process.execPath, [enbdCli, ...args, '--control', this.path], { timeoutMs: 30_000 });
  }

  async cliOk(args: string[]): Promise<string> {
    const result = await this.cli(args);
    assert.equal(result.status, 0, `enbd ${args.join(' ')} exits 0:\n${result.stdout}\n${result.stderr}`);
    return result.stdout;
  }

  /** Leg-state events pushed since subscribing (subscribe = true), for leg `index`. */
  legStateEvents(index: number): Array<{ state: string; reason: string | null }> {
    const out: Array<{ state: string; reason: string | null }> = [];
    for (const event of this.events) {
      const data = event.data as { leg?: unknown; state?: unknown; reason?: unknown } | null;
      if (event.event !== 'leg-state' || data === null || data.leg !== index) continue;
      out.push({ state: String(data.state), reason: typeof data.reason === 'string' ? data.reason : null });
    }
    return out;
  }
}

/** The daemon's pino JSON log lines (stderr) that carry `"leg": index`. */
export function logLinesAboutLeg(stderr: string, index: number): string[] {
  const lines: string[] = [];
  for (const line of stderr.split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      const record = JSON.parse(line) as { leg?: unknown };
      if (record.leg === index) lines.push(line);
    } catch {
      // a partial last line: not counted
    }
  }
  return lines;
}
