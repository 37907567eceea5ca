/**
 * Every enbd_* series: name, type, labels, help, and how it is read from a MirrorSample.
 * `registerSeries` turns the table into prom-client Counters and Gauges whose collect()
 * callbacks reset the family and refill it from the latest sample (so legs that went away
 * drop out). The latency histogram is a SnapshotHistogram (histogram.ts).
 *
 * Thread: main thread, at scrape time only.
 *
 * Label values
 * | label   | values                                                                     |
 * |---------|----------------------------------------------------------------------------|
 * | op      | read, write, flush, trim, write_zeroes, cache (always present, 0 at start), |
 * |         | plus any other NBD command the engine counted, lower case                  |
 * | leg     | the leg's name ("a", "b", or as given); removed legs are left out          |
 * | index   | enbd_leg_info only: the leg's index (what older scrapes had as leg)          |
 * | state   | kLegStates: one series per state, 1 for the leg's current state, else 0    |
 * | receive | copied (socket chunk -> ring slot), direct (read straight into the slot)   |
 */
import type { KeeperStatus } from '../core/status-types.js';
import { Counter, Gauge, type Registry } from 'prom-client';
import { assert } from '../core/assert.js';
import { kVersion } from '../core/version.js';
import type { LegState, LegStats, LegStatus } from '../engine/view.js';
import { SnapshotHistogram } from './histogram.js';
import type { MirrorSample, Sampler } from './sample.js';

type Labels = Record<string, string>;
type Emit = (labels: Labels, value: number) => void;

export interface SeriesSpec {
  name: string;
  type: 'counter' | 'gauge';
  labelNames: readonly string[];
  help: string;
  read(sample: MirrorSample, emit: Emit): void;
}

/** Every leg state, in this order (a Record, so a new LegState fails to compile here). */
const kLegStateSet: Readonly<Record<LegState, true>> = {
  'in-sync': true,
  resyncing: true,
  probation: true,
  degraded: true,
  fencing: true,
  reconnecting: true,
  faulty: true,
  failed: true,
  removed: true,
};
export const kLegStates: readonly LegState[] = Object.keys(kLegStateSet) as LegState[];

export const kLatencyHistogramName = 'enbd_request_duration_seconds';

function legLabel(leg: LegStatus): Labels {
  return { leg: leg.name };
}

/** Emits `pick(status)` for every leg (from legStatus: always available). */
function perLeg(pick: (leg: LegStatus) => number): SeriesSpec['read'] {
  return (sample, emit) => {
    for (const leg of sample.stats.legs) emit(legLabel(leg), pick(leg));
  };
}

/** Emits `pick(stats)` for every leg whose actor answered; nothing when legStats timed out. */
function perLegActor(pick: (stats: LegStats) => number): SeriesSpec['read'] {
  return (sample, emit) => {
    if (sample.legStats === null) return;
    for (const leg of sample.stats.legs) {
      const stats = sample.legStats[leg.index];
      if (stats !== undefined) emit(legLabel(leg), pick(stats));
    }
  };
}

function requestsByOp(sample: MirrorSample, emit: Emit): void {
  const counts = new Map<string, number>();
  for (const { op } of sample.latency) counts.set(op, 0);
  for (const [command, count] of Object.entries(sample.stats.requests)) {
    const op = command.toLowerCase();
    counts.set(op, (counts.get(op) ?? 0) + count);
  }
  for (const [op, count] of counts) emit({ op }, count);
}

function bytesByOp(sample: MirrorSample, emit: Emit): void {
  for (const [command, bytes] of Object.entries(sample.stats.bytes)) emit({ op: command.toLowerCase() }, bytes);
}

function legStates(sample: MirrorSample, emit: Emit): void {
  for (const leg of sample.stats.legs) {
    for (const state of kLegStates) emit({ leg: leg.name, state }, leg.state === state ? 1 : 0);
  }
}

/** A series without labels. */
function single(
  name: string,
  type: SeriesSpec['type'],
  help: string,
  pick: (sample: MirrorSample) => number,
): SeriesSpec {
  return { name, type, labelNames: [], help, read: (sample, emit) => emit({}, pick(sample)) };
}

/** A series from the on-leg metadata (left out with --metadata none). */
function metaSeries(name: string, type: SeriesSpec['type'], help: string, pick: ((meta: KeeperStatus) => number) | null): SeriesSpec {
  if (pick === null) {
    return {
      name, type, labelNames: ['kind'], help, read: (sample, emit) => {
        if (sample.metadata === null) return;
        emit({ kind: 'bitmap' }, sample.metadata.bitmapWrites);
        emit({ kind: 'superblock' }, sample.metadata.superblockWrites);
      },
    };
  }
  return { name, type, labelNames: [], help, read: (sample, emit) => {
    if (sample.metadata !== null) emit({}, pick(sample.metadata));
  } };
}

/** A counter per leg, from legStatus (monotonic since start). */
function legCounter(name: string, help: string, pick: (leg: LegStatus) => number): SeriesSpec {
  return { name, type: 'counter', labelNames: ['leg'], help, read: perLeg(pick) };
}

/**
 * The array as one word, like `enbd status`'s exit code: in-sync (every leg), resyncing (every
 * leg admitted, some copying), degraded (an in-sync leg and one out), failed (no in-sync leg).
 */
export function mirrorState(legs: readonly LegStatus[]): 'in-sync' | 'resyncing' | 'degraded' | 'failed' {
  const live = legs.filter((leg) => leg.state !== 'removed');
  if (!live.some((leg) => leg.state === 'in-sync')) return 'failed';
  if (live.every((leg) => leg.state === 'in-sync')) return 'in-sync';
  return live.every((leg) => leg.state === 'in-sync' || leg.state === 'resyncing') ? 'resyncing' : 'degraded';
}
const kMirrorStates = ['in-sync', 'resyncing', 'degraded', 'failed'] as const;

/** A series per leg, from legStatus (always present). */
function legGauge(name: string, help: string, pick: (leg: LegStatus) => number): SeriesSpec {
  return { name, type: 'gauge', labelNames: ['leg'], help, read: perLeg(pick) };
}

/** A series per leg, from the leg actors' stats (left out when they did not answer). */
function actorSeries(
  name: string,
  type: SeriesSpec['type'],
  help: string,
  pick: (stats: LegStats) => number,
): SeriesSpec {
  return { name, type, labelNames: ['leg'], help, read: perLegActor(pick) };
}

function copiesPerWrite(sample: MirrorSample): number {
  const stats = sample.stats;
  return stats.writeRequests === 0 ? 0 : stats.writeCopies / stats.writeRequests;
}

const kRequestSeries: readonly SeriesSpec[] = [
  {
    name: 'enbd_requests_total', type: 'counter', labelNames: ['op'], read: requestsByOp,
    help: 'Client requests received by the mirror engine, by NBD command.',
  },
  {
    name: 'enbd_request_bytes_total', type: 'counter', labelNames: ['op'], read: bytesByOp,
    help: 'Bytes requested by clients, by NBD command (payload for READ/WRITE, range for TRIM/WRITE_ZEROES/CACHE).',
  },
  single('enbd_write_requests_total', 'counter',
    'Client WRITE requests received by the mirror engine.',
    (s) => s.stats.writeRequests),
  single('enbd_write_payload_copies_total', 'counter',
    'Userspace copies of WRITE payloads (socket chunk to ring slot, plus per-leg copies).',
    (s) => s.stats.writeCopies),
  single('enbd_write_payload_copied_bytes_total', 'counter',
    'Bytes of WRITE payloads copied in userspace (all copies).',
    (s) => s.stats.writeBytesCopied),
  single('enbd_write_payload_copies_per_request', 'gauge',
    'Mean userspace copies per WRITE since start (copies / write requests; 0 before any).',
    copiesPerWrite),
  {
    name: 'enbd_server_write_payload_bytes_total', type: 'counter', labelNames: ['receive'],
    help: 'WRITE payload bytes the NBD server received: copied from socket chunks, or read '
      + 'straight into ring slots (--receive direct).',
    read: (s, emit) => {
      emit({ receive: 'copied' }, s.payloadBytesCopied);
      emit({ receive: 'direct' }, s.payloadBytesDirect);
    },
  },
  single('enbd_in_flight_requests', 'gauge',
    'Requests inside the mirror engine now (client requests and resync copies).',
    (s) => s.engineInFlight),
  single('enbd_server_in_flight_requests', 'gauge',
    'Client requests parsed by the NBD server and not yet answered.',
    (s) => s.serverInFlight),
  single('enbd_client_connections', 'gauge',
    'Open NBD client connections.',
    (s) => s.connectionCount),
  single('enbd_export_size_bytes', 'gauge', 'Size of the export in bytes.', (s) => s.exportBytes),
  metaSeries('enbd_metadata_events', 'gauge', 'Generation (events) of the array in the on-leg metadata.', (m) => m.events),
  metaSeries('enbd_write_intent_chunks', 'gauge', 'Write-intent bitmap chunks whose bit is set on the legs.', (m) => m.dirtyChunks),
  metaSeries('enbd_write_intent_chunk_bytes', 'gauge', 'Bytes covered by one write-intent bitmap bit.', (m) => m.bitmapChunkBytes),
  metaSeries('enbd_write_intent_waits_total', 'counter', 'Data-changing requests that waited for a write-intent bitmap write.', (m) => m.intentWaits),
  metaSeries('enbd_metadata_writes_total', 'counter', 'Metadata writes to the legs, by kind (bitmap page, superblock).', null),
];

const kRingSeries: readonly SeriesSpec[] = [
  single('enbd_ring_slots', 'gauge', 'Slots in the shared request ring.', (s) => s.ringSlotCount),
  single('enbd_ring_slot_bytes', 'gauge', 'Bytes per ring slot.', (s) => s.ringSlotBytes),
  single('enbd_ring_slots_in_use', 'gauge',
    'Ring slots not free now (a large request holds a run of slots).',
    (s) => s.ringSlotCount - s.ringSlotsFree),
  single('enbd_ring_requests', 'gauge',
    'Requests holding ring slots now (live slot runs).',
    (s) => s.ringRequests),
];

const kArraySeries: readonly SeriesSpec[] = [
  {
    name: 'enbd_build_info', type: 'gauge', labelNames: ['version', 'node'],
    help: 'Always 1: the enbd version and the Node.js version running it.',
    read: (_s, emit) => emit({ version: kVersion, node: process.versions.node }, 1),
  },
  {
    name: 'enbd_mirror_legs', type: 'gauge', labelNames: ['state'],
    help: `Legs in each state (${kLegStates.join(', ')}).`,
    read: (s, emit) => {
      for (const state of kLegStates) emit({ state }, s.stats.legs.filter((leg) => leg.state === state).length);
    },
  },
  single('enbd_mirror_legs_expected', 'gauge', 'Legs the mirror is to have (every leg but removed ones).',
    (s) => s.stats.legs.filter((leg) => leg.state !== 'removed').length),
  {
    name: 'enbd_mirror_state', type: 'gauge', labelNames: ['state'],
    help: `The array's state: 1 for the current one (${kMirrorStates.join(', ')}), like enbd status's exit code.`,
    read: (s, emit) => {
      const now = mirrorState(s.stats.legs);
      for (const state of kMirrorStates) emit({ state }, state === now ? 1 : 0);
    },
  },
];

const kLegSeries: readonly SeriesSpec[] = [
  {
    name: 'enbd_leg_info', type: 'gauge', labelNames: ['leg', 'index', 'uri', 'kind'],
    help: 'Always 1: the index, URI and kind of each leg (by its name).',
    read: (s, emit) => {
      for (const leg of s.stats.legs) {
        emit({ leg: leg.name, index: String(leg.index), uri: leg.uri, kind: leg.kind }, 1);
      }
    },
  },
  {
    name: 'enbd_leg_state', type: 'gauge', labelNames: ['leg', 'state'], read: legStates,
    help: `Leg state: 1 for the current state, 0 for the others (${kLegStates.join(', ')}).`,
  },
  legCounter('enbd_leg_failures_total',
    'Times the leg left the in-sync or resyncing state since the daemon started.',
    (leg) => leg.failures),
  legCounter('enbd_leg_resynced_bytes_total',
    'Bytes copied to the leg by resyncs since the daemon started.',
    (leg) => leg.resyncedBytes),
  legCounter('enbd_leg_read_repairs_total',
    'Client READ errors (EIO) of the leg repaired by rewriting the range from another leg, since the daemon started.',
    (leg) => leg.readRepairs ?? 0),
  legCounter('enbd_leg_reads_total',
    'Client reads the leg served (the read policy\'s choice), since the daemon started.',
    (leg) => leg.reads ?? 0),
  legGauge('enbd_leg_behind_bytes',
    'Write-behind: bytes acknowledged to clients that this write-mostly leg does not hold yet.',
    (leg) => leg.behindBytes ?? 0),
  legCounter('enbd_leg_reconnects_total',
    'Reconnect attempts of the leg since the daemon started (never reset).',
    (leg) => leg.reconnects ?? 0),
  legGauge('enbd_leg_dirty_bytes',
    'Bytes of the leg its dirty map marks as missed (0 while in sync).',
    (leg) => leg.dirtyBytes),
  legGauge('enbd_leg_in_flight_requests',
    'Requests dispatched to the leg and not yet answered (master view).',
    (leg) => leg.inFlight),
  legGauge('enbd_leg_reconnect_attempts',
    'Reconnect attempts since the leg last left in-sync (0 once it is back).',
    (leg) => leg.reconnectAttempts),
  legGauge('enbd_leg_resync_active',
    '1 while a resync of the leg is under way (running or paused), else 0.',
    (leg) => (leg.resync === null ? 0 : 1)),
  legGauge('enbd_leg_resync_done_bytes',
    'Bytes copied by the current resync of the leg (0 when none).',
    (leg) => leg.resync?.bytesDone ?? 0),
  legGauge('enbd_leg_resync_left_bytes',
    'Bytes the current resync of the leg still has to copy (0 when none).',
    (leg) => leg.resync?.bytesLeft ?? 0),
  legGauge('enbd_leg_resync_rate_bytes_per_second',
    'Current copy rate of the resync of the leg (0 when none).',
    (leg) => leg.resync?.bytesPerSecond ?? 0),
];

const kLegActorSeries: readonly SeriesSpec[] = [
  single('enbd_leg_stats_up', 'gauge',
    '1 if every leg actor answered this scrape\'s stats request in time, else 0 (then the '
      + 'leg actor series are left out of the scrape).',
    (s) => (s.legStats === null ? 0 : 1)),
  actorSeries('enbd_leg_requests_total', 'counter',
    'Requests the leg actor sent to its leg.',
    (stats) => stats.requests),
  actorSeries('enbd_leg_read_bytes_total', 'counter',
    'Bytes read from the leg (successful READs, resync source reads included).',
    (stats) => stats.bytesRead),
  actorSeries('enbd_leg_written_bytes_total', 'counter',
    'Bytes written to the leg (successful WRITEs, resync copies included).',
    (stats) => stats.bytesWritten),
  actorSeries('enbd_leg_errors_total', 'counter',
    'Leg requests that failed.',
    (stats) => stats.errors),
  actorSeries('enbd_leg_completed_requests_total', 'counter',
    'Leg requests answered (the count behind enbd_leg_request_seconds_total).',
    (stats) => stats.latencyCount),
  actorSeries('enbd_leg_request_seconds_total', 'counter',
    'Sum of leg request latencies, issue to answer, in seconds.',
    (stats) => stats.latencySumMs / 1000),
  actorSeries('enbd_leg_connected', 'gauge',
    '1 if the leg actor holds an open connection to its leg, else 0.',
    (stats) => (stats.connected ? 1 : 0)),
];

/** Online verify (src/engine/verify.ts, through MirrorView.verifyStatus). */
const kVerifySeries: readonly SeriesSpec[] = [
  {
    name: 'enbd_verify_running', type: 'gauge', labelNames: [],
    help: '1 while a verify (check or repair) runs, else 0.',
    read: (s, emit) => {
      if (s.verify !== null) emit({}, s.verify.current?.running === true ? 1 : 0);
    },
  },
  {
    name: 'enbd_verify_mismatch_chunks_total', type: 'counter', labelNames: [],
    help: 'Chunks (of the verify chunk size) found different between in-sync legs since the daemon started.',
    read: (s, emit) => {
      if (s.verify !== null) emit({}, s.verify.mismatchChunksTotal);
    },
  },
  {
    name: 'enbd_verify_repaired_chunks_total', type: 'counter', labelNames: [],
    help: 'Mismatched chunks rewritten from the reference leg by verify --repair since the daemon started.',
    read: (s, emit) => {
      if (s.verify !== null) emit({}, s.verify.repairedChunksTotal);
    },
  },
  {
    name: 'enbd_verify_checked_bytes_total', type: 'counter', labelNames: [],
    help: 'Bytes read from every in-sync leg and compared by verifies since the daemon started (zero ranges skipped are not counted).',
    read: (s, emit) => {
      if (s.verify !== null) emit({}, s.verify.checkedBytesTotal);
    },
  },
  {
    name: 'enbd_verify_done_ratio', type: 'gauge', labelNames: [],
    help: 'Fraction of the running (or last) verify\'s range done, 0..1 (0 before the first).',
    read: (s, emit) => {
      const current = s.verify?.current ?? null;
      if (s.verify !== null) emit({}, current === null || current.lengthBytes === 0 ? 0 : current.bytesDone / current.lengthBytes);
    },
  },
  {
    name: 'enbd_resync_verify_matched_bytes_total', type: 'counter', labelNames: ['leg'],
    help: 'Checksum resync (--resync-verify): bytes found identical on the target and not copied.',
    read: (s, emit) => {
      for (const entry of s.verify?.resyncVerify ?? []) emit({ leg: String(entry.leg) }, entry.matchedBytes);
    },
  },
];

export const kSeries: readonly SeriesSpec[] = [
  ...kRequestSeries,
  ...kRingSeries,
  ...kArraySeries,
  ...kLegSeries,
  ...kLegActorSeries,
  ...kVerifySeries,
];

function registerSpec(registry: Registry, sampler: Sampler, spec: SeriesSpec): void {
  const { name, help, labelNames } = spec;
  const config = { name, help, labelNames, registers: [registry] };
  if (spec.type === 'counter') {
    const counter: Counter<string> = new Counter({
      ...config,
      collect: () => {
        counter.reset();
        const sample = sampler.latest;
        if (sample !== null) spec.read(sample, (labels, value) => counter.inc(labels, value));
      },
    });
    return;
  }
  const gauge: Gauge<string> = new Gauge({
    ...config,
    collect: () => {
      gauge.reset();
      const sample = sampler.latest;
      if (sample !== null) spec.read(sample, (labels, value) => gauge.set(labels, value));
    },
  });
}

/** Registers every enbd_* series (and the latency histogram) on `registry`. */
export function registerSeries(registry: Registry, sampler: Sampler): void {
  const names = new Set(kSeries.map((spec) => spec.name));
  assert(names.size === kSeries.length, 'series names are unique');
  assert(!names.has(kLatencyHistogramName), 'the histogram name is not a plain series');
  for (const spec of kSeries) {
    assert(spec.name.startsWith('enbd_'), `${spec.name} has the enbd_ prefix`);
    registerSpec(registry, sampler, spec);
  }
  new SnapshotHistogram({
    name: kLatencyHistogramName,
    help: 'Client request latency in the mirror engine (arrival to completion), by NBD command.',
    labelNames: ['op'],
    registry,
    read: () => {
      const latency = sampler.latest?.latency ?? [];
      return latency.map(({ op, snapshot }) => ({ labels: { op }, snapshot }));
    },
  });
}
