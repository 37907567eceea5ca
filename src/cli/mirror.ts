/**
 * `enbd mirror`: exports one device over NBD, mirrored across the given legs. With no legs it
 * runs the embedded default: two sparse 1 GiB file legs under ./enbd-data, a Unix socket there
 * and TCP 127.0.0.1:10809. Settings come from flags and/or a JSON or YAML config file
 * (`--config`); flags win over the file.
 * SIGHUP re-reads the config file and applies the settings in kLiveSettings (`reloadMirror`);
 * the others are reported as needing a restart.
 * Thread: main thread.
 */
import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync, readFileSync, statSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { createLogger, isLogLevel, type Logger } from '../core/log.js';
import { assembleArray, type AssembledArray } from '../meta/assemble.js';
import { createArray } from '../meta/create-array.js';
import { LegMeta } from '../meta/leg-meta.js';
import { openLegDevices } from './create.js';
import { EnbdError, describeError } from '../core/errors.js';
import type { MirrorDevice } from '../engine/mirror.js';
import { kReadPolicies, type ReadPolicyName } from '../engine/read-policy.js';
import type { CopyMode, Placement } from '../engine/messages.js';
import type { NbdServer } from '../nbd/server/server.js';
import { openMirrorServer, type MirrorServer } from './mirror-server.js';
import { loadServerTls, parseTlsMode, type ServerTlsSettings } from '../nbd/server/server-tls.js';
import { kServerLimitDefaults, parseBytes, parseDurationMs, parseInteger, parseListen, parseServerLimits, usageError, type ListenAddress, type ServerLimits } from './parse.js';
import { installShutdown, type Shutdown } from './shutdown.js';
import { ServiceNotifier } from './notify.js';
import { takeListenFds } from './activation.js';
import { describeLagging } from '../control/health.js';
import { assignLegNames, legNameProblem, splitLegSpec, type LegSpec } from '../engine/leg-names.js';
import { installHangup } from './hangup.js';
import { bannerStream, hostCleanup, hostReady, kPrivateSocket, makePrivateSocket, parseHostHabits, type HostHabits } from './host.js';
import { controlPathFor, startControlPlane, type ControlPlane } from '../control/plane.js';
import { legUriWriteMostly, parseConnectionCount } from '../stubs/open-leg.js';
import { kMaxLegConnections } from '../stubs/leg-connections.js';
import { checkTcpFree, checkUnixFree } from '../core/listen.js';
import { checkGranularity } from '../engine/checkpoints.js';
import { mirrorStatusContexts } from '../engine/status-contexts.js';
import { startMetricsServer, type MetricsServer } from '../metrics/metrics.js';
import { defaultHashThreads, kHashThreadsMax } from '../engine/hash-pool.js';
import { kConnectionActorEntry, kHashWorkerEntry } from './actor-entry.js';

export interface MirrorSettings {
  legs: string[];
  /** Each leg's name from `NAME=URI` or `{ name, uri }` (null: automatic), by position in legs. */
  legNames: Array<string | null>;
  /** How the listener settings are named in errors: the flag, or `KEY in FILE` when the config file set them. */
  where: { socket: string; listen: string; control: string; metrics: string };
  socket: string | null;
  listen: string | null;
  name: string;
  size: number | undefined;
  ringSlots: number | undefined;
  slotBytes: number | undefined;
  copyMode: CopyMode;
  placement: Placement;
  maxPayload: number;
  legTimeoutMs: number;
  /** --leg-connections: connections per NBD leg with multi-conn (a URI's connections=N wins). */
  legConnections: number;
  idleProbeMs: number;
  fenceTimeoutMs: number;
  /** null = --leg-timeout, or 5000 when that is 0. */
  probeTimeoutMs: number | null;
  legMaxFailures: number;
  legFailureWindowMs: number;
  legStableMs: number;
  bitmapChunk: number;
  bitmapPool: number;
  reconnectMinMs: number;
  reconnectMaxMs: number;
  resyncRateMin: number;
  resyncRateMax: number;
  flushTracking: boolean;
  logLevel: string;
  dataDir: string;
  receive: 'stream' | 'direct';
  /** --control PATH or "none"; null = the default path (src/control/plane.ts). */
  control: string | null;
  /** --metrics [HOST:]PORT, or null: no metrics endpoint. */
  metrics: string | null;
  /** --max-connections, --handshake-timeout, --payload-timeout (NBD server abuse bounds). */
  serverLimits: ServerLimits;
  /** leg: assemble from on-leg metadata (default); none: no metadata. */
  metadata: 'leg' | 'none';
  forceSource: number | null;
  degraded: boolean;
  /** --tls, --tls-certificates, --tls-verify-peer (the export's TLS). */
  tls: ServerTlsSettings;
  /** -r/--read-only: the export refuses writes (EPERM); resyncs still write the legs. */
  readOnly: boolean;
  /** --verify-threads: the verify hash pool's size. */
  verifyThreads: number;
  /** --verify-interval / verifyInterval: scheduled verify period (ms, 0 = off). */
  verifyIntervalMs: number;
  /** --resync-verify: checksum resync (compare first, copy only what differs). */
  resyncVerify: boolean;
  /** --read-policy, --write-mostly, --write-behind (bytes), --read-repair (src/engine/read-policy.ts). */
  readPolicy: ReadPolicyName;
  writeMostly: number[];
  writeBehind: number;
  readRepair: boolean;
  /** --checkpoint-granularity: bytes per bit of every checkpoint (changed-block tracking). */
  checkpointGranularity: number;
}

const kConfigKeys = new Set(['legs', 'socket', 'listen', 'name', 'size', 'ringSlots', 'slotBytes', 'copyMode', 'placement', 'maxPayload', 'legTimeoutMs', 'legConnections', 'idleProbeMs', 'fenceTimeoutMs', 'probeTimeoutMs', 'legMaxFailures', 'legFailureWindowMs', 'legStableMs', 'bitmapChunk', 'bitmapPool', 'reconnectMinMs', 'reconnectMaxMs', 'resyncRateMin', 'resyncRateMax', 'flushTracking', 'logLevel', 'dataDir', 'receive', 'control', 'metrics', 'maxConnections', 'handshakeTimeoutMs', 'payloadTimeoutMs', 'metadata', 'forceSource', 'degraded', 'tls', 'tlsCertificates', 'tlsVerifyPeer', 'tlsPsk', 'readOnly', 'readPolicy', 'writeMostly', 'writeBehind', 'readRepair', 'checkpointGranularity', 'verifyThreads', 'verifyInterval', 'resyncVerify']);
const kDefaultLegBytes = 1024 ** 3;
/** The longest timer Node keeps (2^31 - 1 ms, about 24.8 days). */
const kVerifyIntervalMsMax = 2_147_483_647;

function readConfig(path: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    throw new EnbdError('ENBD_ERR_CONFIG', `cannot read config ${path}: ${describeError(error)}`);
  }
  let parsed: unknown;
  try {
    parsed = parseYaml(text);
  } catch (error) {
    throw new EnbdError('ENBD_ERR_CONFIG', `config ${path} is not valid JSON or YAML: ${describeError(error)}`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new EnbdError('ENBD_ERR_CONFIG', `config ${path} must be a mapping of settings`);
  }
  const config = parsed as Record<string, unknown>;
  for (const key of Object.keys(config)) {
    if (!kConfigKeys.has(key)) throw new EnbdError('ENBD_ERR_USAGE', `${key} in ${basename(path)} is not a setting (settings: ${[...kConfigKeys].join(', ')})`);
  }
  return config;
}

/** The flag of each config key (the same setting on the command line). */
const kFlagOfKey: Record<string, string> = {
  socket: '--socket', listen: '--listen', name: '--name', size: '--size', ringSlots: '--ring-slots', slotBytes: '--slot-bytes',
  copyMode: '--copy-mode', placement: '--placement', maxPayload: '--max-payload', legTimeoutMs: '--leg-timeout', idleProbeMs: '--idle-probe',
  fenceTimeoutMs: '--fence-timeout', probeTimeoutMs: '--probe-timeout', legMaxFailures: '--leg-max-failures', legFailureWindowMs: '--leg-failure-window',
  legStableMs: '--leg-stable', bitmapChunk: '--bitmap-chunk', bitmapPool: '--bitmap-pool', reconnectMinMs: '--reconnect-min', reconnectMaxMs: '--reconnect-max',
  resyncRateMin: '--resync-rate-min', resyncRateMax: '--resync-rate-max', flushTracking: '--flush-tracking', logLevel: '--log-level', dataDir: '--data-dir',
  receive: '--receive', control: '--control', metrics: '--metrics', maxConnections: '--max-connections', handshakeTimeoutMs: '--handshake-timeout',
  payloadTimeoutMs: '--payload-timeout', metadata: '--metadata', forceSource: '--force-source', degraded: '--degraded', tls: '--tls',
  tlsCertificates: '--tls-certificates', tlsVerifyPeer: '--tls-verify-peer', tlsPsk: '--tls-psk', readOnly: '--read-only',
  checkpointGranularity: '--checkpoint-granularity', legConnections: '--leg-connections', verifyThreads: '--verify-threads',
  verifyInterval: '--verify-interval', resyncVerify: '--resync-verify', readPolicy: '--read-policy', writeMostly: '--write-mostly',
  writeBehind: '--write-behind', readRepair: '--read-repair',
};

/**
 * Reads settings from the flags, else the config file, and names each as the user wrote it:
 * the flag (`--leg-timeout`) when it came from the command line, else the key and the file
 * (`legTimeoutMs in mirror.yaml`), else the flag (a default is never wrong).
 */
class SettingSource {
  private readonly file: string;
  constructor(private readonly flags: Record<string, unknown>, private readonly config: Record<string, unknown>) {
    this.file = typeof flags['config'] === 'string' ? basename(flags['config']) : '';
  }

  value(key: string): unknown {
    return this.flags[key] ?? this.config[key];
  }

  name(key: string): string {
    if (this.flags[key] === undefined && this.config[key] !== undefined) return `${key} in ${this.file}`;
    return kFlagOfKey[key] ?? key;
  }

  /** The value as text (flags are strings; the file may hold numbers), or the default. */
  text(key: string, fallback: string): string;
  text(key: string, fallback?: undefined): string | undefined;
  text(key: string, fallback?: string): string | undefined {
    const value = this.value(key);
    if (value === undefined || value === null) return fallback;
    if (typeof value === 'string') return value;
    if (typeof value === 'number') return String(value);
    throw usageError(this.name(key), 'a string or a number', value);
  }

  /** One of `choices`. */
  choice<T extends string>(key: string, choices: readonly T[], fallback: T): T {
    const value = this.text(key, fallback);
    if (!(choices as readonly string[]).includes(value)) throw usageError(this.name(key), `${choices.slice(0, -1).join(', ')} or ${choices.at(-1) ?? ''}`, value);
    return value as T;
  }

  /** A switch: true/false in the file, on/off or true/false as text. */
  flag(key: string, fallback: boolean): boolean {
    const value = this.value(key) ?? fallback;
    if (value === true || value === 'on' || value === 'true') return true;
    if (value === false || value === 'off' || value === 'false') return false;
    throw usageError(this.name(key), 'on or off', value);
  }
}

/** Merges the config file (if any) under the command-line flags and validates everything. */
export function resolveMirrorSettings(flags: Record<string, unknown>): MirrorSettings {
  const config = typeof flags['config'] === 'string' ? readConfig(flags['config']) : {};
  const from = new SettingSource(flags, config);
  const fromFlags = (flags['leg'] as string[] | undefined)?.length !== undefined && (flags['leg'] as string[]).length > 0;
  const legsValue = fromFlags ? flags['leg'] : config['legs'];
  const legsWhere = fromFlags ? '--leg' : `legs in ${typeof flags['config'] === 'string' ? basename(flags['config']) : ''}`;
  if (legsValue !== undefined && !Array.isArray(legsValue)) throw usageError(legsWhere, 'a list of [NAME=]URI strings or { name, uri } mappings', legsValue);
  const specs = (legsValue ?? []).map((leg: unknown) => legSpecOf(leg, legsWhere));
  const legs = specs.map((spec) => spec.uri);
  const legNames = specs.map((spec) => spec.name);
  assignLegNames(legNames, legsWhere); // a name given twice is refused here, before anything opens
  const copyMode = from.choice('copyMode', ['shared', 'per-leg'] as const, 'shared');
  const placement = from.choice('placement', ['workers', 'inline'] as const, 'workers');
  const logLevel = from.text('logLevel', 'info');
  if (!isLogLevel(logLevel)) throw usageError(from.name('logLevel'), 'fatal, error, warn, info, debug, trace or silent', logLevel);
  const receive = from.choice('receive', ['stream', 'direct'] as const, 'direct');
  const duration = (key: string, fallback: string, minimumMs: number, maximumMs: number): number => parseDurationMs(from.name(key), from.text(key, fallback), minimumMs, maximumMs);
  const bytes = (key: string, fallback: string): number => parseBytes(from.name(key), from.text(key, fallback));
  const integer = (key: string, fallback: string, minimum: number, maximum: number): number => parseInteger(from.name(key), from.text(key, fallback), minimum, maximum);
  const reconnectMinMs = duration('reconnectMinMs', '250', 1, 3_600_000);
  const reconnectMaxMs = duration('reconnectMaxMs', '30000', 1, 3_600_000);
  if (reconnectMaxMs < reconnectMinMs) throw usageError(from.name('reconnectMaxMs'), `at least ${from.name('reconnectMinMs')} (${reconnectMinMs} ms)`, from.text('reconnectMaxMs'));
  const resyncRateMin = bytes('resyncRateMin', '32M');
  const resyncRateMax = bytes('resyncRateMax', '0');
  if (resyncRateMax !== 0 && resyncRateMax < resyncRateMin) {
    throw usageError(from.name('resyncRateMax'), `0 (unlimited) or at least ${from.name('resyncRateMin')} (${resyncRateMin} bytes/s)`, from.text('resyncRateMax'));
  }
  const metadata = from.choice('metadata', ['leg', 'none'] as const, 'leg');
  const size = from.text('size');
  if (metadata === 'leg' && size !== undefined) {
    throw new EnbdError('ENBD_ERR_USAGE', `${from.name('size')} applies to --metadata none only: with metadata the export is the data area recorded on the legs (see enbd examine)`);
  }
  const ringSlots = from.text('ringSlots');
  const slotBytes = from.text('slotBytes');
  const probeTimeout = from.text('probeTimeoutMs');
  const forceSource = from.text('forceSource');
  const tlsCertificates = from.text('tlsCertificates');
  const tlsPsk = from.text('tlsPsk');
  const legTimeoutText = from.text('legTimeoutMs', '5000');
  const writeMostlyValue = (flags['writeMostly'] as string[] | undefined)?.length ? flags['writeMostly'] : config['writeMostly'];
  const writeMostlyWhere = (flags['writeMostly'] as string[] | undefined)?.length ? '--write-mostly' : from.name('writeMostly');
  const writeMostlyList: unknown[] = writeMostlyValue === undefined ? [] : Array.isArray(writeMostlyValue) ? writeMostlyValue : [writeMostlyValue];
  const writeMostly = writeMostlyLegs(writeMostlyWhere, writeMostlyList, legs, legNames, legsWhere);
  const writeBehindText = from.text('writeBehind', '0');
  const writeBehindMiB = Number(writeBehindText);
  if (writeBehindText.trim() === '' || !Number.isFinite(writeBehindMiB) || writeBehindMiB < 0 || writeBehindMiB > 1024) {
    throw usageError(from.name('writeBehind'), 'a number of MiB from 0 to 1024', writeBehindText);
  }
  if (writeBehindMiB > 0 && writeMostly.length === 0) throw new EnbdError('ENBD_ERR_USAGE', `${from.name('writeBehind')} applies to write-mostly legs: name them with --write-mostly LEG (a name or an index) or write-mostly=1 in the leg's URI`);
  return {
    tls: {
      mode: parseTlsMode(from.name('tls'), from.text('tls', 'off')),
      ...(tlsCertificates !== undefined ? { certificatesDir: resolve(tlsCertificates) } : {}),
      ...(tlsPsk !== undefined ? { pskFile: resolve(tlsPsk) } : {}),
      verifyPeer: from.flag('tlsVerifyPeer', false),
    },
    metadata,
    forceSource: forceSource === undefined ? null : parseInteger(from.name('forceSource'), forceSource, 0, 31),
    degraded: from.flag('degraded', false),
    readOnly: from.flag('readOnly', false),
    verifyThreads: integer('verifyThreads', String(defaultHashThreads()), 1, kHashThreadsMax),
    verifyIntervalMs: duration('verifyInterval', '0', 0, kVerifyIntervalMsMax),
    resyncVerify: from.flag('resyncVerify', false),
    readPolicy: from.choice('readPolicy', kReadPolicies, 'least-pending'),
    writeMostly,
    writeBehind: Math.round(writeBehindMiB * 1024 * 1024),
    readRepair: from.flag('readRepair', true),
    checkpointGranularity: checkGranularity(parseBytes(from.name('checkpointGranularity'), from.text('checkpointGranularity', '64K'))),
    legs,
    legNames,
    where: { socket: from.name('socket'), listen: from.name('listen'), control: from.name('control'), metrics: from.name('metrics') },
    socket: from.text('socket') ?? null,
    listen: checkedListen(from, 'listen'),
    name: from.text('name', ''),
    size: size === undefined ? undefined : parseBytes(from.name('size'), size),
    ringSlots: ringSlots === undefined ? undefined : parseRingSlots(from.name('ringSlots'), ringSlots),
    slotBytes: slotBytes === undefined ? undefined : parseSlotBytes(from.name('slotBytes'), slotBytes),
    copyMode,
    placement,
    maxPayload: bytes('maxPayload', '32M'),
    legTimeoutMs: parseLegTimeout(from.name('legTimeoutMs'), legTimeoutText),
    legConnections: parseLegConnections(from.name('legConnections'), from.text('legConnections', '1')),
    idleProbeMs: duration('idleProbeMs', '5000', 0, 3_600_000),
    fenceTimeoutMs: duration('fenceTimeoutMs', '10000', 1, 3_600_000),
    probeTimeoutMs: probeTimeout === undefined ? null : parseDurationMs(from.name('probeTimeoutMs'), probeTimeout, 1, 3_600_000),
    legMaxFailures: integer('legMaxFailures', '20', 0, 1_000_000),
    legFailureWindowMs: duration('legFailureWindowMs', '3600000', 1, 7 * 24 * 3_600_000),
    legStableMs: duration('legStableMs', '30000', 0, 24 * 3_600_000),
    bitmapChunk: parseBitmapChunk(from.name('bitmapChunk'), from.text('bitmapChunk', '4K')),
    bitmapPool: integer('bitmapPool', '64', 1, 262_144),
    reconnectMinMs,
    reconnectMaxMs,
    resyncRateMin,
    resyncRateMax,
    flushTracking: from.flag('flushTracking', true),
    logLevel,
    dataDir: resolve(from.text('dataDir', 'enbd-data')),
    receive,
    control: from.text('control') ?? null,
    metrics: checkedListen(from, 'metrics'),
    serverLimits: parseServerLimits(
      from.text('maxConnections', kServerLimitDefaults.maxConnections),
      from.text('handshakeTimeoutMs', kServerLimitDefaults.handshakeTimeoutMs),
      from.text('payloadTimeoutMs', kServerLimitDefaults.payloadTimeoutMs),
      { maxConnections: from.name('maxConnections'), handshakeTimeoutMs: from.name('handshakeTimeoutMs'), payloadTimeoutMs: from.name('payloadTimeoutMs') },
    ),
  };
}

/**
 * --write-mostly (or writeMostly in the file): each a leg name (given or automatic), an index or
 * a leg's URI, plus the legs whose URI says write-mostly=1; sorted leg indexes, each once.
 * Without legs (the embedded default) only an index is accepted.
 */
function writeMostlyLegs(where: string, refs: readonly unknown[], legs: readonly string[], given: ReadonlyArray<string | null>, legsWhere: string): number[] {
  const names = legs.length > 0 ? assignLegNames(given, legsWhere) : [];
  const chosen = new Set<number>();
  for (const value of refs) {
    const text = typeof value === 'number' ? String(value) : typeof value === 'string' ? value.trim() : JSON.stringify(value);
    if (legs.length === 0) {
      chosen.add(parseInteger(where, text, 0, 30));
      continue;
    }
    const byName = names.indexOf(text);
    const byUri = legs.indexOf(text);
    const index = byName >= 0 ? byName : /^\d+$/.test(text) && Number(text) < legs.length ? Number(text) : byUri;
    if (index < 0) throw usageError(where, `a leg name (${names.join(', ')}), an index from 0 to ${legs.length - 1} or a leg's URI`, text);
    chosen.add(index);
  }
  for (const [index, uri] of legs.entries()) {
    try {
      if (legUriWriteMostly(uri) === true) chosen.add(index);
    } catch {
      throw usageError(legsWhere, 'URIs with write-mostly=0 or write-mostly=1', uri);
    }
  }
  return [...chosen].sort((a, b) => a - b);
}

/** --listen/--metrics as given (parsed again when the daemon binds), checked now so an error names it as written. */
function checkedListen(from: SettingSource, key: 'listen' | 'metrics'): string | null {
  const text = from.text(key);
  if (text === undefined) return null;
  parseListen(from.name(key), text);
  return text;
}

/** --leg-connections: 1..kMaxLegConnections. */
function parseLegConnections(option: string, value: string): number {
  const count = parseConnectionCount(value.trim());
  if (count === null) throw usageError(option, `an integer from 1 to ${kMaxLegConnections}`, value);
  return count;
}

/** One entry of --leg or the config's legs: `[NAME=]URI`, or `{ name, uri }` in the file. */
function legSpecOf(value: unknown, where: string): LegSpec {
  if (typeof value === 'string') return splitLegSpec(value, where);
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const entry = value as Record<string, unknown>;
    const unknownKey = Object.keys(entry).find((key) => key !== 'name' && key !== 'uri');
    if (typeof entry['uri'] !== 'string' || entry['uri'] === '' || unknownKey !== undefined) {
      throw usageError(where, 'a list of [NAME=]URI strings or { name, uri } mappings with a non-empty uri', value);
    }
    const name = entry['name'];
    if (name === undefined || name === null) return { name: null, uri: entry['uri'] };
    const problem = typeof name === 'string' ? legNameProblem(name) : 'must be a string';
    if (problem !== null) throw usageError(`the leg name in ${where}`, problem.replace(/^must be /, '').replace(/^must not be (.*)$/, 'not $1'), name);
    return { name: name as string, uri: entry['uri'] };
  }
  throw usageError(where, 'a list of [NAME=]URI strings or { name, uri } mappings', value);
}

/** --ring-slots: a power of two from 2 to 4096, named as the user wrote it. */
function parseRingSlots(option: string, value: string): number {
  const slots = Number(value);
  if (!/^\d+$/.test(value.trim()) || slots < 2 || slots > 4096 || (slots & (slots - 1)) !== 0) {
    throw usageError(option, 'a power of two from 2 to 4096', value);
  }
  return slots;
}

/** --slot-bytes: a multiple of 4K from 4K to 32M. */
function parseSlotBytes(option: string, value: string): number {
  const bytes = parseBytes(option, value);
  if (bytes < 4096 || bytes > 32 * 1024 * 1024 || bytes % 4096 !== 0) throw usageError(option, 'a multiple of 4K from 4K to 32M', value);
  return bytes;
}

/** Shortest --leg-timeout accepted (0 = never): below it a leg that is merely busy would fail. */
const kLegTimeoutFloorMs = 100;

function parseLegTimeout(option: string, value: string): number {
  const ms = parseDurationMs(option, value, 0, 3_600_000);
  if (ms !== 0 && ms < kLegTimeoutFloorMs) {
    throw usageError(option, `0 (never) or at least ${kLegTimeoutFloorMs}ms: a shorter timeout fails legs that are only busy (a FLUSH or a loaded server takes longer)`, value);
  }
  return ms;
}

function parseBitmapChunk(option: string, value: string): number {
  const bytes = parseBytes(option, value);
  if (bytes < 512 || bytes > 64 * 1024 * 1024 || (bytes & (bytes - 1)) !== 0) throw usageError(option, 'a power of two from 512 to 64M', value);
  return bytes;
}

/**
 * The embedded default: two sparse 1 GiB file legs in the data dir (created if missing).
 * Returns true when it created both now (they then get fresh metadata, assumed clean: both are
 * all zeros).
 */
function embeddedDefault(settings: MirrorSettings, activated: boolean): boolean {
  mkdirSync(settings.dataDir, { recursive: true });
  let created = 0;
  for (const name of ['leg0.img', 'leg1.img']) {
    const path = join(settings.dataDir, name);
    if (!existsSync(path)) {
      const fd = openSync(path, 'wx');
      ftruncateSync(fd, kDefaultLegBytes);
      closeSync(fd);
      created += 1;
    } else if (!statSync(path).isFile()) {
      throw new EnbdError('ENBD_ERR_CONFIG', `${path} exists and is not a regular file`);
    }
    settings.legs.push(join(settings.dataDir, name));
  }
  settings.socket ??= join(settings.dataDir, 'enbd.sock');
  if (!activated) settings.listen ??= '127.0.0.1:10809';
  return created === 2;
}

/**
 * Reads the legs' metadata and claims them (src/meta/assemble.ts); with `createFirst`, writes
 * fresh metadata first (the embedded default's first start).
 */
async function assembleLegs(settings: MirrorSettings, createFirst: boolean, logger: Logger): Promise<AssembledArray> {
  if (createFirst) {
    const devices = await openLegDevices(settings.legs);
    const legs = devices.map((device, index) => ({ uri: settings.legs[index] ?? '', meta: new LegMeta(device) }));
    try {
      const created = await createArray(legs, { name: 'enbd-embedded', assumeClean: true, force: false });
      logger.info({ arrayUuid: created.arrayUuid, dataSizeBytes: created.layout.dataSizeBytes }, 'embedded default: created array metadata on both legs');
    } finally {
      await Promise.allSettled(devices.map((device) => device.close()));
    }
  }
  const devices = await openLegDevices(settings.legs);
  const assembled = await assembleArray(settings.legs, devices, { forceSource: settings.forceSource, degraded: settings.degraded, writeMostly: settings.writeMostly, legNames: settings.legNames });
  return assembled;
}

/** The legs' names after assembly: given ones, else the names their members recorded (assembly resolved clashes). */
function recordedLegNames(assembled: AssembledArray, given: ReadonlyArray<string | null>): Array<string | null> {
  return given.map((name, index) => {
    const leg = assembled.legs[index];
    return name ?? (leg === undefined ? null : assembled.plan.members[leg.slotIndex]?.name ?? null);
  });
}

/**
 * What SIGHUP changes in a running mirror, config key -> how; `legs` is reconciled against the
 * running set (reconcileLegs). Everything else in the file needs a restart.
 */
export const kLiveSettings = ['resyncRateMin', 'resyncRateMax', 'readPolicy', 'logLevel', 'maxConnections', 'handshakeTimeoutMs', 'payloadTimeoutMs', 'verifyIntervalMs'] as const;

/** The settings as config keys, for comparing two loads (serverLimits flattened). */
function comparable(settings: MirrorSettings): Record<string, unknown> {
  const { serverLimits, where: _where, ...rest } = settings;
  return {
    ...rest,
    maxConnections: serverLimits.connectionsMax,
    handshakeTimeoutMs: serverLimits.handshakeTimeoutMs,
    payloadTimeoutMs: serverLimits.payloadTimeoutMs,
  };
}

const kLevelOrder = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];
function showsInfo(level: string): boolean {
  return kLevelOrder.indexOf(level) <= kLevelOrder.indexOf('info');
}

interface Running {
  mirror: MirrorDevice;
  server: NbdServer;
  logger: Logger;
}

/**
 * SIGHUP: re-reads the config file (flags still win), applies what changed among kLiveSettings,
 * and logs one line with every change and every setting that changed but needs a restart. An
 * invalid file throws (the caller logs it) and nothing is applied. Clients are never touched.
 * `loaded` is what the last load said; it is updated to the applied values.
 */
async function reloadMirror(flags: Record<string, unknown>, loaded: MirrorSettings, running: Running): Promise<void> {
  const next = resolveMirrorSettings(flags);
  const before = comparable(loaded);
  const after = comparable(next);
  const changed: Record<string, { from: unknown; to: unknown }> = {};
  const needsRestart: string[] = [];
  for (const key of Object.keys(after)) {
    if (key === 'legs' || key === 'legNames') continue; // reconciled against the running set below
    if (JSON.stringify(before[key]) === JSON.stringify(after[key])) continue;
    if ((kLiveSettings as readonly string[]).includes(key)) changed[key] = { from: before[key], to: after[key] };
    else needsRestart.push(key);
  }
  if (changed['verifyIntervalMs'] !== undefined) {
    running.mirror.setVerifyInterval(next.verifyIntervalMs);
    loaded.verifyIntervalMs = next.verifyIntervalMs;
  }
  if (changed['resyncRateMin'] !== undefined || changed['resyncRateMax'] !== undefined) {
    running.mirror.setResyncRates({ minBytesPerSecond: next.resyncRateMin, maxBytesPerSecond: next.resyncRateMax });
    loaded.resyncRateMin = next.resyncRateMin;
    loaded.resyncRateMax = next.resyncRateMax;
  }
  if (changed['readPolicy'] !== undefined) {
    running.mirror.setReadPolicy(next.readPolicy);
    loaded.readPolicy = next.readPolicy;
  }
  if (JSON.stringify(loaded.serverLimits) !== JSON.stringify(next.serverLimits)) {
    running.server.setLimits(next.serverLimits);
    loaded.serverLimits = { ...next.serverLimits };
  }
  const legs = await reconcileLegs(next, running);
  if (legs.added.length > 0 || legs.removed.length > 0) changed['legs'] = { from: legs.before, to: running.mirror.legStatus().map((leg) => `${leg.name}=${leg.uri}`) };
  const line = { config: flags['config'], changed, ...(needsRestart.length > 0 ? { needsRestart } : {}), ...(legs.refused.length > 0 ? { legsRefused: legs.refused } : {}) };
  const message = Object.keys(changed).length === 0 ? 'SIGHUP: config reloaded, nothing to change live' : 'SIGHUP: config reloaded';
  const previousLevel = running.logger.level;
  // one line, under whichever of the two log levels shows info
  if (showsInfo(previousLevel)) running.logger.info(line, message);
  if (changed['logLevel'] !== undefined) {
    running.logger.level = next.logLevel;
    await running.mirror.setLogLevel(next.logLevel);
    loaded.logLevel = next.logLevel;
    if (!showsInfo(previousLevel) && showsInfo(next.logLevel)) running.logger.info(line, message);
  }
}

/**
 * SIGHUP's legs: the file's legs (by URI) against the running set. New ones are added (with
 * their given name, else the next automatic one; a full resync each), running ones the file no
 * longer lists are removed, except when the engine refuses (the last in-sync leg, or the only
 * holder of some data): that leg stays and a warning says why. Adds go first, so a leg replaced
 * in the file can be removed once its replacement is in.
 */
async function reconcileLegs(next: MirrorSettings, running: Running): Promise<{ before: string[]; added: string[]; removed: string[]; refused: Array<{ leg: string; why: string }> }> {
  const live = running.mirror.legStatus();
  const before = live.map((leg) => `${leg.name}=${leg.uri}`);
  const wanted = new Set(next.legs);
  const added: string[] = [];
  const removed: string[] = [];
  const refused: Array<{ leg: string; why: string }> = [];
  for (const [at, uri] of next.legs.entries()) {
    if (live.some((leg) => leg.uri === uri)) continue;
    try {
      const index = await running.mirror.addLeg(uri, next.legNames[at] ?? null);
      added.push(running.mirror.legStatus().find((leg) => leg.index === index)?.name ?? uri);
    } catch (error) {
      refused.push({ leg: uri, why: describeError(error) });
      running.logger.warn({ uri, err: describeError(error) }, 'SIGHUP: leg in the config not added');
    }
  }
  for (const leg of live) {
    if (wanted.has(leg.uri)) continue;
    try {
      await running.mirror.removeLeg(leg.index);
      removed.push(leg.name);
    } catch (error) {
      const why = error instanceof Error ? error.message : String(error);
      refused.push({ leg: leg.name, why });
      running.logger.warn({ leg: leg.name, uri: leg.uri, err: describeError(error) }, `SIGHUP: leg ${leg.name} is gone from the config but stays: ${why}`);
    }
  }
  return { before, added, removed, refused };
}

export async function runMirror(flags: Record<string, unknown>): Promise<void> {
  const habits = parseHostHabits(flags);
  try {
    await runMirrorWith(flags, habits);
  } catch (error) {
    hostCleanup(habits); // the -U - directory of a start that failed
    throw error;
  }
}

async function runMirrorWith(flags: Record<string, unknown>, habits: HostHabits): Promise<void> {
  const settings = resolveMirrorSettings(flags);
  const loaded = structuredClone(settings); // what the config said, before the defaults filled in
  if (settings.socket === kPrivateSocket) settings.socket = makePrivateSocket(habits);
  const embedded = settings.legs.length === 0;
  const activated = takeListenFds(); // systemd socket activation: replaces the default TCP address
  const createdNow = embedded ? embeddedDefault(settings, activated.length > 0) : false;
  if (settings.socket === null && settings.listen === null && activated.length === 0) settings.listen = '127.0.0.1:10809';
  const listen = settings.listen === null ? null : parseListen(settings.where.listen, settings.listen);
  const logger = createLogger({ level: settings.logLevel });
  // Certificates are checked before any leg is opened: a bad path fails fast.
  const serverTls = loadServerTls(settings.tls);
  const hangup = installHangup(logger, 'enbd mirror is still starting');
  const notifier = ServiceNotifier.fromEnvironment(logger); // before any worker starts
  const metricsAddress = settings.metrics === null ? null : parseListen(settings.where.metrics, settings.metrics);
  // every listener is checked before any leg is opened or any socket bound (a second daemon
  // on the same socket, port or control socket refuses here and touches nothing)
  await checkMirrorListeners(settings, listen, metricsAddress, embedded);
  const assembled = settings.metadata === 'leg' ? await assembleLegs(settings, createdNow, logger) : undefined;
  const served = await openMirrorServer({
    ...(assembled !== undefined ? { metadata: assembled } : {}),
    legs: settings.legs,
    legNames: assembled === undefined ? settings.legNames : recordedLegNames(assembled, settings.legNames),
    checkpointGranularityBytes: settings.checkpointGranularity,
    ...(settings.size !== undefined ? { sizeBytes: settings.size } : {}),
    ring: {
      ...(settings.ringSlots !== undefined ? { slotCount: settings.ringSlots } : {}),
      ...(settings.slotBytes !== undefined ? { slotBytes: settings.slotBytes } : {}),
    },
    copyMode: settings.copyMode,
    placement: settings.placement,
    actorEntry: kConnectionActorEntry,
    logger,
    logLevel: settings.logLevel,
    legTimeoutMs: settings.legTimeoutMs,
    legConnections: settings.legConnections,
    idleProbeMs: settings.idleProbeMs,
    fenceTimeoutMs: settings.fenceTimeoutMs,
    ...(settings.probeTimeoutMs !== null ? { probeTimeoutMs: settings.probeTimeoutMs } : {}),
    legMaxFailures: settings.legMaxFailures,
    legFailureWindowMs: settings.legFailureWindowMs,
    legStableMs: settings.legStableMs,
    bitmapChunkBytes: settings.bitmapChunk,
    bitmapPoolPages: settings.bitmapPool,
    reconnectMinMs: settings.reconnectMinMs,
    reconnectMaxMs: settings.reconnectMaxMs,
    resyncRates: { minBytesPerSecond: settings.resyncRateMin, maxBytesPerSecond: settings.resyncRateMax },
    flushTracking: settings.flushTracking,
    verify: { threads: settings.verifyThreads, intervalMs: settings.verifyIntervalMs, workerEntry: kHashWorkerEntry },
    resyncVerify: settings.resyncVerify,
    readPolicy: settings.readPolicy,
    writeMostly: settings.writeMostly,
    readRepair: settings.readRepair,
    ...(settings.writeBehind > 0 ? { writeBehindBytes: settings.writeBehind } : {}),
  }, (opened) => ({
    exportName: settings.name,
    logger,
    maximumPayloadBytes: settings.maxPayload,
    ...settings.serverLimits,
    directReceive: settings.receive === 'direct',
    tls: serverTls,
    readOnly: settings.readOnly,
    metaContexts: mirrorStatusContexts(opened),
  }));
  const { mirror, server } = served;
  const uris: string[] = [];
  // With --tls require the export URIs are the nbds forms (plain clients are refused).
  const tlsScheme = serverTls?.mode === 'require' ? 'nbds' : 'nbd';
  let tcp: { host: string; port: number } | null = null;
  let control: ControlPlane | null = null;
  let metrics: MetricsServer | null = null;
  try {
    for (const fd of activated) await server.listenFd(fd);
    if (settings.socket !== null) {
      const socketPath = resolve(settings.socket);
      await server.listenUnix(socketPath, settings.where.socket);
      uris.push(`${tlsScheme}+unix:///${encodeURIComponent(settings.name)}?socket=${socketPath}`);
    }
    if (listen !== null) {
      const port = await server.listenTcp(listen.host, listen.port);
      tcp = { host: listen.host, port };
      const host = listen.host.includes(':') ? `[${listen.host}]` : listen.host;
      uris.push(`${tlsScheme}://${host}:${port}/${encodeURIComponent(settings.name)}`);
    }
    // the operator's control socket; closed first on shutdown
    control = await startControlPlane({ control: settings.control, socket: settings.socket, dataDir: settings.dataDir, embedded, mirror, server, logger });
    if (metricsAddress !== null) {
      metrics = await startMetricsServer({ ...metricsAddress, mirror, server, logger });
      logger.info({ url: `http://${metricsAddress.host}:${metrics.port}/metrics` }, 'metrics listening');
    }
  } catch (error) {
    await control?.close();
    await served.abort();
    throw error;
  }
  printBanner(settings, mirror, uris, embedded, control?.path ?? null, bannerStream(habits, activated.length > 0), activated);
  if (typeof flags['config'] === 'string') {
    const running: Running = { mirror, server, logger };
    hangup.setReload(async () => await reloadMirror(flags, loaded, running));
  } else {
    hangup.setReload(null, 'no --config file, nothing to reload');
  }
  const shutdown = installShutdown(logger, async () => {
    hangup.setReload(null, 'the daemon is stopping');
    notifier?.stopping();
    try {
      await stopMirror(control, metrics, served, logger);
    } finally {
      hostCleanup(habits);
      await notifier?.drained();
    }
  });
  hostReady(habits, { exportName: settings.name, unixSocket: settings.socket === null ? null : resolve(settings.socket), tcp }, logger, shutdown);
  if (notifier !== null) notifyLegSummary(notifier, mirror, shutdown);
}

const kStatusDebounceMs = 1000;

/** "2/2 legs in sync" or "1/2 legs in sync; leg b resyncing 40.0%" (systemd STATUS=; legs by name). */
export function legSummary(mirror: MirrorDevice): string {
  const legs = mirror.legStatus().filter((leg) => leg.state !== 'removed');
  const inSync = legs.filter((leg) => leg.state === 'in-sync').length;
  const head = `${inSync}/${legs.length} legs in sync`;
  return inSync === legs.length ? head : `${head}; ${describeLagging(legs)}`;
}

/** READY=1 with the leg summary now; a new STATUS= at most once a second after leg events. */
function notifyLegSummary(notifier: ServiceNotifier, mirror: MirrorDevice, shutdown: Shutdown): void {
  notifier.ready(legSummary(mirror));
  let timer: NodeJS.Timeout | null = null;
  mirror.on(() => {
    if (timer !== null || shutdown.stopping) return;
    timer = setTimeout(() => {
      timer = null;
      if (!shutdown.stopping) notifier.status(legSummary(mirror));
    }, kStatusDebounceMs);
    timer.unref();
  });
}

async function stopMirror(control: ControlPlane | null, metrics: MetricsServer | null, served: MirrorServer, logger: Logger): Promise<void> {
  await control?.close();
  await metrics?.close();
  await served.stop((errno) => {
    if (errno !== 0) logger.error({ errno }, 'final flush of the legs failed');
    logger.info({ stats: served.mirror.stats(), payload: served.server.payloadStats() }, 'final stats');
  });
}

/** Throws, naming the flag and the address, if any listener of this mirror is taken. */
async function checkMirrorListeners(settings: MirrorSettings, listen: ListenAddress | null, metrics: ListenAddress | null, embedded: boolean): Promise<void> {
  if (settings.socket !== null) await checkUnixFree(resolve(settings.socket), settings.where.socket);
  if (listen !== null) await checkTcpFree(listen.host, listen.port, settings.where.listen);
  const controlPath = controlPathFor({ control: settings.control, socket: settings.socket, dataDir: settings.dataDir, embedded });
  if (controlPath !== null) await checkUnixFree(controlPath, settings.where.control);
  if (metrics !== null) await checkTcpFree(metrics.host, metrics.port, settings.where.metrics);
}

function printBanner(settings: MirrorSettings, mirror: MirrorDevice, uris: string[], embedded: boolean, controlPath: string | null, stream: NodeJS.WriteStream, activated: readonly number[]): void {
  const lines = [`enbd mirror: ${mirror.sizeBytes} bytes mirrored across ${settings.legs.length} legs`];
  const meta = mirror.metadataStatus();
  if (meta !== null) lines.push(`  array: "${meta.arrayName}" ${meta.arrayUuid}, events ${meta.events}, write-intent chunk ${meta.bitmapChunkBytes} bytes`);
  else lines.push('  metadata: none (unprotected: a crash or a restart while degraded can serve stale data)');
  for (const leg of mirror.legStatus()) lines.push(`  leg ${leg.name} (${leg.index}): ${leg.uri} (${leg.kind}) ${leg.state}${leg.member != null ? `, member ${leg.member.slotIndex}` : ''}`);
  if (activated.length > 0) lines.push(`  socket activation: ${activated.length} inherited listener${activated.length === 1 ? '' : 's'} (fd ${activated.join(', ')})`);
  for (const uri of uris) lines.push(`  export: ${uri}`);
  if (controlPath !== null) lines.push(`  control: ${controlPath} (enbd status --control ${controlPath})`);
  const first = uris[0] ?? '';
  if (settings.tls.mode !== 'off') {
    const how = settings.tls.pskFile !== undefined
      ? 'pre-shared keys (clients add USER@ and tls-psk-file=FILE to nbds URIs)'
      : `certificates${settings.tls.verifyPeer === true ? ', client certificates verified' : ''} (clients add tls-certificates=DIR with their ca-cert.pem to nbds URIs)`;
    lines.push(`  tls: ${settings.tls.mode}, ${how}`);
  }
  if (first !== '') {
    lines.push('attach:', `  nbdinfo '${first}'`, `  qemu-io -f raw -c 'read -v 0 512' '${first}'`);
    lines.push(`  mkdir -p /tmp/enbd-fuse && nbdfuse /tmp/enbd-fuse/disk.img '${first}' &`);
  }
  if (embedded) lines.push(`(embedded default: data in ${settings.dataDir}; stop with Ctrl-C)`);
  stream.write(lines.join('\n') + '\n');
}
