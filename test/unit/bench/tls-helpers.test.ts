/**
 * Pure helpers of the bench's TLS measurements (bench/lib/tls.ts, lib/fio.ts): the nbds URIs
 * the mirror's legs and fio get, which servers and pairs a quick and a full run measure, the
 * pair ratios (paired per round) and the total CPU per GiB (server plus legs).
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Measurement } from '../../../bench/lib/measure.js';
import type { RowResult } from '../../../bench/lib/results.js';
import {
  kTlsPairs, kTlsServers, kTlsWorkloadNames, nbdkitTlsArgs, selectTls, tlsRatios, tlsUnixUri, totalCpuSecPerGiB,
} from '../../../bench/lib/tls.js';
import { kWorkloads } from '../../../bench/lib/workloads.js';

test('tlsUnixUri: nbds+unix with the socket, tls-certificates only when given', () => {
  assert.equal(tlsUnixUri('/tmp/x/a.sock'), 'nbds+unix:///?socket=/tmp/x/a.sock');
  assert.equal(tlsUnixUri('/tmp/x/a.sock', '/tmp/x/pki'), 'nbds+unix:///?socket=/tmp/x/a.sock&tls-certificates=/tmp/x/pki');
  assert.throws(() => tlsUnixUri('relative.sock'));
  assert.deepEqual(nbdkitTlsArgs('/p'), ['--tls=require', '--tls-certificates=/p']);
});

test('selectTls: quick measures the two issue pairs on four servers; full every pair; pair members always selected', () => {
  const quick = selectTls(true);
  assert.deepEqual(quick.pairs.map((pair) => `${pair.caseName}/${pair.versus}`), [
    'enbd-mirror2-tls-legs/nbdkit-nbd-tls-legs', 'enbd-mirror2-tls-export/nbdkit-memory-tls',
  ]);
  assert.deepEqual(quick.servers.map((server) => server.name),
    ['enbd-mirror2-tls-legs', 'nbdkit-nbd-tls-legs', 'enbd-mirror2-tls-export', 'nbdkit-memory-tls']);
  const full = selectTls(false);
  assert.equal(full.pairs.length, kTlsPairs.length);
  assert.equal(full.servers.length, kTlsServers.length);
  for (const { servers, pairs } of [quick, full]) {
    const names = new Set(servers.map((server) => server.name));
    for (const pair of pairs) {
      assert.ok(names.has(pair.caseName) && names.has(pair.versus), `${pair.caseName} / ${pair.versus}`);
      assert.notEqual(pair.caseName, pair.versus);
    }
  }
  // Every pair of the issue compares like with like: same TLS on the export, same on the legs
  // (the TLS / plain pairs differ on purpose).
  const byName = new Map(kTlsServers.map((server) => [server.name, server]));
  for (const pair of kTlsPairs.filter((entry) => !entry.versus.endsWith('-plain'))) {
    const mine = byName.get(pair.caseName);
    const theirs = byName.get(pair.versus);
    assert.ok(mine !== undefined && theirs !== undefined);
    assert.equal(mine.tlsExport, theirs.tlsExport, pair.caseName);
    if (theirs.kind !== 'nbdkit-memory') assert.equal(mine.tlsLegs, theirs.tlsLegs, pair.caseName);
  }
  for (const name of kTlsWorkloadNames) assert.ok(kWorkloads.some((workload) => workload.name === name), name);
});

function measurement(iops: number, serverCpuSecPerGiB: number, legCpuSecPerGiB?: number): Measurement {
  return {
    iops, bytesPerSec: iops * 4096, ioBytes: 0, clatMeanUs: 1, clatP99Us: 2, fioCpuPercent: 10, runtimeMs: 2000,
    serverCpuPercent: 50, serverCpuSecPerGiB, counters: null,
    ...(legCpuSecPerGiB === undefined ? {} : { legCpuPercent: 20, legCpuSecPerGiB }),
  };
}

function row(caseName: string, workload: string, rounds: Measurement[], error: string | null = null): RowResult {
  return { caseName, workload, error, measurement: error === null ? (rounds[0] ?? null) : null, rounds, spreadPercent: Number.NaN };
}

test('tlsRatios: paired per round, no targets, a failed side gives a null ratio', () => {
  const [pair] = kTlsPairs;
  assert.ok(pair !== undefined);
  const rows = [
    row(pair.caseName, 'randwrite-4k-qd32', [measurement(200, 4), measurement(100, 4), measurement(300, 6)]),
    row(pair.versus, 'randwrite-4k-qd32', [measurement(100, 2), measurement(100, 2), measurement(100, 2)]),
    row(pair.caseName, 'seqwrite-1m-qd8', [measurement(10, 1)]),
    row(pair.versus, 'seqwrite-1m-qd8', [], 'server died'),
  ];
  const ratios = tlsRatios([pair], kTlsWorkloadNames, rows);
  assert.equal(ratios.length, 2);
  const random = ratios.find((ratio) => ratio.workload === 'randwrite-4k-qd32');
  assert.equal(random?.throughputRatio, 2); // median of 2, 1, 3
  assert.equal(random?.cpuPerGiBRatio, 2); // median of 2, 2, 3
  assert.equal(random?.minRatio, null);
  assert.equal(random?.met, null);
  assert.equal(ratios.find((ratio) => ratio.workload === 'seqwrite-1m-qd8')?.throughputRatio, null);
});

test('totalCpuSecPerGiB: server plus legs; a server without legs counts its own CPU only', () => {
  assert.equal(totalCpuSecPerGiB(measurement(1, 1.5, 2.25)), 3.75);
  assert.equal(totalCpuSecPerGiB(measurement(1, 1.5)), 1.5);
  assert.ok(Number.isNaN(totalCpuSecPerGiB(measurement(1, Number.NaN, 1))));
});
