/**
 * startMetricsServer against a fake mirror and server (no actors, no sockets but HTTP):
 * the routes (404, 405, HEAD, query strings), the series read from the fake's values, the
 * default process metrics, and the bound on a slow or failing legStats(): the scrape still
 * answers in time, without the per-leg actor series, and a stuck call is not stacked; a leg
 * the engine answers null for (late) counts as missing, a removed one does not.
 * Threads: test process main thread.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { LatencyHistograms } from '../../../src/core/latency.js';
import { OptionError } from '../../../src/core/errors.js';
import { createLogger } from '../../../src/core/log.js';
import { kLatencyKinds, type LegStatus, type MirrorStats } from '../../../src/engine/mirror.js';
import type { LegStats } from '../../../src/engine/messages.js';
import { startMetricsServer, type MetricsMirror, type MetricsNbdServer, type MetricsServer } from '../../../src/metrics/metrics.js';
import { parseExposition, samplesOf, valueOf, type Exposition } from './exposition.js';

const logger = createLogger({ level: 'silent', pretty: false });
const servers: MetricsServer[] = [];
after(async () => {
  await Promise.all(servers.map(async (server) => await server.close()));
});

function legStatus(index: number, overrides: Partial<LegStatus> = {}): LegStatus {
  return {
    index, name: String.fromCharCode(97 + index), uri: `nbd+unix:///?socket=/run/leg${index}.sock`, kind: 'nbd', state: 'in-sync', inFlight: 0,
    failureReason: null, dirtyBytes: 0, reconnectAttempts: 0, resync: null, failures: 0, recentFailures: 0, resyncedBytes: 0, ...overrides,
  };
}

function legStats(requests: number): LegStats {
  return { requests, bytesRead: 4096, bytesWritten: 8192, errors: 1, inFlight: 0, connected: true, latencySumMs: 250, latencyCount: requests };
}

interface Fake {
  mirror: MetricsMirror;
  server: MetricsNbdServer;
  legStatsCalls: number;
  /** The timeout the sampler passed to the engine's legStats, last call. */
  legStatsTimeoutMs: number | null;
  legStats: () => Promise<Array<LegStats | null>>;
}

function fake(): Fake {
  const latency = new LatencyHistograms(kLatencyKinds);
  latency.record(1, 0.7);
  latency.record(1, 3);
  const legs = [
    legStatus(0),
    legStatus(1, {
      state: 'resyncing', dirtyBytes: 65536,
      resync: { leg: 1, running: true, paused: false, bytesDone: 4096, bytesLeft: 65536, bytesTotal: 69632, bytesPerSecond: 1000, etaSeconds: 66, startedAt: 0, copiesInFlight: 1 },
    }),
  ];
  const stats: MirrorStats = { requests: { WRITE: 2, FLUSH: 1 }, bytes: { WRITE: 8192 }, writeRequests: 2, writeCopies: 3, writeBytesCopied: 12288, ringSlotsInUse: 2, legs };
  const state: Fake = {
    legStatsCalls: 0,
    legStatsTimeoutMs: null,
    legStats: async () => [legStats(7), legStats(9)],
    mirror: {
      sizeBytes: 1 << 20,
      inFlight: 2,
      ringCounters: () => ({ slotCount: 8, slotBytes: 4096, freeCount: 6, inUse: 1 }),
      latency,
      stats: () => stats,
      metadataStatus: () => null,
      legStats: async (timeoutMs) => {
        state.legStatsCalls += 1;
        state.legStatsTimeoutMs = timeoutMs;
        return await state.legStats();
      },
    },
    server: { connectionCount: 3, inFlight: 1, payloadStats: () => ({ bytesCopied: 8192, bytesDirect: 4096 }) },
  };
  return state;
}

async function start(state: Fake, legStatsTimeoutMs = 200): Promise<MetricsServer> {
  const server = await startMetricsServer({ host: '127.0.0.1', port: 0, mirror: state.mirror, server: state.server, logger, legStatsTimeoutMs });
  servers.push(server);
  return server;
}

async function scrape(server: MetricsServer, path = '/metrics'): Promise<Exposition> {
  const response = await fetch(`http://127.0.0.1:${server.port}${path}`);
  assert.equal(response.status, 200);
  assert.match(response.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
  return parseExposition(await response.text());
}

test('the series carry the mirror\'s and the server\'s values', async () => {
  const server = await start(fake());
  const metrics = await scrape(server);
  assert.equal(valueOf(metrics, 'enbd_requests_total', { op: 'write' }), 2);
  assert.equal(valueOf(metrics, 'enbd_requests_total', { op: 'flush' }), 1);
  assert.equal(valueOf(metrics, 'enbd_requests_total', { op: 'read' }), 0, 'every latency kind is present from the start');
  assert.equal(valueOf(metrics, 'enbd_write_payload_copies_per_request'), 1.5);
  assert.equal(valueOf(metrics, 'enbd_server_write_payload_bytes_total', { receive: 'direct' }), 4096);
  assert.equal(valueOf(metrics, 'enbd_client_connections'), 3);
  assert.equal(valueOf(metrics, 'enbd_ring_slots'), 8);
  assert.equal(valueOf(metrics, 'enbd_ring_slots_in_use'), 2);
  assert.equal(valueOf(metrics, 'enbd_ring_requests'), 1);
  assert.equal(valueOf(metrics, 'enbd_leg_state', { leg: 'b', state: 'resyncing' }), 1);
  assert.equal(valueOf(metrics, 'enbd_leg_state', { leg: 'b', state: 'in-sync' }), 0);
  assert.equal(samplesOf(metrics, 'enbd_leg_state', { leg: 'a' }).length, 9, 'one series per state');
  assert.equal(valueOf(metrics, 'enbd_leg_dirty_bytes', { leg: 'b' }), 65536);
  assert.equal(valueOf(metrics, 'enbd_leg_resync_left_bytes', { leg: 'b' }), 65536);
  assert.equal(valueOf(metrics, 'enbd_leg_resync_done_bytes', { leg: 'b' }), 4096);
  assert.equal(valueOf(metrics, 'enbd_leg_resync_active', { leg: 'a' }), 0);
  assert.equal(valueOf(metrics, 'enbd_leg_info', { leg: 'a', index: '0', kind: 'nbd' }), 1);
  assert.equal(valueOf(metrics, 'enbd_leg_requests_total', { leg: 'b' }), 9);
  assert.equal(valueOf(metrics, 'enbd_leg_request_seconds_total', { leg: 'a' }), 0.25);
  assert.equal(valueOf(metrics, 'enbd_leg_stats_up'), 1);
  assert.equal(valueOf(metrics, 'enbd_request_duration_seconds_count', { op: 'write' }), 2);
  assert.equal(metrics.types.get('enbd_requests_total'), 'counter');
  assert.equal(metrics.types.get('enbd_leg_dirty_bytes'), 'gauge');
  assert.ok(samplesOf(metrics, 'process_cpu_user_seconds_total').length === 1, 'default process metrics');
  assert.ok(metrics.samples.every((sample) => Number.isFinite(sample.value) || sample.labels['le'] !== undefined || sample.name.startsWith('nodejs_')));
});

test('a legStats() that never answers leaves the per-leg actor series out, within the timeout, once', async () => {
  const state = fake();
  state.legStats = async () => await new Promise<LegStats[]>(() => undefined);
  const server = await start(state, 100);
  for (let round = 0; round < 3; round += 1) {
    const startedMs = performance.now();
    const metrics = await scrape(server);
    const tookMs = performance.now() - startedMs;
    assert.ok(tookMs < 2000, `scrape answered in ${tookMs.toFixed(0)} ms`);
    assert.equal(valueOf(metrics, 'enbd_leg_stats_up'), 0);
    assert.equal(samplesOf(metrics, 'enbd_leg_requests_total').length, 0, 'actor series left out');
    assert.equal(valueOf(metrics, 'enbd_leg_dirty_bytes', { leg: 'b' }), 65536, 'master-side leg series stay');
  }
  assert.equal(state.legStatsCalls, 1, 'a stuck call is awaited again, not stacked');
});

test('a legStats() that fails leaves the actor series out; the next good one brings them back', async () => {
  const state = fake();
  state.legStats = async () => {
    throw new Error('actor gone');
  };
  const server = await start(state);
  assert.equal(valueOf(await scrape(server), 'enbd_leg_stats_up'), 0);
  state.legStats = async () => [legStats(1), legStats(2)];
  const metrics = await scrape(server);
  assert.equal(valueOf(metrics, 'enbd_leg_stats_up'), 1);
  assert.equal(valueOf(metrics, 'enbd_leg_requests_total', { leg: 'b' }), 2);
});

test('the engine\'s per-leg timeout: a listed leg without an answer leaves the actor series out; a removed one does not', async () => {
  const state = fake();
  state.legStats = async () => [legStats(7), null];
  const server = await start(state, 150);
  const late = await scrape(server);
  assert.equal(state.legStatsTimeoutMs, 150, 'the engine is asked with the scrape\'s timeout');
  assert.equal(valueOf(late, 'enbd_leg_stats_up'), 0);
  assert.equal(samplesOf(late, 'enbd_leg_requests_total').length, 0, 'actor series left out');
  state.legStats = async () => [legStats(7), legStats(9), null]; // leg 2: removed (not in legStatus)
  const back = await scrape(server);
  assert.equal(valueOf(back, 'enbd_leg_stats_up'), 1);
  assert.equal(valueOf(back, 'enbd_leg_requests_total', { leg: 'b' }), 9);
});

test('other paths are 404, other methods 405; HEAD and query strings work', async () => {
  const server = await start(fake());
  const base = `http://127.0.0.1:${server.port}`;
  for (const path of ['/', '/metric', '/metrics/', '/favicon.ico']) {
    const response = await fetch(`${base}${path}`);
    assert.equal(response.status, 404, path);
    await response.text();
  }
  const post = await fetch(`${base}/metrics`, { method: 'POST' });
  assert.equal(post.status, 405);
  assert.equal(post.headers.get('allow'), 'GET, HEAD');
  await post.text();
  const head = await fetch(`${base}/metrics`, { method: 'HEAD' });
  assert.equal(head.status, 200);
  assert.equal(await head.text(), '');
  assert.ok(valueOf(await scrape(server, '/metrics?x=1'), 'enbd_ring_slots') === 8);
});

test('a busy port is a configuration error; close is idempotent', async () => {
  const blocker = createServer();
  await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
  const address = blocker.address();
  const port = typeof address === 'object' && address !== null ? address.port : 0;
  try {
    await assert.rejects(
      startMetricsServer({ host: '127.0.0.1', port, mirror: fake().mirror, server: fake().server, logger }),
      (error: Error & { code?: string }) => error.code === 'ENBD_ERR_CONFIG' && /--metrics/.test(error.message),
    );
  } finally {
    blocker.close();
  }
  await assert.rejects(startMetricsServer({ host: '127.0.0.1', port: 70000, mirror: fake().mirror, server: fake().server, logger }), OptionError);
  const server = await start(fake());
  await server.close();
  await server.close();
  await assert.rejects(fetch(`http://127.0.0.1:${server.port}/metrics`));
});
