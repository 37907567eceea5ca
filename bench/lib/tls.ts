/**
 * What TLS costs (issue 13: "Performance"), measured side by side in one run: a 2-leg
 * `enbd mirror` over TLS legs against nbdkit's nbd plugin (the C pass-through) over a TLS leg,
 * and the mirror's TLS export against `nbdkit --tls=require memory`, on 4 KiB random writes
 * QD32 and 1 MiB sequential writes QD8, with the CPU seconds per GiB of the front servers and
 * of the legs (TLS legs decrypt every write too).
 * Threads: harness main thread. Servers are child processes started through the CaseContext
 * (lib/case.ts), like every case's; fio runs through lib/measure.ts.
 *
 * Setup:
 *   PKI       a fresh CA and a server certificate (P-256, CN and SAN localhost, as libnbd checks
 *             for Unix sockets) in `<runDir>/pki` (nbdkit's and enbd's file names); the CA also
 *             in `<runDir>/fio-home/.pki/libnbd/ca-cert.pem`.
 *   TLS legs  `nbdkit -f --unix S --tls=require --tls-certificates=PKI memory SIZE`; the
 *             mirror reaches them as `nbds+unix:///?socket=S&tls-certificates=PKI`, the
 *             pass-through as `nbd socket=S tls=require tls-certificates=PKI`.
 *   TLS export `enbd mirror --tls require --tls-certificates PKI`, `nbdkit --tls=require ...`.
 *   fio       fio's nbd engine hands its `--uri` to libnbd's nbd_connect_uri without
 *             nbd_set_uri_allow_local_file, so a URI with `tls-certificates=DIR` is refused
 *             ("local file access (tls-certificates) is not allowed"). A plain `nbds+unix://`
 *             URI works when fio's HOME holds `.pki/libnbd/ca-cert.pem` (libnbd's default
 *             certificate directory): fio itself speaks TLS to the TLS exports, no proxy.
 * Servers (each started once, all at the start of the phase; order = run order):
 *   see kTlsServers. The quick subset is the two pairs the issue names; the full run adds both
 *   sides over TLS (export and legs) and the plain mirror for TLS / plain ratios.
 * Every row pairs round r of both sides (run back to back; round order alternates), like the
 * case rows (lib/report.ts).
 *
 * Invariants:
 * - A server that cannot start, or dies, becomes rows with an error; the phase never throws.
 * - Legs run no faster or slower per side: every leg is `nbdkit memory` of the export size, TLS
 *   or plain the same for both sides of a pair.
 * - The caller stops every process this phase started (they are in its CaseContext).
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { assert } from '../../src/core/assert.js';
import { unixUri, type CaseContext } from './case.js';
import { readControlCounters } from './counters.js';
import { enbdArgs } from './enbd.js';
import { runFio, type FioOptions } from './fio.js';
import { measure, type Measurement } from './measure.js';
import type { ManagedProcess } from './proc.js';
import { pairedRatio } from './report.js';
import type { RatioResult, RowResult } from './results.js';
import { kWorkloads, type Workload } from './workloads.js';
import { describeError } from './numbers.js';

const kSource = 'issue 13: TLS (Performance)';
const kDeathNoticeMs = 200;

/** Which side of the server a hop runs TLS on. */
export interface TlsServer {
  name: string;
  description: string;
  kind: 'enbd-mirror' | 'nbdkit-nbd' | 'nbdkit-memory';
  /** TLS (require) on the export fio connects to. */
  tlsExport: boolean;
  /** TLS (require) on the legs behind it (not for nbdkit-memory, which has none). */
  tlsLegs: boolean;
  /** Part of `--quick`. */
  quick: boolean;
}

export interface TlsPair {
  caseName: string;
  versus: string;
  /** Shown above the pair's table. */
  title: string;
  quick: boolean;
}

export const kTlsServers: readonly TlsServer[] = [
  {
    name: 'enbd-mirror2-tls-legs', kind: 'enbd-mirror', tlsExport: false, tlsLegs: true, quick: true,
    description: 'enbd mirror, 2 TLS nbdkit memory legs (nbds+unix), plain export',
  },
  {
    name: 'nbdkit-nbd-tls-legs', kind: 'nbdkit-nbd', tlsExport: false, tlsLegs: true, quick: true,
    description: "nbdkit's nbd plugin (tls=require) in front of 1 TLS nbdkit memory leg, plain export",
  },
  {
    name: 'enbd-mirror2-tls-export', kind: 'enbd-mirror', tlsExport: true, tlsLegs: false, quick: true,
    description: 'enbd mirror --tls require, 2 plain nbdkit memory legs',
  },
  {
    name: 'nbdkit-memory-tls', kind: 'nbdkit-memory', tlsExport: true, tlsLegs: false, quick: true,
    description: 'nbdkit --tls=require memory (fio straight to one leg over TLS)',
  },
  {
    name: 'enbd-mirror2-tls-both', kind: 'enbd-mirror', tlsExport: true, tlsLegs: true, quick: false,
    description: 'enbd mirror --tls require, 2 TLS nbdkit memory legs',
  },
  {
    name: 'nbdkit-nbd-tls-both', kind: 'nbdkit-nbd', tlsExport: true, tlsLegs: true, quick: false,
    description: "nbdkit --tls=require nbd plugin (tls=require) in front of 1 TLS nbdkit memory leg",
  },
  {
    name: 'enbd-mirror2-plain', kind: 'enbd-mirror', tlsExport: false, tlsLegs: false, quick: false,
    description: 'enbd mirror, 2 plain nbdkit memory legs (the TLS cost reference)',
  },
];

export const kTlsPairs: readonly TlsPair[] = [
  { caseName: 'enbd-mirror2-tls-legs', versus: 'nbdkit-nbd-tls-legs', quick: true, title: 'TLS legs: 2-leg mirror / C pass-through to 1 leg' },
  { caseName: 'enbd-mirror2-tls-export', versus: 'nbdkit-memory-tls', quick: true, title: 'TLS export: mirror (2 plain legs) / nbdkit --tls=require memory' },
  { caseName: 'enbd-mirror2-tls-both', versus: 'nbdkit-nbd-tls-both', quick: false, title: 'TLS export and legs: mirror / C pass-through' },
  { caseName: 'enbd-mirror2-tls-legs', versus: 'enbd-mirror2-plain', quick: false, title: 'what TLS legs cost the mirror (TLS / plain)' },
  { caseName: 'enbd-mirror2-tls-export', versus: 'enbd-mirror2-plain', quick: false, title: 'what the TLS export costs the mirror (TLS / plain)' },
];

/** The two workloads, from the harness's list so the fio jobs are the same. */
export const kTlsWorkloadNames: readonly string[] = ['randwrite-4k-qd32', 'seqwrite-1m-qd8'];

/** The servers and pairs a run measures: the quick subset, or all. */
export function selectTls(quick: boolean): { servers: TlsServer[]; pairs: TlsPair[] } {
  const pairs = kTlsPairs.filter((pair) => !quick || pair.quick);
  const names = new Set(pairs.flatMap((pair) => [pair.caseName, pair.versus]));
  return { servers: kTlsServers.filter((server) => names.has(server.name)), pairs };
}

/** The URI of a Unix-socket NBD server over TLS; certDir adds libnbd's tls-certificates. */
export function tlsUnixUri(socketPath: string, certDir?: string): string {
  const plain = unixUri(socketPath);
  assert(plain.startsWith('nbd+unix:'));
  const uri = `nbds+unix:${plain.slice('nbd+unix:'.length)}`;
  return certDir === undefined ? uri : `${uri}&tls-certificates=${certDir}`;
}

/** nbdkit's arguments for a server that requires TLS on its own export. */
export function nbdkitTlsArgs(certDir: string): string[] {
  return ['--tls=require', `--tls-certificates=${certDir}`];
}

export interface TlsBenchOptions {
  /** Spawns through the harness; sizeBytes = the export size. */
  context: CaseContext;
  quick: boolean;
  rounds: number;
  runtimeSec: number;
  rampSec: number;
  warmupSec: number;
  log(message: string): void;
}

export interface TlsResults {
  sizeBytes: number;
  /** How fio reached the TLS exports (its nbd engine with HOME=...; see the header). */
  client: string;
  servers: Array<{ name: string; description: string; status: string }>;
  pairs: Array<{ caseName: string; versus: string; title: string }>;
  /** One row per server and workload; measurement.legCpuSecPerGiB = its legs' CPU. */
  rows: RowResult[];
  /** caseName / versus per pair and workload, no targets (minRatio null). */
  ratios: RatioResult[];
  source: string;
  error: string | null;
}


function openssl(args: string[], cwd: string): void {
  const run = spawnSync('openssl', args, { cwd, encoding: 'utf8' });
  if (run.status !== 0) throw new Error(`openssl ${args[0] ?? ''} failed: ${run.stderr || String(run.error)}`);
}

/** A CA and a localhost server certificate in dir (nbdkit's names); returns dir. */
export function makeBenchPki(dir: string): string {
  mkdirSync(dir, { recursive: true });
  const ecKey = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  openssl(['req', '-x509', ...ecKey, '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=enbd bench CA'], dir);
  writeFileSync(join(dir, 'server.ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  openssl(['req', ...ecKey, '-keyout', 'server-key.pem', '-out', 'server.csr', '-subj', '/CN=localhost'], dir);
  openssl(['x509', '-req', '-in', 'server.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial',
    '-out', 'server-cert.pem', '-days', '2', '-extfile', 'server.ext'], dir);
  chmodSync(join(dir, 'ca-key.pem'), 0o600);
  chmodSync(join(dir, 'server-key.pem'), 0o600);
  return dir;
}

interface Started {
  server: TlsServer;
  /** null: not started; status says why. */
  uri: string | null;
  front: ManagedProcess | null;
  legs: ManagedProcess[];
  counters?: () => ReturnType<typeof readControlCounters>;
  status: string;
}

class TlsScenario {
  private readonly context: CaseContext;
  private pki = '';
  private fioEnv: NodeJS.ProcessEnv = process.env;

  constructor(private readonly options: TlsBenchOptions) {
    this.context = options.context;
  }

  preparePki(): void {
    this.pki = makeBenchPki(join(this.context.runDir, 'pki'));
    const libnbdDir = join(this.context.runDir, 'fio-home', '.pki', 'libnbd');
    mkdirSync(libnbdDir, { recursive: true });
    copyFileSync(join(this.pki, 'ca-cert.pem'), join(libnbdDir, 'ca-cert.pem'));
    this.fioEnv = { ...process.env, HOME: join(this.context.runDir, 'fio-home') };
  }

  private async startLegs(server: TlsServer, count: number): Promise<{ processes: ManagedProcess[]; uris: string[]; sockets: string[] }> {
    const legs = { processes: [] as ManagedProcess[], uris: [] as string[], sockets: [] as string[] };
    for (let index = 0; index < count; index += 1) {
      const socketPath = join(this.context.runDir, `${server.name}-leg${index}.sock`);
      legs.processes.push(await this.context.spawn({
        label: `${server.name}-leg${index}`,
        command: 'nbdkit',
        args: ['-f', '--unix', socketPath, ...(server.tlsLegs ? nbdkitTlsArgs(this.pki) : []), 'memory', String(this.context.sizeBytes)],
        socketPath,
        role: 'leg',
      }));
      legs.sockets.push(socketPath);
      legs.uris.push(server.tlsLegs ? tlsUnixUri(socketPath, this.pki) : unixUri(socketPath));
    }
    return legs;
  }

  async start(server: TlsServer): Promise<Started> {
    const started: Started = { server, uri: null, front: null, legs: [], status: 'not started' };
    const socketPath = join(this.context.runDir, `${server.name}.sock`);
    const exportUri = server.tlsExport ? tlsUnixUri(socketPath) : unixUri(socketPath);
    try {
      if (server.kind === 'nbdkit-memory') {
        started.front = await this.context.spawn({
          label: server.name, command: 'nbdkit', role: 'server', socketPath,
          args: ['-f', '--unix', socketPath, ...nbdkitTlsArgs(this.pki), 'memory', String(this.context.sizeBytes)],
        });
      } else if (server.kind === 'nbdkit-nbd') {
        const legs = await this.startLegs(server, 1);
        started.legs = legs.processes;
        const legTls = server.tlsLegs ? ['tls=require', `tls-certificates=${this.pki}`] : [];
        started.front = await this.context.spawn({
          label: server.name, command: 'nbdkit', role: 'server', socketPath,
          args: ['-f', '--unix', socketPath, ...(server.tlsExport ? nbdkitTlsArgs(this.pki) : []),
            'nbd', `socket=${legs.sockets[0] ?? ''}`, ...legTls],
        });
      } else {
        const legs = await this.startLegs(server, 2);
        started.legs = legs.processes;
        started.front = await this.context.spawn({
          label: server.name, command: process.execPath, role: 'server', socketPath,
          args: enbdArgs(this.context, [
            'mirror', ...legs.uris.flatMap((uri) => ['--leg', uri]), '--socket', socketPath,
            '--metadata', 'none', '--log-level', 'warn',
            ...(server.tlsExport ? ['--tls', 'require', '--tls-certificates', this.pki] : []),
          ]),
          env: { ...process.env, ENBD_LOG_JSON: '1' },
        });
        const controlPath = `${socketPath}.ctl`;
        started.counters = () => readControlCounters(controlPath);
      }
      started.uri = exportUri;
      started.status = 'ok';
      this.options.log(`tls: ${server.name}: started (${exportUri})`);
    } catch (error) {
      started.status = `failed to start: ${describeError(error)}`;
      this.options.log(`tls: ${server.name}: ${started.status}`);
      for (const managed of [started.front, ...started.legs]) await managed?.stop();
    }
    return started;
  }

  fioOptions(label: string, uri: string, overrides: Partial<FioOptions> = {}): FioOptions {
    return {
      uri, runtimeSec: this.options.runtimeSec, rampSec: this.options.rampSec, sizeBytes: this.context.sizeBytes,
      outputPath: join(this.context.runDir, `${label}.fio.json`), env: this.fioEnv, ...overrides,
    };
  }

  async warmUp(started: Started, workloads: readonly Workload[]): Promise<void> {
    if (this.options.warmupSec <= 0 || started.uri === null) return;
    for (const workload of workloads) {
      try {
        await runFio(workload, this.fioOptions(`${started.server.name}-warmup-${workload.name}`, started.uri,
          { runtimeSec: this.options.warmupSec, rampSec: 0 }));
      } catch (error) {
        this.options.log(`tls: ${started.server.name}: warm-up ${workload.name} failed: ${describeError(error)}`);
      }
    }
  }

  /** One measured run, or why it failed (a dead server ends that server's rows). */
  async measureOne(started: Started, workload: Workload, round: number): Promise<Measurement | string> {
    if (started.status !== 'ok' || started.uri === null || started.front === null) return started.status;
    this.options.log(`tls: ${workload.name} on ${started.server.name} (round ${round + 1}) ...`);
    let outcome: Measurement | string;
    try {
      outcome = await measure(workload, this.fioOptions(`${started.server.name}-${workload.name}-${round}`, started.uri),
        [started.front.pid], started.counters, started.legs.map((leg) => leg.pid));
    } catch (error) {
      outcome = describeError(error);
      await sleep(kDeathNoticeMs);
    }
    const dead = [started.front, ...started.legs].find((managed) => managed !== null && !managed.running);
    if (dead !== undefined && dead !== null) {
      started.status = `server died: ${dead.spec.label} ${dead.exitDescription()}\n${dead.logTail()}`;
      return typeof outcome === 'string' ? `${started.status}\n${outcome}` : started.status;
    }
    return outcome;
  }
}

/** Folds one server's rounds of one workload into a row (median-IOPS round, spread). */
function toRow(caseName: string, workload: string, rounds: readonly Measurement[], error: string | null): RowResult {
  const sorted = [...rounds].sort((left, right) => left.iops - right.iops);
  const middle = sorted[Math.floor((sorted.length - 1) / 2)] ?? null;
  const highest = sorted[sorted.length - 1]?.iops ?? 0;
  const lowest = sorted[0]?.iops ?? 0;
  return {
    caseName, workload, error,
    measurement: error === null ? middle : null,
    rounds: [...rounds],
    spreadPercent: middle !== null && sorted.length > 1 ? ((highest - lowest) / middle.iops) * 100 : Number.NaN,
  };
}

/** Server CPU plus leg CPU per GiB (NaN when either is missing). */
export function totalCpuSecPerGiB(measurement: Measurement): number {
  return measurement.serverCpuSecPerGiB + (measurement.legCpuSecPerGiB ?? 0);
}

/** caseName / versus for every pair and workload whose rows exist. */
export function tlsRatios(pairs: readonly TlsPair[], workloads: readonly string[], rows: readonly RowResult[]): RatioResult[] {
  const find = (caseName: string, workload: string): RowResult | undefined =>
    rows.find((row) => row.caseName === caseName && row.workload === workload);
  const ratios: RatioResult[] = [];
  for (const pair of pairs) {
    for (const workload of workloads) {
      const mine = find(pair.caseName, workload);
      const theirs = find(pair.versus, workload);
      if (mine === undefined || theirs === undefined) continue;
      ratios.push({
        caseName: pair.caseName, versus: pair.versus, workload,
        throughputRatio: pairedRatio(mine, theirs, (measurement) => measurement.iops),
        cpuPerGiBRatio: pairedRatio(mine, theirs, (measurement) => measurement.serverCpuSecPerGiB),
        minRatio: null, met: null,
      });
    }
  }
  return ratios;
}

function emptyResults(sizeBytes: number, quick: boolean, error: string | null): TlsResults {
  const { servers, pairs } = selectTls(quick);
  return {
    sizeBytes,
    client: 'fio --ioengine=nbd --uri=nbds+unix:///?socket=S with HOME=DIR holding .pki/libnbd/ca-cert.pem ' +
      '(fio cannot pass tls-certificates=DIR: libnbd refuses that local-file URI parameter for it)',
    servers: servers.map((server) => ({ name: server.name, description: server.description, status: 'not started' })),
    pairs: pairs.map((pair) => ({ caseName: pair.caseName, versus: pair.versus, title: pair.title })),
    rows: [], ratios: [], source: kSource, error,
  };
}

export async function runTlsBench(options: TlsBenchOptions): Promise<TlsResults> {
  assert(Number.isInteger(options.rounds) && options.rounds >= 1);
  const results = emptyResults(options.context.sizeBytes, options.quick, null);
  const { servers, pairs } = selectTls(options.quick);
  const workloads = kTlsWorkloadNames.map((name) => {
    const found = kWorkloads.find((entry) => entry.name === name);
    assert(found !== undefined, `workload ${name}`);
    return found;
  });
  const scenario = new TlsScenario(options);
  try {
    scenario.preparePki();
  } catch (error) {
    results.error = describeError(error);
    options.log(`tls: ${results.error}`);
    return results;
  }
  const started: Started[] = [];
  for (const server of servers) started.push(await scenario.start(server));
  for (const entry of started) await scenario.warmUp(entry, workloads);
  for (const workload of workloads) {
    const measured = new Map<Started, Measurement[]>(started.map((entry) => [entry, []]));
    const errors = new Map<Started, string>();
    for (let round = 0; round < options.rounds; round += 1) {
      // Alternate the order so no server always runs first; pair members stay adjacent.
      const order = round % 2 === 0 ? started : [...started].reverse();
      for (const entry of order) {
        if (errors.has(entry)) continue;
        const outcome = await scenario.measureOne(entry, workload, round);
        if (typeof outcome === 'string') errors.set(entry, outcome);
        else measured.get(entry)?.push(outcome);
      }
    }
    for (const entry of started) {
      results.rows.push(toRow(entry.server.name, workload.name, measured.get(entry) ?? [], errors.get(entry) ?? null));
    }
  }
  results.servers = started.map((entry) => ({
    name: entry.server.name, description: entry.server.description, status: entry.status,
  }));
  results.ratios = tlsRatios(pairs, kTlsWorkloadNames, results.rows);
  return results;
}

/** The results of a phase that could not run at all (a tool or the build missing). */
export function unavailableTls(sizeBytes: number, quick: boolean, reason: string): TlsResults {
  return emptyResults(sizeBytes, quick, reason);
}
