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
import { join, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { createLogger, isLogLevel, type Logger } from '../core/log.js';
import { assembleArray, type AssembledArray } from '../meta/assemble.js';
import { createArray } from '../meta/create-array.js';
import { LegMeta } from '../meta/leg-meta.js';
import { openLegDevices } from './create.js';
import { EnbdError, describeError } from '../core/errors.js';
import { MirrorDevice } from '../engine/mirror.js';
import { parseReadPolicy, type ReadPolicyName } from '../engine/read-policy.js';
import type { CopyMode, Placement } from '../engine/messages.js';
import { createNbdServer, type NbdServer } from '../nbd/server/server.js';
import { loadServerTls, parseTlsMode, type ServerTlsSettings } from '../nbd/server/server-tls.js';
import { kServerLimitDefaults, parseBytes, parseDurationMs, parseInteger, parseListen, parseServerLimits, type ListenAddress, type ServerLimits } from './parse.js';
import { installShutdown, type Shutdown } from './shutdown.js';
import { ServiceNotifier } from './notify.js';
import { takeListenFds } from './activation.js';
import { describeLagging } from '../control/health.js';
import { installHangup } from './hangup.js';
import { bannerStream, hostCleanup, hostReady, kPrivateSocket, makePrivateSocket, parseHostHabits, type HostHabits } from './host.js';
import { controlPathFor, startControlPlane, type ControlPlane } from '../control/plane.js';
import { checkTcpFree, checkUnixFree } from '../core/listen.js';
import { checkGranularity } from '../engine/checkpoints.js';
import { mirrorStatusContexts } from '../engine/status-contexts.js';
import { startMetricsServer, type MetricsServer } from '../metrics/metrics.js';
import { kConnectionActorEntry } from './actor-entry.js';

export interface MirrorSettings {
  legs: string[];
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
  /** --read-policy, --write-mostly, --write-behind (bytes), --read-repair (src/engine/read-policy.ts). */
  readPolicy: ReadPolicyName;
  writeMostly: number[];
  writeBehind: number;
  readRepair: boolean;
  /** --checkpoint-granularity: bytes per bit of every checkpoint (changed-block tracking). */
  checkpointGranularity: number;
}

const kConfigKeys = new Set(['legs', 'socket', 'listen', 'name', 'size', 'ringSlots', 'slotBytes', 'copyMode', 'placement', 'maxPayload', 'legTimeoutMs', 'idleProbeMs', 'fenceTimeoutMs', 'probeTimeoutMs', 'legMaxFailures', 'legFailureWindowMs', 'legStableMs', 'bitmapChunk', 'bitmapPool', 'reconnectMinMs', 'reconnectMaxMs', 'resyncRateMin', 'resyncRateMax', 'flushTracking', 'logLevel', 'dataDir', 'receive', 'control', 'metrics', 'maxConnections', 'handshakeTimeoutMs', 'payloadTimeoutMs', 'metadata', 'forceSource', 'degraded', 'tls', 'tlsCertificates', 'tlsVerifyPeer', 'tlsPsk', 'readOnly', 'readPolicy', 'writeMostly', 'writeBehind', 'readRepair', 'checkpointGranularity']);
const kDefaultLegBytes = 1024 ** 3;

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
    if (!kConfigKeys.has(key)) throw new EnbdError('ENBD_ERR_CONFIG', `config ${path}: unknown setting "${key}" (known: ${[...kConfigKeys].join(', ')})`);
  }
  return config;
}

function text(value: unknown, what: string): string {
  if (typeof value === 'string') return value;
  if (typeof value === 'number') return String(value);
  throw new EnbdError('ENBD_ERR_CONFIG', `${what} must be a string`);
}

/** Merges the config file (if any) under the command-line flags and validates everything. */
export function resolveMirrorSettings(flags: Record<string, unknown>): MirrorSettings {
  const config = typeof flags['config'] === 'string' ? readConfig(flags['config']) : {};
  const pick = (key: string): unknown => flags[key] ?? config[key];
  const legsValue = (flags['leg'] as string[] | undefined)?.length ? flags['leg'] : config['legs'];
  if (legsValue !== undefined && !Array.isArray(legsValue)) throw new EnbdError('ENBD_ERR_CONFIG', 'legs must be a list of URIs');
  const legs = (legsValue ?? []).map((leg: unknown, index: number) => text(leg, `leg ${index}`));
  const copyMode = text(pick('copyMode') ?? 'shared', 'copyMode');
  if (copyMode !== 'shared' && copyMode !== 'per-leg') throw new EnbdError('ENBD_ERR_CONFIG', `--copy-mode must be shared or per-leg, got "${copyMode}"`);
  const placement = text(pick('placement') ?? 'workers', 'placement');
  if (placement !== 'workers' && placement !== 'inline') throw new EnbdError('ENBD_ERR_CONFIG', `--placement must be workers or inline, got "${placement}"`);
  const logLevel = text(pick('logLevel') ?? 'info', 'logLevel');
  if (!isLogLevel(logLevel)) throw new EnbdError('ENBD_ERR_CONFIG', `--log-level "${logLevel}" is not a pino level`);
  const receive = text(pick('receive') ?? 'stream', 'receive');
  if (receive !== 'stream' && receive !== 'direct') throw new EnbdError('ENBD_ERR_CONFIG', `--receive must be stream or direct, got "${receive}"`);
  const reconnectMinMs = parseDurationMs('--reconnect-min', text(pick('reconnectMinMs') ?? '250', '--reconnect-min'), 1, 3_600_000);
  const reconnectMaxMs = parseDurationMs('--reconnect-max', text(pick('reconnectMaxMs') ?? '30000', '--reconnect-max'), 1, 3_600_000);
  if (reconnectMaxMs < reconnectMinMs) throw new EnbdError('ENBD_ERR_CONFIG', `--reconnect-max (${reconnectMaxMs}) is below --reconnect-min (${reconnectMinMs})`);
  const resyncRateMin = parseBytes('--resync-rate-min', text(pick('resyncRateMin') ?? '32M', '--resync-rate-min'));
  const resyncRateMax = parseBytes('--resync-rate-max', text(pick('resyncRateMax') ?? '0', '--resync-rate-max'));
  if (resyncRateMax !== 0 && resyncRateMax < resyncRateMin) {
    throw new EnbdError('ENBD_ERR_CONFIG', `--resync-rate-max (${resyncRateMax}) is below --resync-rate-min (${resyncRateMin}); 0 means unlimited`);
  }
  const probeTimeout = pick('probeTimeoutMs');
  const size = pick('size');
  const ringSlots = pick('ringSlots');
  const slotBytes = pick('slotBytes');
  const socket = pick('socket');
  const listen = pick('listen');
  const control = pick('control');
  const metrics = pick('metrics');
  const metadata = text(pick('metadata') ?? 'leg', '--metadata');
  if (metadata !== 'leg' && metadata !== 'none') throw new EnbdError('ENBD_ERR_CONFIG', `--metadata must be leg or none, got "${metadata}"`);
  const forceSource = pick('forceSource');
  if (metadata === 'leg' && size !== undefined) {
    throw new EnbdError('ENBD_ERR_CONFIG', '--size applies to --metadata none only: with metadata the export is the data area recorded on the legs (see enbd examine)');
  }
  const writeMostlyValue = (flags['writeMostly'] as string[] | undefined)?.length ? flags['writeMostly'] : config['writeMostly'];
  const writeMostlyList: unknown[] = writeMostlyValue === undefined ? [] : Array.isArray(writeMostlyValue) ? writeMostlyValue : [writeMostlyValue];
  const writeMostly = writeMostlyList.map((value) => parseInteger('--write-mostly', text(value, '--write-mostly'), 0, 30));
  for (const index of writeMostly) {
    if (legs.length > 0 && index >= legs.length) throw new EnbdError('ENBD_ERR_CONFIG', `--write-mostly ${index}: there are only legs 0..${legs.length - 1}`);
  }
  const writeBehindMiB = Number(text(pick('writeBehind') ?? '0', '--write-behind'));
  if (!Number.isFinite(writeBehindMiB) || writeBehindMiB < 0 || writeBehindMiB > 1024) {
    throw new EnbdError('ENBD_ERR_CONFIG', `--write-behind must be a number of MiB from 0 to 1024, got "${String(pick('writeBehind'))}"`);
  }
  if (writeBehindMiB > 0 && writeMostly.length === 0) throw new EnbdError('ENBD_ERR_CONFIG', '--write-behind applies to write-mostly legs: name them with --write-mostly N');
  const tlsCertificates = pick('tlsCertificates');
  const tlsVerifyPeer = pick('tlsVerifyPeer');
  const tlsPsk = pick('tlsPsk');
  return {
    tls: {
      mode: parseTlsMode('--tls', text(pick('tls') ?? 'off', '--tls')),
      ...(tlsCertificates !== undefined ? { certificatesDir: resolve(text(tlsCertificates, '--tls-certificates')) } : {}),
      ...(tlsPsk !== undefined ? { pskFile: resolve(text(tlsPsk, '--tls-psk')) } : {}),
      verifyPeer: parseOnOff('--tls-verify-peer', tlsVerifyPeer === 'true' ? true : tlsVerifyPeer === 'false' ? false : (tlsVerifyPeer ?? false)),
    },
    metadata,
    forceSource: forceSource === undefined ? null : parseInteger('--force-source', text(forceSource, '--force-source'), 0, 31),
    degraded: pick('degraded') === true || pick('degraded') === 'true',
    readOnly: pick('readOnly') === true || pick('readOnly') === 'true',
    readPolicy: parseReadPolicy('--read-policy', text(pick('readPolicy') ?? 'least-pending', '--read-policy')),
    writeMostly,
    writeBehind: Math.round(writeBehindMiB * 1024 * 1024),
    readRepair: parseOnOff('--read-repair', pick('readRepair') ?? 'on'),
    checkpointGranularity: checkGranularity(parseBytes('--checkpoint-granularity', text(pick('checkpointGranularity') ?? '64K', '--checkpoint-granularity'))),
    legs,
    socket: socket === undefined ? null : text(socket, '--socket'),
    listen: listen === undefined ? null : text(listen, '--listen'),
    name: text(pick('name') ?? '', '--name'),
    size: size === undefined ? undefined : parseBytes('--size', text(size, '--size')),
    ringSlots: ringSlots === undefined ? undefined : parseRingSlots(text(ringSlots, '--ring-slots')),
    slotBytes: slotBytes === undefined ? undefined : parseSlotBytes(text(slotBytes, '--slot-bytes')),
    copyMode,
    placement,
    maxPayload: parseBytes('--max-payload', text(pick('maxPayload') ?? '32M', '--max-payload')),
    legTimeoutMs: parseLegTimeout(text(pick('legTimeoutMs') ?? '5000', '--leg-timeout')),
    idleProbeMs: parseDurationMs('--idle-probe', text(pick('idleProbeMs') ?? '5000', '--idle-probe'), 0, 3_600_000),
    fenceTimeoutMs: parseDurationMs('--fence-timeout', text(pick('fenceTimeoutMs') ?? '10000', '--fence-timeout'), 1, 3_600_000),
    probeTimeoutMs: probeTimeout === undefined ? null : parseDurationMs('--probe-timeout', text(probeTimeout, '--probe-timeout'), 1, 3_600_000),
    legMaxFailures: parseInteger('--leg-max-failures', text(pick('legMaxFailures') ?? '20', '--leg-max-failures'), 0, 1_000_000),
    legFailureWindowMs: parseDurationMs('--leg-failure-window', text(pick('legFailureWindowMs') ?? '3600000', '--leg-failure-window'), 1, 7 * 24 * 3_600_000),
    legStableMs: parseDurationMs('--leg-stable', text(pick('legStableMs') ?? '30000', '--leg-stable'), 0, 24 * 3_600_000),
    bitmapChunk: parseBitmapChunk(text(pick('bitmapChunk') ?? '4K', '--bitmap-chunk')),
    bitmapPool: parseInteger('--bitmap-pool', text(pick('bitmapPool') ?? '64', '--bitmap-pool'), 1, 262_144),
    reconnectMinMs,
    reconnectMaxMs,
    resyncRateMin,
    resyncRateMax,
    flushTracking: parseOnOff('--flush-tracking', pick('flushTracking') ?? 'on'),
    logLevel,
    dataDir: resolve(text(pick('dataDir') ?? 'enbd-data', '--data-dir')),
    receive,
    control: control === undefined ? null : text(control, '--control'),
    metrics: metrics === undefined ? null : text(metrics, '--metrics'),
    serverLimits: parseServerLimits(
      text(pick('maxConnections') ?? kServerLimitDefaults.maxConnections, '--max-connections'),
      text(pick('handshakeTimeoutMs') ?? kServerLimitDefaults.handshakeTimeoutMs, '--handshake-timeout'),
      text(pick('payloadTimeoutMs') ?? kServerLimitDefaults.payloadTimeoutMs, '--payload-timeout'),
    ),
  };
}

/** --ring-slots: a power of two from 2 to 4096, named as the user wrote it. */
function parseRingSlots(value: string): number {
  const slots = Number(value);
  if (!/^\d+$/.test(value.trim()) || slots < 2 || slots > 4096 || (slots & (slots - 1)) !== 0) {
    throw new EnbdError('ENBD_ERR_CONFIG', `--ring-slots must be a power of two from 2 to 4096, got ${value}`);
  }
  return slots;
}

/** --slot-bytes: a multiple of 4K from 4K to 32M. */
function parseSlotBytes(value: string): number {
  const bytes = parseBytes('--slot-bytes', value);
  if (bytes < 4096 || bytes > 32 * 1024 * 1024 || bytes % 4096 !== 0) {
    throw new EnbdError('ENBD_ERR_CONFIG', `--slot-bytes must be a multiple of 4K from 4K to 32M, got ${value}`);
  }
  return bytes;
}

/** Shortest --leg-timeout accepted (0 = never): below it a leg that is merely busy would fail. */
const kLegTimeoutFloorMs = 100;

function parseLegTimeout(value: string): number {
  const ms = parseDurationMs('--leg-timeout', value, 0, 3_600_000);
  if (ms !== 0 && ms < kLegTimeoutFloorMs) {
    throw new EnbdError('ENBD_ERR_CONFIG', `--leg-timeout must be 0 (never) or at least ${kLegTimeoutFloorMs}ms: a shorter timeout fails legs that are only busy (a FLUSH or a loaded server takes longer), got ${value}`);
  }
  return ms;
}

function parseOnOff(option: string, value: unknown): boolean {
  if (value === true || value === 'on') return true;
  if (value === false || value === 'off') return false;
  throw new EnbdError('ENBD_ERR_CONFIG', `${option} must be on or off, got "${String(value)}"`);
}

function parseBitmapChunk(value: string): number {
  const bytes = parseBytes('--bitmap-chunk', value);
  if (bytes < 512 || bytes > 64 * 1024 * 1024 || (bytes & (bytes - 1)) !== 0) {
    throw new EnbdError('ENBD_ERR_CONFIG', `--bitmap-chunk: "${value}" must be a power of two from 512 to 64M`);
  }
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
  const assembled = await assembleArray(settings.legs, devices, { forceSource: settings.forceSource, degraded: settings.degraded, writeMostly: settings.writeMostly });
  return assembled;
}

/**
 * What SIGHUP changes in a running mirror, config key -> how. Everything else in the file needs
 * a restart (legs: `enbd leg add` / `enbd leg remove` change the running set).
 */
export const kLiveSettings = ['resyncRateMin', 'resyncRateMax', 'readPolicy', 'logLevel', 'maxConnections', 'handshakeTimeoutMs', 'payloadTimeoutMs'] as const;

/** The settings as config keys, for comparing two loads (serverLimits flattened). */
function comparable(settings: MirrorSettings): Record<string, unknown> {
  const { serverLimits, ...rest } = settings;
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
    if (JSON.stringify(before[key]) === JSON.stringify(after[key])) continue;
    if ((kLiveSettings as readonly string[]).includes(key)) changed[key] = { from: before[key], to: after[key] };
    else needsRestart.push(key);
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
  const line = { config: flags['config'], changed, ...(needsRestart.length > 0 ? { needsRestart } : {}) };
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
  const listen = settings.listen === null ? null : parseListen('--listen', settings.listen);
  const logger = createLogger({ level: settings.logLevel });
  // Certificates are checked before any leg is opened: a bad path fails fast.
  const serverTls = loadServerTls(settings.tls);
  const hangup = installHangup(logger, 'enbd mirror is still starting');
  const notifier = ServiceNotifier.fromEnvironment(logger); // before any worker starts
  const metricsAddress = settings.metrics === null ? null : parseListen('--metrics', settings.metrics);
  // every listener is checked before any leg is opened or any socket bound (a second daemon
  // on the same socket, port or control socket refuses here and touches nothing)
  await checkMirrorListeners(settings, listen, metricsAddress, embedded);
  const assembled = settings.metadata === 'leg' ? await assembleLegs(settings, createdNow, logger) : undefined;
  const mirror = await MirrorDevice.open({
    ...(assembled !== undefined ? { metadata: assembled } : {}),
    legs: settings.legs,
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
    readPolicy: settings.readPolicy,
    writeMostly: settings.writeMostly,
    readRepair: settings.readRepair,
    ...(settings.writeBehind > 0 ? { writeBehindBytes: settings.writeBehind } : {}),
  });
  const server = createNbdServer({
    device: mirror,
    exportName: settings.name,
    logger,
    maximumPayloadBytes: settings.maxPayload,
    ...settings.serverLimits,
    directReceive: settings.receive === 'direct',
    tls: serverTls,
    readOnly: settings.readOnly,
    metaContexts: mirrorStatusContexts(mirror),
  });
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
      await server.listenUnix(socketPath, '--socket');
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
    await server.close();
    await mirror.close();
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
      await stopMirror(control, metrics, server, mirror, logger);
    } finally {
      hostCleanup(habits);
      await notifier?.drained();
    }
  });
  hostReady(habits, { exportName: settings.name, unixSocket: settings.socket === null ? null : resolve(settings.socket), tcp }, logger, shutdown);
  if (notifier !== null) notifyLegSummary(notifier, mirror, shutdown);
}

const kStatusDebounceMs = 1000;

/** "2/2 legs in sync" or "1/2 legs in sync; leg 1 resyncing 40.0%" (systemd STATUS=). */
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

async function stopMirror(control: ControlPlane | null, metrics: MetricsServer | null, server: NbdServer, mirror: MirrorDevice, logger: Logger): Promise<void> {
  await control?.close();
  await metrics?.close();
  await server.close();
  const errno = await mirror.flushAll();
  if (errno !== 0) logger.error({ errno }, 'final flush of the legs failed');
  logger.info({ stats: mirror.stats(), payload: server.payloadStats() }, 'final stats');
  await mirror.close();
}

/** Throws, naming the flag and the address, if any listener of this mirror is taken. */
async function checkMirrorListeners(settings: MirrorSettings, listen: ListenAddress | null, metrics: ListenAddress | null, embedded: boolean): Promise<void> {
  if (settings.socket !== null) await checkUnixFree(resolve(settings.socket), '--socket');
  if (listen !== null) await checkTcpFree(listen.host, listen.port, '--listen');
  const controlPath = controlPathFor({ control: settings.control, socket: settings.socket, dataDir: settings.dataDir, embedded });
  if (controlPath !== null) await checkUnixFree(controlPath, '--control');
  if (metrics !== null) await checkTcpFree(metrics.host, metrics.port, '--metrics');
}

function printBanner(settings: MirrorSettings, mirror: MirrorDevice, uris: string[], embedded: boolean, controlPath: string | null, stream: NodeJS.WriteStream, activated: readonly number[]): void {
  const lines = [`enbd mirror: ${mirror.sizeBytes} bytes mirrored across ${settings.legs.length} legs`];
  const meta = mirror.metadataStatus();
  if (meta !== null) lines.push(`  array: "${meta.arrayName}" ${meta.arrayUuid}, events ${meta.events}, write-intent chunk ${meta.bitmapChunkBytes} bytes`);
  else lines.push('  metadata: none (unprotected: a crash or a restart while degraded can serve stale data)');
  for (const leg of mirror.legStatus()) lines.push(`  leg ${leg.index}: ${leg.uri} (${leg.kind}) ${leg.state}${leg.member != null ? `, member ${leg.member.slotIndex}` : ''}`);
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
