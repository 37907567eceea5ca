/**
 * `--metrics`: the Prometheus endpoint of a real mirror. An in-process mirror over two
 * `nbdkit memory 64M` legs (actors on workers), startMetricsServer on 127.0.0.1:0, real I/O
 * through the export with NbdClient, then scrapes with fetch: the request counters, latency
 * histogram, bytes, ring, connection and leg series carry at least what was sent; after a leg
 * is failed by hand and written past, its dirty bytes grow and its state series says failed.
 * Threads: test process main thread; the legs are nbdkit child processes.
 */
import { after, before, describe, test } from 'node:test';
import { kVersion } from '../../src/core/version.js';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createLogger } from '../../src/core/log.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { startMetricsServer, type MetricsServer } from '../../src/metrics/metrics.js';
import { freePort, scratch, startNbdkit, unixUri, type Child, type Scratch } from '../helpers/tools.js';
import { skipUnlessTools } from '../helpers/serve.js';
import { startInProcessMirror, startMirror, stopAllMirrors, type InProcessMirror } from '../helpers/mirror.js';
import { checkHistogram, parseExposition, samplesOf, valueOf, type Exposition } from '../unit/metrics/exposition.js';

const kMiB = 1024 * 1024;
const kLegBytes = 64 * kMiB;
const kWriteBytes = 64 * 1024;
const kWriteCount = 32;
const kReadCount = 8;

describe('enbd mirror --metrics: Prometheus series of a real mirror', { skip: skipUnlessTools('nbdkit') }, () => {
  let dir: Scratch;
  const legs: Child[] = [];
  let mirror: InProcessMirror;
  let metrics: MetricsServer;
  let client: NbdClient | null = null;

  async function scrape(path = '/metrics'): Promise<Exposition> {
    const response = await fetch(`http://127.0.0.1:${metrics.port}${path}`);
    assert.equal(response.status, 200, `GET ${path}`);
    return parseExposition(await response.text());
  }

  before(async () => {
    dir = scratch('enbd-metrics-');
    for (const index of [0, 1]) legs.push(await startNbdkit(dir.path(`leg${index}.sock`), ['memory', '64M']));
    mirror = await startInProcessMirror({ legs: [0, 1].map((index) => unixUri(dir.path(`leg${index}.sock`))), socketPath: dir.path('enbd.sock') });
    const logger = createLogger({ level: 'silent', pretty: false });
    metrics = await startMetricsServer({ host: '127.0.0.1', port: 0, mirror: mirror.device, server: mirror.server, logger });
    client = await NbdClient.connect(mirror.uri);
    for (let index = 0; index < kWriteCount; index += 1) await client.write(index * kWriteBytes, randomBytes(kWriteBytes));
    for (let index = 0; index < kReadCount; index += 1) await client.read(index * kWriteBytes, kWriteBytes);
    await client.flush();
  });

  after(async () => {
    await metrics?.close();
    await client?.close();
    await stopAllMirrors();
    await Promise.all(legs.map(async (leg) => await leg.stop('SIGKILL')));
    dir?.cleanup();
  });

  test('request counters and bytes cover what the client sent', async () => {
    const scraped = await scrape();
    assert.equal(scraped.types.get('enbd_requests_total'), 'counter');
    assert.ok(valueOf(scraped, 'enbd_requests_total', { op: 'write' }) >= kWriteCount);
    assert.ok(valueOf(scraped, 'enbd_requests_total', { op: 'read' }) >= kReadCount);
    assert.ok(valueOf(scraped, 'enbd_requests_total', { op: 'flush' }) >= 1);
    assert.ok(valueOf(scraped, 'enbd_write_requests_total') >= kWriteCount);
    assert.ok(valueOf(scraped, 'enbd_write_payload_copied_bytes_total') >= kWriteCount * kWriteBytes);
    assert.equal(valueOf(scraped, 'enbd_write_payload_copies_per_request'), 1, 'shared copy mode: one copy per write');
    const received = samplesOf(scraped, 'enbd_server_write_payload_bytes_total').reduce((sum, sample) => sum + sample.value, 0);
    assert.ok(received >= kWriteCount * kWriteBytes, `server received ${received} payload bytes`);
    for (const leg of ['0', '1']) {
      assert.ok(valueOf(scraped, 'enbd_leg_written_bytes_total', { leg }) >= kWriteCount * kWriteBytes, `leg ${leg} bytes written`);
      assert.ok(valueOf(scraped, 'enbd_leg_requests_total', { leg }) >= kWriteCount + 1, `leg ${leg} requests`);
      assert.equal(valueOf(scraped, 'enbd_leg_errors_total', { leg }), 0);
      assert.equal(valueOf(scraped, 'enbd_leg_connected', { leg }), 1);
      assert.ok(valueOf(scraped, 'enbd_leg_completed_requests_total', { leg }) >= kWriteCount + 1);
      assert.ok(valueOf(scraped, 'enbd_leg_request_seconds_total', { leg }) > 0);
    }
    const read = samplesOf(scraped, 'enbd_leg_read_bytes_total').reduce((sum, sample) => sum + sample.value, 0);
    assert.ok(read >= kReadCount * kWriteBytes, `legs served ${read} bytes of reads`);
    assert.equal(valueOf(scraped, 'enbd_leg_stats_up'), 1);
    assert.equal(valueOf(scraped, 'enbd_export_size_bytes'), kLegBytes);
  });

  test('the latency histogram counts every write, cumulative buckets ending in +Inf', async () => {
    const scraped = await scrape();
    checkHistogram(scraped, 'enbd_request_duration_seconds', { op: 'write' });
    checkHistogram(scraped, 'enbd_request_duration_seconds', { op: 'read' });
    assert.ok(valueOf(scraped, 'enbd_request_duration_seconds_count', { op: 'write' }) >= kWriteCount);
    assert.ok(valueOf(scraped, 'enbd_request_duration_seconds_count', { op: 'read' }) >= kReadCount);
    assert.ok(valueOf(scraped, 'enbd_request_duration_seconds_sum', { op: 'write' }) > 0);
  });

  test('ring, in-flight and connection gauges, and the default process metrics', async () => {
    const scraped = await scrape();
    const ring = mirror.device.ringCounters();
    assert.equal(valueOf(scraped, 'enbd_ring_slots'), ring.slotCount);
    assert.equal(valueOf(scraped, 'enbd_ring_slot_bytes'), ring.slotBytes);
    const inUse = valueOf(scraped, 'enbd_ring_slots_in_use');
    assert.ok(inUse >= 0 && inUse <= ring.slotCount);
    assert.equal(valueOf(scraped, 'enbd_in_flight_requests'), 0, 'the client waits for each request');
    assert.equal(valueOf(scraped, 'enbd_client_connections'), 1);
    assert.equal(scraped.types.get('process_cpu_user_seconds_total'), 'counter');
    assert.ok(samplesOf(scraped, 'nodejs_heap_size_used_bytes').length === 1);
  });

  test('legs in sync: no dirty bytes, state in-sync', async () => {
    const scraped = await scrape();
    for (const leg of ['0', '1']) {
      assert.equal(valueOf(scraped, 'enbd_leg_dirty_bytes', { leg }), 0);
      assert.equal(valueOf(scraped, 'enbd_leg_state', { leg, state: 'in-sync' }), 1);
      assert.equal(valueOf(scraped, 'enbd_leg_state', { leg, state: 'failed' }), 0);
      assert.equal(valueOf(scraped, 'enbd_leg_resync_active', { leg }), 0);
      assert.equal(valueOf(scraped, 'enbd_leg_info', { leg }), 1);
      assert.equal(valueOf(scraped, 'enbd_leg_failures_total', { leg }), 0);
    }
    assert.equal(scraped.types.get('enbd_leg_failures_total'), 'counter');
    assert.equal(scraped.types.get('enbd_leg_resynced_bytes_total'), 'counter');
    assert.equal(scraped.types.get('enbd_leg_reconnects_total'), 'counter');
    assert.equal(valueOf(scraped, 'enbd_mirror_state', { state: 'in-sync' }), 1);
    assert.equal(valueOf(scraped, 'enbd_mirror_state', { state: 'degraded' }), 0);
    assert.equal(valueOf(scraped, 'enbd_mirror_legs', { state: 'in-sync' }), 2);
    assert.equal(valueOf(scraped, 'enbd_mirror_legs_expected'), 2);
    assert.equal(valueOf(scraped, 'enbd_build_info', { version: kVersion, node: process.versions.node }), 1);
  });

  test('a leg failed by hand shows failed and collects dirty bytes as writes go past it', async () => {
    assert.ok(client !== null);
    mirror.device.failLegByHand(1);
    for (let index = 0; index < 4; index += 1) await client.write(kMiB + index * kWriteBytes, randomBytes(kWriteBytes));
    const scraped = await scrape();
    assert.ok(valueOf(scraped, 'enbd_leg_dirty_bytes', { leg: '1' }) >= 4 * kWriteBytes, 'missed writes are dirty');
    assert.equal(valueOf(scraped, 'enbd_leg_dirty_bytes', { leg: '0' }), 0);
    assert.equal(valueOf(scraped, 'enbd_leg_state', { leg: '1', state: 'failed' }), 1);
    assert.equal(valueOf(scraped, 'enbd_leg_state', { leg: '1', state: 'in-sync' }), 0);
    assert.equal(valueOf(scraped, 'enbd_leg_state', { leg: '0', state: 'in-sync' }), 1);
    assert.equal(valueOf(scraped, 'enbd_leg_failures_total', { leg: '1' }), 1);
    assert.equal(valueOf(scraped, 'enbd_mirror_state', { state: 'degraded' }), 1);
    assert.equal(valueOf(scraped, 'enbd_mirror_state', { state: 'in-sync' }), 0);
    assert.equal(valueOf(scraped, 'enbd_mirror_legs', { state: 'failed' }), 1);
  });

  test('the connections gauge drops when the client leaves', async () => {
    await client?.close();
    client = null;
    let connections = -1;
    for (let round = 0; round < 100 && connections !== 0; round += 1) {
      connections = valueOf(await scrape(), 'enbd_client_connections');
      if (connections !== 0) await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.equal(connections, 0);
  });

  test('other paths are 404', async () => {
    for (const path of ['/', '/nope', '/metrics/extra']) {
      const response = await fetch(`http://127.0.0.1:${metrics.port}${path}`);
      assert.equal(response.status, 404, path);
      await response.text();
    }
  });
});

describe('enbd mirror --metrics on the command line', { skip: skipUnlessTools('nbdkit') }, () => {
  test('the daemon serves /metrics on the given port and stops it on SIGTERM', async () => {
    const dir = scratch('enbd-metrics-cli-');
    const legs: Child[] = [];
    try {
      const uris: string[] = [];
      for (const index of [0, 1]) {
        const socket = dir.path(`leg${index}.sock`);
        legs.push(await startNbdkit(socket, ['memory', '16M']));
        uris.push(unixUri(socket));
      }
      const port = await freePort();
      const mirror = await startMirror({ legs: uris, socketPath: dir.path('m.sock'), args: ['--metrics', `127.0.0.1:${port}`] });
      const client = await NbdClient.connect(mirror.uri);
      await client.write(0, randomBytes(65536));
      await client.close();
      const response = await fetch(`http://127.0.0.1:${port}/metrics`);
      assert.equal(response.status, 200);
      const text = await response.text();
      assert.match(text, /^enbd_requests_total\{op="write"\} [1-9]/m);
      assert.match(text, /^enbd_leg_state\{leg="1",state="in-sync"\} 1$/m);
      assert.equal(await mirror.stop(), 0);
      await assert.rejects(fetch(`http://127.0.0.1:${port}/metrics`));
    } finally {
      await stopAllMirrors();
      await Promise.all(legs.map(async (leg) => await leg.stop('SIGKILL')));
      dir.cleanup();
    }
  });
});
