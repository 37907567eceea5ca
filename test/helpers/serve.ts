/**
 * Server-under-test factory for the real-peer suites: starts `enbd serve FILE` as a child
 * process (default), or nbdkit configured to behave the same way when the environment has
 * ENBD_TEST_REFERENCE=nbdkit (useful to prove a test is right before blaming enbd).
 *
 * The nbdkit stand-in: `nbdkit file FILE` with filters so that it matches the enbd contract:
 *   exportname (strict list: "" and NAME; description), blocksize-policy (1 / 4096 / max,
 *   oversize requests answered with an error), nozero (advertise FAST_ZERO like enbd).
 * nbdkit cannot listen on a Unix socket and TCP at once, so with `tcp` a second nbdkit on
 * the same file serves TCP.
 *
 * Threads: test process main thread.
 * Invariants: `start` resolves only once every requested endpoint accepts connections;
 * `stop` always reaps every child it started (SIGTERM, then SIGKILL after 10 s).
 */
import { rmSync, statSync } from 'node:fs';
import { connect } from 'node:net';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { freePort, runOk, startChild, unixUri, waitForUnixListener, type Child } from './tools.js';

/** The one run/runOk/skipUnlessTools lives in tools.ts; suites that import them from here keep working. */
export { run, runOk, skipUnlessTools, type RunResult } from './tools.js';

export type ServerKind = 'enbd' | 'nbdkit';

export const referenceKind: ServerKind = process.env['ENBD_TEST_REFERENCE'] === 'nbdkit' ? 'nbdkit' : 'enbd';

/** Compiled CLI beside this compiled helper (dist-X/test/helpers -> dist-X/src/cli/main.js). */
export const enbdCli: string =
  process.env['ENBD_MAIN'] ?? fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));

export const kDefaultMaxPayloadBytes = 32 * 1024 * 1024;

export interface ServeOptions {
  /** Backing file; must exist (its size is the export size). */
  file: string;
  /** Unix socket path (required: every suite uses a Unix socket). */
  socketPath: string;
  readOnly?: boolean;
  /** Extra export name besides the default "". */
  name?: string;
  description?: string;
  /** Also listen on 127.0.0.1 on a free TCP port. */
  tcp?: boolean;
  maxPayloadBytes?: number;
  /** Force a kind regardless of ENBD_TEST_REFERENCE. */
  kind?: ServerKind;
  /** Further `enbd serve` flags (enbd only; e.g. `--max-connections 8`). */
  args?: string[];
}

export interface ServerUnderTest {
  kind: ServerKind;
  file: string;
  sizeBytes: number;
  socketPath: string;
  /** nbd+unix URI of the default export (or of `exportName`). */
  uri(exportName?: string): string;
  /** TCP port, or 0 when not listening on TCP. */
  port: number;
  tcpUri(exportName?: string): string;
  /** Every child process still running. */
  alive(): boolean;
  output(): string;
  /** Sends a signal to every child without waiting (SIGSTOP / SIGCONT in fault tests). */
  signal(signal: NodeJS.Signals): void;
  stop(signal?: NodeJS.Signals): Promise<Array<number | null>>;
}

export async function waitForTcp(port: number, isDead: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolveTry) => {
      const socket = connect(port, '127.0.0.1');
      socket.once('connect', () => {
        socket.destroy();
        resolveTry(true);
      });
      socket.once('error', () => resolveTry(false));
    });
    if (ok) return;
    if (isDead()) throw new Error(`server died before listening on TCP ${port}`);
    if (Date.now() > deadline) throw new Error(`timed out waiting for TCP port ${port}`);
    await sleep(25);
  }
}

function enbdArgs(options: ServeOptions, port: number): string[] {
  const args = [enbdCli, 'serve', options.file, '--socket', options.socketPath, '--log-level', 'warn'];
  if (port !== 0) args.push('--listen', `127.0.0.1:${port}`);
  if (options.name !== undefined) args.push('--name', options.name);
  if (options.description !== undefined) args.push('--description', options.description);
  if (options.readOnly === true) args.push('--read-only');
  if (options.maxPayloadBytes !== undefined) args.push('--max-payload', String(options.maxPayloadBytes));
  args.push(...(options.args ?? []));
  return args;
}

function nbdkitArgs(options: ServeOptions, endpoint: string[]): string[] {
  const maxPayloadBytes = options.maxPayloadBytes ?? kDefaultMaxPayloadBytes;
  const args = ['-f', ...endpoint];
  if (options.readOnly === true) args.push('-r');
  args.push('--filter=exportname', '--filter=blocksize-policy', '--filter=nozero', 'file', options.file);
  args.push('zeromode=plugin', 'fastzeromode=ignore');
  args.push('blocksize-minimum=1', 'blocksize-preferred=4096', `blocksize-maximum=${maxPayloadBytes}`);
  args.push('blocksize-error-policy=error');
  args.push('exportname-strict=true', 'exportname-list=explicit', 'exportname=');
  if (options.name !== undefined) args.push(`exportname=${options.name}`);
  if (options.description !== undefined) args.push(`exportdesc=fixed:${options.description}`);
  return args;
}

async function waitForSocket(socketPath: string, child: Child): Promise<void> {
  await waitForUnixListener('server', socketPath, child);
}

export async function startServerUnderTest(options: ServeOptions): Promise<ServerUnderTest> {
  const kind = options.kind ?? referenceKind;
  const sizeBytes = statSync(options.file).size;
  rmSync(options.socketPath, { force: true });
  const port = options.tcp === true ? await freePort() : 0;
  const children: Child[] = [];
  try {
    if (kind === 'enbd') {
      const child = startChild(process.execPath, enbdArgs(options, port));
      children.push(child);
      await waitForSocket(options.socketPath, child);
    } else {
      const child = startChild('nbdkit', nbdkitArgs(options, ['--unix', options.socketPath]));
      children.push(child);
      await waitForSocket(options.socketPath, child);
      if (port !== 0) {
        children.push(startChild('nbdkit', nbdkitArgs(options, ['-i', '127.0.0.1', '-p', String(port)])));
      }
    }
    if (port !== 0) await waitForTcp(port, () => children.some((c) => c.process.exitCode !== null));
  } catch (error) {
    await Promise.all(children.map(async (child) => await child.stop('SIGKILL')));
    throw error;
  }
  return {
    kind,
    file: options.file,
    sizeBytes,
    socketPath: options.socketPath,
    uri: (exportName = '') => unixUri(options.socketPath, exportName),
    port,
    tcpUri: (exportName = '') => `nbd://127.0.0.1:${port}/${exportName}`,
    alive: () => children.every((child) => child.process.exitCode === null && child.process.signalCode === null),
    output: () => children.map((child) => child.output()).join('\n'),
    signal: (signal: NodeJS.Signals) => {
      for (const child of children) child.process.kill(signal);
    },
    stop: async (signal: NodeJS.Signals = 'SIGTERM') => {
      const codes = await Promise.all(children.map(async (child) => await child.stop(signal)));
      rmSync(options.socketPath, { force: true });
      return codes;
    },
  };
}

/**
 * Throws unless the server process is alive and a fresh client gets the export size
 * (nbdinfo --size), i.e. it survived whatever the test just did to it.
 */
export async function assertServing(server: ServerUnderTest): Promise<void> {
  if (!server.alive()) throw new Error(`server process died:\n${server.output()}`);
  const result = await runOk('nbdinfo', ['--size', server.uri()], { timeoutMs: 30_000 });
  const size = Number(result.stdout.trim());
  if (size !== server.sizeBytes) throw new Error(`nbdinfo --size said ${result.stdout.trim()}, expected ${server.sizeBytes}`);
}
