#!/usr/bin/env node
/**
 * `enbd` command line: parses arguments with commander and dispatches to the subcommands.
 * Usage errors exit 2, runtime errors exit 1, a clean shutdown exits 0.
 * Thread: main thread. User-facing output goes to stdout; logs (pino) go to stderr.
 * Loading: only what every command needs is imported statically; a command's modules are
 * imported when it runs (serve and mirror: the engine, pino) or when the tree is built (the
 * client commands), and `backup`/`backup-apply` get a lean tree of their own
 * (src/cli/backup-command.ts), so a short command does not pay for the daemon's modules.
 */
import { kVersion } from '../core/version.js';
import { Command, CommanderError, Option } from 'commander';
import { EnbdError, describeError } from '../core/errors.js';
import { kBackupCommands, registerBackupCommands } from './backup-command.js';
import { shownValue } from './parse.js';

const kUsageExit = 2;

/**
 * Commander's usage errors in enbd's one form: `enbd: error: --log-level must be fatal, ... or
 * silent, got loud` for a bad choice, else commander's text with the `enbd: ` prefix.
 */
export function commanderMessage(text: string): string {
  const choice = /^error: (?:option|argument) '([^' ]+)(?: [^']*)?' argument '([^']*)' is invalid\. Allowed choices are (.*)\.\n?$/s.exec(text);
  if (choice !== null) {
    const choices = (choice[3] ?? '').split(', ');
    const list = choices.length > 1 ? `${choices.slice(0, -1).join(', ')} or ${choices.at(-1) ?? ''}` : choices.join('');
    return `enbd: error: ${choice[1] ?? ''} must be ${list}, got ${shownValue(choice[2] ?? '')}\n`;
  }
  const argumentChoice = /^error: command-argument value '([^']*)' is invalid for argument '([^']*)'\. Allowed choices are (.*)\.\n?$/s.exec(text);
  if (argumentChoice !== null) {
    const choices = (argumentChoice[3] ?? '').split(', ');
    return `enbd: error: <${argumentChoice[2] ?? ''}> must be ${choices.slice(0, -1).join(', ')} or ${choices.at(-1) ?? ''}, got ${shownValue(argumentChoice[1] ?? '')}\n`;
  }
  return text.startsWith('error: ') ? `enbd: ${text}` : text;
}

/** nbdkit's habits, shared by serve and mirror (src/cli/host.ts). */
function addHostOptions(command: Command): Command {
  return command
    .option('-f, --foreground', 'accepted for nbdkit compatibility (enbd always stays in the foreground)')
    .option('-P, --pidfile <file>', 'write the pid to FILE once every listener accepts (removed at a clean stop)')
    .option('--run <command>', 'once ready, run COMMAND with /bin/sh ($uri, $nbd, $unixsocket, $socket, $port, $exportname set); stop when it exits and exit with its status')
    .option('--exit-with-parent', 'stop when the parent process exits (parent pid polled every 500 ms)')
    .option('-p, --port <port>', 'alias of --listen PORT (on 127.0.0.1)')
    .option('-e, --export-name <name>', 'alias of --name')
    .option('--unix <path>', 'alias of --socket');
}

/** The program's name, version and error output: the same for the full and the lean tree. */
function newProgram(): Command {
  return new Command()
    .name('enbd')
    .description('Mirroring network block device daemon: one NBD export mirrored across N legs (RAID1)')
    .version(kVersion)
    .exitOverride()
    .configureOutput({ outputError: (text, write) => write(commanderMessage(text)) })
    .showHelpAfterError('(run with --help for usage)');
}

/** `enbd backup` / `enbd backup-apply`: only those two commands (see backup-command.ts). */
function buildBackupProgram(): Command {
  const program = newProgram();
  registerBackupCommands(program);
  return program;
}

async function buildProgram(): Promise<Command> {
  const [{ registerControlCommands }, { registerCheckpointCommands }, { registerCreateCommand }, { registerExamineCommand }] = await Promise.all([
    import('./control.js'), import('./checkpoint.js'), import('./create.js'), import('./examine.js'),
  ]);
  const program = newProgram();

  const serve = program
    .command('serve')
    .description('serve one file over NBD (usable on its own and as a mirror leg)')
    .argument('<file>', 'file to export (its size is the export size)')
    .option('-U, --socket <path>', 'listen on this Unix socket ("-": a private socket in a new temp dir)')
    .option('--listen <[host:]port>', 'listen on TCP (default 127.0.0.1:10809 when no --socket is given)')
    .option('--name <name>', 'export name (the default export "" reaches it too)')
    .option('--description <text>', 'export description shown to clients')
    .option('-r, --read-only', 'refuse writes (EPERM)', false)
    .option('--max-payload <bytes>', 'largest READ/WRITE payload accepted (e.g. 32M)', '32M')
    .option('--max-connections <n>', 'most clients at once; more are closed at once', '128')
    .option('--handshake-timeout <ms>', 'close a client that has not finished option negotiation in time (0 = never)', '10000')
    .option('--payload-timeout <ms>', 'close a client that stops sending in the middle of a request (0 = never)', '30000')
    .addOption(new Option('--tls <mode>', 'TLS on the export: off, on (STARTTLS offered) or require (nothing but STARTTLS before TLS)').choices(['off', 'on', 'require']).default('off'))
    .option('--tls-certificates <dir>', 'directory with ca-cert.pem, server-cert.pem, server-key.pem (nbdkit names)')
    .option('--tls-verify-peer', 'require a client certificate signed by ca-cert.pem')
    .option('--tls-psk <file>', 'TLS with pre-shared keys instead of certificates: psktool file of username:hexkey lines')
    .addOption(new Option('--io <mode>', 'file I/O: async (libuv thread pool), sync (on the serving thread), or auto: sync on tmpfs/ramfs, async elsewhere').choices(['auto', 'async', 'sync']).default('auto'))
    .addOption(new Option('--receive <mode>', 'WRITE payloads: stream (copied from Node read chunks) or direct (large payloads read straight into the request buffer; default; not with TLS)').choices(['stream', 'direct']).default('direct'))
    .addOption(new Option('--log-level <level>', 'log level').choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'));
  addHostOptions(serve).action(async (file: string, options: Record<string, unknown>) => {
    const [{ applyAliases }, { runServe }] = await Promise.all([import('./host.js'), import('./serve.js')]);
    applyAliases(options);
    await runServe(file, options);
  });

  const mirror = program
    .command('mirror')
    .description('export one device mirrored across N legs (with no --leg: the embedded default, two file legs under ./enbd-data)')
    .option('--leg <[name=]uri>', 'a leg: nbd://host:port/export, nbd+unix:///export?socket=PATH, file:///path or a path, optionally NAME=URI (repeat; unnamed legs are a, b, c, ...)', (value: string, previous: string[]) => [...previous, value], [] as string[])
    .option('--config <file>', 'settings from a JSON or YAML file (flags win)')
    .option('-U, --socket <path>', 'listen on this Unix socket ("-": a private socket in a new temp dir)')
    .option('--listen <[host:]port>', 'listen on TCP (default 127.0.0.1:10809 when no --socket is given)')
    .option('--name <name>', 'export name (the default export "" reaches it too)')
    .option('-r, --read-only', 'export read-only: writes get EPERM (resyncs still write the legs)')
    .option('--size <bytes>', 'export size when legs differ (every leg must hold it; --metadata none only)')
    .option('--metadata <mode>', 'leg: assemble from the enbd metadata on every leg (enbd create), crash-safe (default); none: no metadata, unprotected against crashes, restarts while degraded and stale legs')
    .option('--checkpoint-granularity <bytes>', 'bytes per bit of every checkpoint (enbd checkpoint create; power of two, 4K..64M, default 64K)')
    .option('--force-source <leg>', 'split brain or no leg known up to date: trust this leg (its index in the --leg list) and resync the others from it')
    .option('--degraded', 'start even if a member of the array is not given (it needs a resync when it returns)')
    .option('--ring-slots <count>', 'request ring slots (power of two, default 256)')
    .option('--slot-bytes <bytes>', 'bytes per ring slot (multiple of 4K, default 256K)')
    .option('--copy-mode <mode>', 'shared (one copy in the ring) or per-leg (a copy per leg, for comparison)')
    .option('--placement <where>', 'workers (an actor thread per leg) or inline (actors on the main thread)')
    .option('--max-payload <bytes>', 'largest READ/WRITE payload accepted (default 32M)')
    .option('--max-connections <n>', 'most clients at once; more are closed at once (default 128)')
    .option('--handshake-timeout <ms>', 'close a client that has not finished option negotiation in time (default 10000; 0 = never)')
    .option('--payload-timeout <ms>', 'close a client that stops sending in the middle of a request, releasing its buffers (default 30000; 0 = never)')
    .addOption(new Option('--tls <mode>', 'TLS on the export: off (default), on (STARTTLS offered) or require (nothing but STARTTLS before TLS)').choices(['off', 'on', 'require']))
    .option('--tls-certificates <dir>', 'directory with ca-cert.pem, server-cert.pem, server-key.pem (nbdkit names)')
    .option('--tls-verify-peer', 'require a client certificate signed by ca-cert.pem')
    .option('--tls-psk <file>', 'TLS with pre-shared keys instead of certificates: psktool file of username:hexkey lines')
    .option('--leg-connections <n>', 'connections per NBD leg, used when its server advertises multi-conn (default 1; a leg URI\'s connections=N wins)')
    .option('--leg-timeout <ms>', 'degrade a leg whose request takes longer (default 5000; 0 = never)')
    .option('--idle-probe <ms>', 'probe a leg idle this long with a one-block READ (default 5000; 0 = never)')
    .option('--fence-timeout <ms>', 'wait this long for a failed leg\'s old connection to close before trying again (default 10000)')
    .option('--probe-timeout <ms>', 'a returning leg\'s probation probe (READ, WRITE back, FLUSH) must pass within this (default: --leg-timeout, or 5000 when 0)')
    .option('--leg-max-failures <n>', 'park a leg as faulty after this many failures within --leg-failure-window (default 20; 0 = never)')
    .option('--leg-failure-window <ms>', 'window for --leg-max-failures (default 3600000 = 1 h)')
    .option('--leg-stable <ms>', 'a leg\'s reconnect backoff starts over only after it stayed in sync this long (default 30000)')
    .option('--read-policy <policy>', 'which up-to-date leg serves a read: least-pending (default), round-robin, primary (first in-sync leg), latency (lowest recent read latency)')
    .option('--write-mostly <leg>', 'this leg (its index in the --leg list) serves reads only when no other leg can (repeat)', (value: string, previous: string[]) => [...previous, value], [] as string[])
    .option('--write-behind <MiB>', 'write-mostly legs may lag behind by up to this many MiB: a write is acknowledged once the other in-sync legs hold it (default 0 = off)')
    .option('--read-repair <on|off>', 'a leg\'s READ error rewrites the range on it from another leg, the leg staying in the mirror (default on); off: the leg fails')
    .option('--bitmap-chunk <bytes>', 'bytes per dirty-map bit (power of two, default 4K)')
    .option('--bitmap-pool <pages>', 'dirty-map pages per leg (4 KiB each, one per 128 MiB of device at 4K chunks; default 64)')
    .option('--reconnect-min <ms>', 'first reconnect delay of a degraded leg (default 250; doubles per attempt)')
    .option('--reconnect-max <ms>', 'longest reconnect delay (default 30000)')
    .option('--resync-rate-min <bytes/s>', 'resync floor kept while clients are busy (default 32M)')
    .option('--flush-tracking <on|off>', 'bench only: off skips recording writes since each leg\'s last flush (default on)')
    .option('--resync-rate-max <bytes/s>', 'resync ceiling while clients are idle (default 0 = unlimited)')
    .option('--resync-verify', 'checksum resync: compare each piece on source and target first and copy only what differs (saves the link, costs reads)')
    .option('--verify-threads <n>', 'threads of the verify hash pool (default min(2, cores))')
    .option('--verify-interval <duration>', 'start a verify (check, no repair) this often, e.g. 24h (default 0 = never)')
    .option('--receive <mode>', 'WRITE payloads: stream (copied from Node read chunks) or direct (large payloads straight into the ring slot; default; not with TLS)')
    .option('--metrics <[host:]port>', 'serve Prometheus metrics over HTTP at /metrics (host defaults to 127.0.0.1)')
    .option('--data-dir <dir>', 'where the embedded default keeps its legs and socket (default ./enbd-data)')
    .option('--control <path>', 'control socket, mode 0600 (default: <socket>.ctl, DATA_DIR/enbd.ctl for the embedded default, ./enbd.ctl for TCP only; "none" disables it)')
    .addOption(new Option('--log-level <level>', 'log level').choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']));
  addHostOptions(mirror).action(async (options: Record<string, unknown>) => {
      const [{ applyAliases }, { runMirror }] = await Promise.all([import('./host.js'), import('./mirror.js')]);
      applyAliases(options);
      const renamed: Record<string, unknown> = {
        ...options,
        legTimeoutMs: options['legTimeout'],
        reconnectMinMs: options['reconnectMin'],
        reconnectMaxMs: options['reconnectMax'],
        idleProbeMs: options['idleProbe'],
        fenceTimeoutMs: options['fenceTimeout'],
        probeTimeoutMs: options['probeTimeout'],
        legFailureWindowMs: options['legFailureWindow'],
        legStableMs: options['legStable'],
        handshakeTimeoutMs: options['handshakeTimeout'],
        payloadTimeoutMs: options['payloadTimeout'],
      };
      await runMirror(renamed);
    });

  registerCreateCommand(program);
  registerExamineCommand(program);
  registerControlCommands(program);
  registerCheckpointCommands(program);
  return program;
}

async function main(argv: string[]): Promise<void> {
  try {
    const program = kBackupCommands.includes(argv[2] ?? '') ? buildBackupProgram() : await buildProgram();
    await program.parseAsync(argv);
  } catch (error) {
    if (error instanceof CommanderError) {
      process.exitCode = error.exitCode === 0 ? 0 : kUsageExit;
      return;
    }
    // for people: the message only; our error codes stay in --json output and the logs
    process.stderr.write(`enbd: error: ${error instanceof EnbdError ? error.message : describeError(error)}\n`);
    // a bad flag or config value is a usage error, like commander's own
    process.exitCode = error instanceof EnbdError && error.code === 'ENBD_ERR_USAGE' ? kUsageExit : 1;
  }
}

await main(process.argv);
