/**
 * Client commands for a running daemon, over its control socket (src/control):
 *   enbd status [--json] [--watch], enbd leg fail|reconnect|remove <index>, enbd leg add <uri>,
 *   enbd resync pause|resume, enbd resync rate [--min B/s] [--max B/s], enbd log-level <level>,
 *   enbd repl.
 *   enbd wait [--timeout S].
 * Every command takes --control PATH; without it: $ENBD_CONTROL, else ./enbd-data/enbd.ctl or
 * ./enbd.ctl (whichever exists, in that order).
 * Errors (no socket, permission denied, an engine refusal) reach main.ts's handler, which prints
 * `enbd: error: MESSAGE` and exits 1; except for `status` and `wait`, which exit with the
 * health codes of src/control/health.ts (0 in sync, 1 degraded, 2 no in-sync leg, 4 the daemon
 * cannot be reached), like `mdadm --detail --test`.
 * Thread: main thread. Output goes to stdout (this is the client, not the daemon).
 */
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import cliProgress from 'cli-progress';
import { Argument, type Command } from 'commander';
import { ControlClient, ControlError } from '../control/client.js';
import { describeLagging, healthCode, kExitDegraded, kExitInSync, kExitUnreachable, parseSeconds } from '../control/health.js';
import { formatBytes, formatCeiling, formatDuration, formatExportLine, formatLatency, formatRate, formatStatus, resyncFraction } from '../control/format.js';
import type { ControlEvent, LegView, StatusResult } from '../control/protocol.js';
import { runRepl } from '../control/repl-client.js';
import { EnbdError } from '../core/errors.js';
import { parseBytes, parseInteger } from './parse.js';

const kLogLevels = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];
const kControlCandidates = ['enbd-data/enbd.ctl', 'enbd.ctl'];
const kMaxLegIndex = 30;

export interface ControlOption {
  control?: string;
}

/** The control socket to use: --control, $ENBD_CONTROL, or the first default that exists. */
export function resolveControlPath(given: string | undefined): string {
  if (given !== undefined && given !== '') return resolve(given);
  const fromEnvironment = process.env['ENBD_CONTROL'];
  if (fromEnvironment !== undefined && fromEnvironment !== '') return resolve(fromEnvironment);
  for (const candidate of kControlCandidates) if (existsSync(candidate)) return resolve(candidate);
  throw new ControlError('connect', `no control socket found (tried ./${kControlCandidates.join(' and ./')}); pass --control PATH or set ENBD_CONTROL (the daemon's default is <socket>.ctl)`);
}

export async function withClient<T>(options: ControlOption, run: (client: ControlClient) => Promise<T>): Promise<T> {
  const client = await ControlClient.connect(resolveControlPath(options.control));
  try {
    return await run(client);
  } finally {
    client.close();
  }
}

export function say(line: string): void {
  process.stdout.write(line + '\n');
}

function legIndex(text: string): number {
  return parseInteger('leg index', text, 0, kMaxLegIndex);
}

export function addControlOption(command: Command): Command {
  return command.option('--control <path>', 'the daemon\'s control socket (default: $ENBD_CONTROL, ./enbd-data/enbd.ctl or ./enbd.ctl)');
}

// ---- status --watch ---------------------------------------------------------------------------

interface BarPayload {
  text: string;
  resync: boolean;
}

const kBarWidth = 30;

function renderBarLine(_options: cliProgress.Options, params: cliProgress.Params, payload: BarPayload): string {
  if (!payload.resync) return payload.text;
  const filled = Math.round(Math.min(1, Math.max(0, params.progress)) * kBarWidth);
  return `${payload.text} [${'#'.repeat(filled)}${'-'.repeat(kBarWidth - filled)}]`;
}

function legBarText(leg: LegView): string {
  const head = `leg ${leg.index} ${leg.state.padEnd(12)} in-flight ${String(leg.inFlight).padEnd(4)} latency ${formatLatency(leg.latencyMeanMs).padEnd(9)} dirty ${formatBytes(leg.dirtyBytes).padEnd(10)}`;
  if (leg.resync === null) return `${head} ${leg.uri}`;
  const percent = (resyncFraction(leg.resync) * 100).toFixed(1).padStart(5);
  const paused = leg.resync.paused ? ' paused' : '';
  return `${head} ${percent}% ${formatRate(leg.resync.bytesPerSecond)} ETA ${formatDuration(leg.resync.etaSeconds)}${paused}`;
}

/** Live view on a terminal: one cli-progress line per leg (a bar for a resyncing leg). */
class TerminalStatusView {
  private readonly bars: cliProgress.MultiBar;
  private readonly header: cliProgress.SingleBar;
  private readonly legBars = new Map<number, cliProgress.SingleBar>();

  constructor() {
    this.bars = new cliProgress.MultiBar({ stream: process.stdout, format: renderBarLine, hideCursor: true, fps: 5, clearOnComplete: false, stopOnComplete: false, emptyOnZero: true });
    this.header = this.bars.create(1, 0, { text: 'connecting...', resync: false });
  }

  render(status: StatusResult): void {
    const resync = status.resync;
    const text = `${formatExportLine(status)}; resync ${resync.paused ? 'paused' : 'running'} (floor ${formatRate(resync.minBytesPerSecond)}, ceiling ${formatCeiling(resync.maxBytesPerSecond)})`;
    this.header.update(0, { text, resync: false });
    const seen = new Set<number>();
    for (const leg of status.legs) {
      seen.add(leg.index);
      const total = leg.resync === null ? 1 : Math.max(1, leg.resync.bytesTotal);
      const done = leg.resync === null ? 0 : total - leg.resync.bytesLeft;
      const payload: BarPayload = { text: legBarText(leg), resync: leg.resync !== null };
      let bar = this.legBars.get(leg.index);
      if (bar === undefined) {
        bar = this.bars.create(total, done, payload);
        this.legBars.set(leg.index, bar);
      }
      bar.setTotal(total);
      bar.update(done, payload);
    }
    for (const [index, bar] of this.legBars) {
      if (seen.has(index)) continue;
      this.bars.remove(bar);
      this.legBars.delete(index);
    }
  }

  log(line: string): void {
    this.bars.log(line + '\n');
  }

  stop(): void {
    this.bars.stop();
  }
}

function describeEvent(event: ControlEvent): string | null {
  const data = (event.data ?? {}) as Record<string, unknown>;
  const time = new Date().toISOString().slice(11, 19);
  switch (event.event) {
    case 'leg-state': {
      const reason = typeof data['reason'] === 'string' ? ` (${data['reason']})` : '';
      return `${time} leg ${String(data['leg'])}: ${String(data['state'])}${reason}`;
    }
    case 'leg-added':
      return `${time} leg ${String(data['leg'])} added: ${String(data['uri'])}`;
    case 'leg-removed':
      return `${time} leg ${String(data['leg'])} removed`;
    case 'log-level':
      return `${time} log level: ${String(data['level'])}`;
    default:
      return null;
  }
}

interface StatusOptions extends ControlOption {
  json?: boolean;
  watch?: boolean;
  interval: string;
  count?: string;
}

/** Refreshes until Ctrl-C or --count; returns the health code of the last status shown. */
async function watchStatus(client: ControlClient, options: StatusOptions): Promise<number> {
  const intervalMs = parseInteger('--interval', options.interval, 100, 3_600_000);
  const count = options.count === undefined ? Infinity : parseInteger('--count', options.count, 1, 1_000_000_000);
  const view = options.json !== true && process.stdout.isTTY === true ? new TerminalStatusView() : null;
  let wake: (() => void) | null = null;
  let stopped = false;
  const stop = (): void => {
    stopped = true;
    wake?.();
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  client.onClose(() => wake?.());
  let code: number = kExitUnreachable;
  try {
    await client.subscribe((event) => {
      const line = options.json === true ? null : describeEvent(event);
      if (line !== null) {
        if (view !== null) view.log(line);
        else say(line);
      }
      if (event.event !== 'resync-progress') wake?.();
    });
    for (let refresh = 0; refresh < count && !stopped; refresh += 1) {
      const status = await client.call('status');
      code = healthCode(status.legs);
      if (options.json === true) say(JSON.stringify(status));
      else if (view !== null) view.render(status);
      else say(formatStatus(status).join('\n') + '\n');
      if (refresh + 1 >= count) break;
      await new Promise<void>((resolveWait) => {
        const timer = setTimeout(resolveWait, intervalMs);
        wake = () => {
          clearTimeout(timer);
          resolveWait();
        };
      });
      wake = null;
    }
  } finally {
    view?.stop();
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
  }
  return code;
}

/**
 * Reports a failure to ask the daemon (exit 4): `enbd: error: ...` on stderr and, with --json,
 * `{ "error": { reason, code, message } }` on stdout so a script parsing stdout sees it too.
 */
function reportUnreachable(error: unknown, json: boolean): void {
  const message = error instanceof Error ? error.message : String(error);
  if (json) {
    const reason = error instanceof ControlError ? error.reason : 'connect';
    const code = error instanceof ControlError ? error.remoteCode : null;
    say(JSON.stringify({ error: { reason, code, message } }));
  }
  process.stderr.write(`enbd: error: ${message}\n`);
  process.exitCode = kExitUnreachable;
}

async function runStatus(options: StatusOptions): Promise<void> {
  // flag errors are usage errors (main.ts), not "cannot reach the daemon"
  if (options.watch === true) parseInteger('--interval', options.interval, 100, 3_600_000);
  let code: number;
  try {
    code = await withClient(options, async (client) => {
      if (options.watch === true) return await watchStatus(client, options);
      const status = await client.call('status');
      say(options.json === true ? JSON.stringify(status, null, 2) : formatStatus(status).join('\n'));
      return healthCode(status.legs);
    });
  } catch (error) {
    if (!(error instanceof ControlError)) throw error;
    reportUnreachable(error, options.json === true);
    return;
  }
  process.exitCode = code;
}

// ---- wait -------------------------------------------------------------------------------------

interface WaitOptions extends ControlOption {
  timeout?: string;
  json?: boolean;
}

const kWaitPollMs = 1000;
const kWaitTimeoutSecondsMax = 366 * 24 * 3600;

/**
 * Blocks until every leg is in sync (exit 0). Re-reads the status on every pushed event and
 * at least once a second. --timeout passes first: exit 1; the daemon cannot be reached or goes
 * away: exit 4. Prints one line at the end (the status object with --json).
 */
async function runWait(options: WaitOptions): Promise<void> {
  let timeoutSeconds = Infinity;
  if (options.timeout !== undefined) {
    const seconds = parseSeconds(options.timeout);
    if (seconds === null || seconds > kWaitTimeoutSecondsMax) {
      throw new EnbdError('ENBD_ERR_CONFIG', `--timeout must be a duration (30, 1.5, 500ms, 2s, 1m, 1h) up to a year, got "${options.timeout}"`);
    }
    timeoutSeconds = seconds;
  }
  const deadlineMs = Date.now() + timeoutSeconds * 1000;
  let client: ControlClient;
  try {
    client = await ControlClient.connect(resolveControlPath(options.control));
  } catch (error) {
    if (!(error instanceof ControlError)) throw error;
    reportUnreachable(error, options.json === true);
    return;
  }
  let wake: (() => void) | null = null;
  client.onClose(() => wake?.());
  try {
    await client.subscribe((event) => {
      if (event.event !== 'resync-progress') wake?.();
    });
    for (;;) {
      const status = await client.call('status');
      const code = healthCode(status.legs);
      const live = status.legs.filter((leg) => leg.state !== 'removed').length;
      if (code === kExitInSync) {
        say(options.json === true ? JSON.stringify(status) : `every leg in sync (${live} leg${live === 1 ? '' : 's'})`);
        process.exitCode = kExitInSync;
        return;
      }
      const leftMs = deadlineMs - Date.now();
      if (leftMs <= 0) {
        if (options.json === true) say(JSON.stringify(status));
        process.stderr.write(`enbd: wait timed out after ${options.timeout ?? ''}: ${describeLagging(status.legs)}\n`);
        process.exitCode = kExitDegraded;
        return;
      }
      await new Promise<void>((resolveWait) => {
        const timer = setTimeout(resolveWait, Math.min(kWaitPollMs, leftMs));
        wake = () => {
          clearTimeout(timer);
          resolveWait();
        };
      });
      wake = null;
    }
  } catch (error) {
    if (!(error instanceof ControlError)) throw error;
    reportUnreachable(error, options.json === true);
  } finally {
    client.close();
  }
}

// ---- registration -----------------------------------------------------------------------------

function registerLegCommands(program: Command): void {
  const leg = program.command('leg').description('take legs out, bring them back, add or remove them (running daemon)');
  const simple: Array<[string, string, (client: ControlClient, index: number) => Promise<string>]> = [
    ['fail', 'take a leg out by hand (it stays out until `leg reconnect`; refused for the last in-sync leg or a leg that alone holds some data)', async (client, index) => {
      const result = await client.call('leg.fail', { leg: index });
      return `leg ${result.leg}: ${result.state}`;
    }],
    ['reconnect', 'bring a failed, faulty, degraded or fencing leg back now: fence its old connection, reconnect, probation, then resync', async (client, index) => {
      const result = await client.call('leg.reconnect', { leg: index });
      return `leg ${result.leg}: ${result.state}`;
    }],
    ['remove', 'remove a leg for good (refused for the last in-sync leg or a leg that alone holds some data)', async (client, index) => {
      const result = await client.call('leg.remove', { leg: index });
      return `leg ${result.leg} removed`;
    }],
  ];
  for (const [name, description, run] of simple) {
    addControlOption(leg.command(name).description(description).argument('<index>', 'leg index (see enbd status)'))
      .action(async (index: string, options: ControlOption) => {
        const number = legIndex(index);
        say(await withClient(options, async (client) => await run(client, number)));
      });
  }
  addControlOption(leg.command('add').description('add a leg (same size or larger); it gets a full resync').argument('<uri>', 'nbd://..., nbd+unix:///...?socket=..., file:///path or a path'))
    .action(async (uri: string, options: ControlOption) => {
      const result = await withClient(options, async (client) => await client.call('leg.add', { uri }));
      say(`leg ${result.leg} added: ${result.state} (full resync from an in-sync leg)`);
    });
}

function registerResyncCommands(program: Command): void {
  const resync = program.command('resync').description('pause, resume or rate-limit resyncs (running daemon)');
  for (const [name, paused] of [['pause', true], ['resume', false]] as const) {
    addControlOption(resync.command(name).description(paused ? 'pause every resync (copies in flight finish)' : 'resume resyncs'))
      .action(async (options: ControlOption) => {
        await withClient(options, async (client) => await client.call(paused ? 'resync.pause' : 'resync.resume'));
        say(paused ? 'resync paused' : 'resync resumed');
      });
  }
  addControlOption(resync.command('rate').description('show or set the resync floor (--min, kept while clients are busy) and ceiling (--max, 0 = unlimited)'))
    .option('--min <bytes/s>', 'floor in bytes/s (64M = 64 MiB/s)')
    .option('--max <bytes/s>', 'ceiling in bytes/s while clients are idle (0 = unlimited)')
    .action(async (options: ControlOption & { min?: string; max?: string }) => {
      const params: Record<string, number> = {};
      if (options.min !== undefined) params['min'] = parseBytes('--min', options.min);
      if (options.max !== undefined) params['max'] = parseBytes('--max', options.max);
      const rates = await withClient(options, async (client) => await client.call('resync.rate', params));
      say(`resync rate: floor ${formatRate(rates.minBytesPerSecond)}, ceiling ${formatCeiling(rates.maxBytesPerSecond)}`);
    });
}

/** Adds status, leg, resync, log-level and repl to the program. */
export function registerControlCommands(program: Command): void {
  addControlOption(program.command('status').description('state of a running daemon: export, legs, resync progress, latency; exits 0 every leg in sync, 1 degraded or resyncing, 2 no in-sync leg, 4 cannot reach the daemon'))
    .option('--json', 'print the status object as JSON (with --watch: one object per line)', false)
    .option('--watch', 'refresh until Ctrl-C (live progress bars on a terminal)', false)
    .option('--interval <ms>', 'refresh period for --watch', '1000')
    .option('--count <n>', 'with --watch: stop after N refreshes')
    .action(async (options: StatusOptions) => {
      await runStatus(options);
    });
  addControlOption(program.command('wait').description('block until every leg is in sync; exits 0 then, 1 when --timeout passes first, 4 when the daemon cannot be reached'))
    .option('--timeout <duration>', 'give up after this long (seconds, or 500ms, 2s, 1m, 1h); default: wait forever')
    .option('--json', 'print the final status object as JSON', false)
    .action(async (options: WaitOptions) => {
      await runWait(options);
    });
  registerLegCommands(program);
  registerResyncCommands(program);
  addControlOption(program.command('log-level').description('change the daemon\'s log level without a restart').addArgument(new Argument('<level>', 'new level').choices(kLogLevels)))
    .action(async (level: string, options: ControlOption) => {
      const result = await withClient(options, async (client) => await client.call('log.level', { level }));
      say(`log level: ${result.level} (was ${result.previous})`);
    });
  addControlOption(program.command('repl').description('attach a JavaScript REPL to the running daemon (mirror, legs, ring, server, stats(), dirtyMap(i))'))
    .action(async (options: ControlOption) => {
      const client = await ControlClient.connect(resolveControlPath(options.control));
      const terminal = process.stdin.isTTY === true && process.stdout.isTTY === true;
      await runRepl({ client, input: process.stdin, output: process.stdout, terminal });
    });
}
