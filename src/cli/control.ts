/**
 * Client commands for a running daemon, over its control socket (src/control):
 *   enbd status [--json] [--watch], enbd leg fail|reconnect|remove <index>, enbd leg add <uri>,
 *   enbd resync pause|resume, enbd resync rate [--min B/s] [--max B/s], enbd log-level <level>,
 *   enbd verify start [--range OFF:LEN] [--rate B/s] [--repair], enbd verify stop, enbd repl.
 *   enbd wait [--timeout S].
 * Every command takes --control PATH; without it: $ENBD_CONTROL, else ./enbd-data/enbd.ctl or
 * ./enbd.ctl (whichever exists, in that order).
 * Errors (no socket, permission denied, an engine refusal) reach main.ts's handler, which prints
 * `enbd: error: MESSAGE` and exits 1; except for `status` and `wait`, which exit with the
 * health codes of src/control/health.ts (0 in sync, 1 degraded, 2 no in-sync leg, 4 the daemon
 * cannot be reached), like `mdadm --detail --test`.
 * Thread: main thread. Output goes to stdout (this is the client, not the daemon).
 */
import { Argument, type Command } from 'commander';
import { ControlClient, ControlError } from '../control/client.js';
import { describeLagging, healthCode, kExitDegraded, kExitInSync, kExitUnreachable, parseSeconds } from '../control/health.js';
import { formatBytes, formatCeiling, formatRate, formatStatus } from '../control/format.js';
import { TerminalStatusView } from '../control/watch-view.js';
import type { ControlEvent } from '../control/protocol.js';
import { runRepl } from '../control/repl-client.js';
import { parseBytes, parseInteger, usageError } from './parse.js';
import { splitLegSpec } from '../engine/leg-names.js';
import { addControlOption, resolveControlPath, say, withClient, type ControlOption } from './control-option.js';

// The --control option and the client helpers live in control-option.ts (light: the lean
// `enbd backup` entry uses them without this file's commands); re-exported for the others.
export { addControlOption, resolveControlPath, say, withClient, type ControlOption };

const kLogLevels = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];
const kMaxLegIndex = 30;

/** A leg reference as given: a name, an index or a URI (the daemon resolves it). */
function legRef(text: string): string | number {
  return /^\d+$/.test(text) ? parseInteger('<leg>', text, 0, kMaxLegIndex) : text;
}


// ---- status --watch ---------------------------------------------------------------------------

function describeEvent(event: ControlEvent): string | null {
  const data = (event.data ?? {}) as Record<string, unknown>;
  const time = new Date().toISOString().slice(11, 19);
  switch (event.event) {
    case 'leg-state': {
      const reason = typeof data['reason'] === 'string' ? ` (${data['reason']})` : '';
      return `${time} leg ${String(data['name'] ?? data['leg'])}: ${String(data['state'])}${reason}`;
    }
    case 'leg-added':
      return `${time} leg ${String(data['name'] ?? data['leg'])} added: ${String(data['uri'])}`;
    case 'leg-removed':
      return `${time} leg ${String(data['name'] ?? data['leg'])} removed`;
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
  const view = options.json !== true && process.stdout.isTTY === true ? new TerminalStatusView(process.stdout) : null;
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
  if (options.count !== undefined) parseInteger('--count', options.count, 1, 1_000_000_000);
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
      throw usageError('--timeout', 'a duration (30, 1.5, 500ms, 2s, 1m, 1h) up to a year', options.timeout);
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
  const simple: Array<[string, string, (client: ControlClient, ref: string | number) => Promise<string>]> = [
    ['fail', 'take a leg out by hand (it stays out until `leg reconnect`; refused for the last in-sync leg or a leg that alone holds some data)', async (client, ref) => {
      const result = await client.call('leg.fail', { leg: ref });
      return `leg ${result.name}: ${result.state}`;
    }],
    ['reconnect', 'bring a failed, faulty, degraded or fencing leg back now: fence its old connection, reconnect, probation, then resync', async (client, ref) => {
      const result = await client.call('leg.reconnect', { leg: ref });
      return `leg ${result.name}: ${result.state}`;
    }],
    ['remove', 'remove a leg for good (refused for the last in-sync leg or a leg that alone holds some data)', async (client, ref) => {
      const result = await client.call('leg.remove', { leg: ref });
      return `leg ${result.name} removed`;
    }],
  ];
  for (const [name, description, run] of simple) {
    addControlOption(leg.command(name).description(description).argument('<leg>', 'the leg\'s name, index or URI (see enbd status)'))
      .action(async (text: string, options: ControlOption) => {
        const ref = legRef(text);
        say(await withClient(options, async (client) => await run(client, ref)));
      });
  }
  addControlOption(leg.command('add').description('add a leg (same size or larger); it gets a full resync and the given name, else the next free automatic one').argument('<[name=]uri>', 'NAME=URI or URI: nbd://..., nbd+unix:///...?socket=..., file:///path or a path'))
    .action(async (text: string, options: ControlOption) => {
      const spec = splitLegSpec(text, '<[name=]uri>');
      const params = spec.name === null ? { uri: spec.uri } : { uri: spec.uri, name: spec.name };
      const result = await withClient(options, async (client) => await client.call('leg.add', params));
      say(`leg ${result.name} added: ${result.state} (full resync from an in-sync leg)`);
    });
}

function registerVerifyCommands(program: Command): void {
  const verify = program.command('verify').description('check that the legs hold the same bytes, and repair them (running daemon)');
  addControlOption(verify.command('start').description('start a verify of the whole device or a range; progress in enbd status'))
    .option('--range <offset:length>', 'only this range (bytes, e.g. 0:1G or 64M:16M)')
    .option('--rate <bytes/s>', 'at most this fast (e.g. 100M; default unlimited)')
    .option('--repair', 'rewrite legs that differ from the reference (majority, else freshest, else leg 0)', false)
    .action(async (options: ControlOption & { range?: string; rate?: string; repair: boolean }) => {
      const params: Record<string, number | boolean> = { repair: options.repair };
      if (options.range !== undefined) {
        const [offset, length, extra] = options.range.split(':');
        if (offset === undefined || length === undefined || extra !== undefined) throw usageError('--range', 'OFFSET:LENGTH (bytes, e.g. 64M:16M)', options.range);
        params['offset'] = parseBytes('--range', offset);
        params['length'] = parseBytes('--range', length);
      }
      if (options.rate !== undefined) params['rate'] = parseBytes('--rate', options.rate);
      const started = await withClient(options, async (client) => await client.call('verify.start', params));
      say(`verify ${started.repair ? '(repair) ' : ''}started: ${formatBytes(started.lengthBytes)} at ${started.offsetBytes}`);
    });
  addControlOption(verify.command('stop').description('stop the running verify (units in flight finish)'))
    .action(async (options: ControlOption) => {
      const result = await withClient(options, async (client) => await client.call('verify.stop'));
      const verify = result.verify;
      say(!result.stopped || verify === null ? 'no verify was running' : `verify stopped: ${formatBytes(verify.bytesDone)} of ${formatBytes(verify.lengthBytes)} done, ${verify.mismatchChunks} mismatched chunks`);
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
  registerVerifyCommands(program);
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
