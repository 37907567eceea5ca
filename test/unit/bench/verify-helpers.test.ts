/**
 * Pure helpers of the bench's verify measurements (bench/lib/verify.ts): which configurations a
 * quick and a full run measure (one default row, one 16-lane row), the derived figures
 * (anchor and two-readers rates from the mean wall time, ratios, the default config's CPU bound
 * = cores / (enbd system + legs CPU per GiB), the verdict) and the report block's new rows.
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  isDefaultConfig, summarizeVerify, unavailableVerify, verifyBlock, verifyConfigs, type VerifyRun,
} from '../../../bench/lib/verify.js';

const kGiB = 1024 ** 3;

function run(overrides: Partial<VerifyRun>): VerifyRun {
  return {
    threads: 2, algorithm: 'xxh64', lanes: null, wallMs: 2000, bytesPerSec: kGiB / 2,
    enbdCpuSecPerGiB: 1.5, enbdUserSecPerGiB: 0.9, enbdSysSecPerGiB: 0.6, legsCpuSecPerGiB: 1.0,
    mismatchChunks: 0, ratio: null, error: null, ...overrides,
  };
}

test('verifyConfigs: exactly one default row and one 16-lane row of the default, quick and full', () => {
  for (const quick of [true, false]) {
    const configs = verifyConfigs(quick);
    assert.equal(configs.filter(isDefaultConfig).length, 1);
    const lanes = configs.filter((config) => config.lanes !== null);
    assert.deepEqual(lanes, [{ threads: 2, algorithm: 'xxh64', lanes: 16 }]);
    assert.equal(configs.some((config) => config.algorithm === 'blake2b512'), !quick);
  }
});

test('summarizeVerify: rates from mean wall times, ratios to the anchor, CPU bound from sys + legs', () => {
  const results = unavailableVerify(kGiB, 'x');
  results.error = null;
  results.anchor.wallMs.push(400, 600); // mean 500 ms: 2 GiB/s
  results.twoReaders.wallMs.push(800, 1200); // mean 1000 ms: 1 GiB/s
  results.runs.push(run({ threads: 1, bytesPerSec: kGiB }));
  results.runs.push(run({ bytesPerSec: kGiB / 2 }));
  results.runs.push(run({ lanes: 16, bytesPerSec: kGiB, enbdSysSecPerGiB: 0.1, legsCpuSecPerGiB: 0.1 }));
  summarizeVerify(results, { anchorLegCpuSec: [0.4, 0.6], twoReadersLegCpuSec: [1.0], cpus: 2 });
  assert.equal(results.anchor.bytesPerSec, 2 * kGiB);
  assert.ok(Math.abs((results.anchor.cpuSecPerGiB ?? 0) - 0.5) < 1e-9);
  assert.equal(results.twoReaders.bytesPerSec, kGiB);
  assert.equal(results.twoReaders.ratio, 0.5);
  assert.deepEqual(results.twoReaders.ratios.map((ratio) => ratio.toFixed(4)), [(1 / 0.8 / 2).toFixed(4), (1 / 1.2 / 2).toFixed(4)]);
  assert.equal(results.twoReaders.legsCpuSecPerGiB, 1.0);
  assert.deepEqual(results.runs.map((r) => r.ratio), [0.5, 0.25, 0.5]);
  // the default row (2 threads, xxh64, default lanes), not the 16-lane one: 2 / (0.6 + 1.0)
  assert.ok(results.cpuBound !== null);
  assert.equal(results.cpuBound.cpus, 2);
  assert.ok(Math.abs(results.cpuBound.secPerGiB - 1.6) < 1e-9);
  assert.ok(Math.abs(results.cpuBound.bytesPerSec - 1.25 * kGiB) < 1);
  assert.ok(Math.abs((results.cpuBound.ratio ?? 0) - 0.625) < 1e-9);
  assert.equal(results.throughputRatio, 0.25);
  assert.equal(results.twoReadersRatio, 0.5);
  assert.equal(results.met, false);
  const block = verifyBlock(results);
  assert.match(block, /two readers .*1024 MiB\/s 0\.50x of the anchor \(runs 800 ms 0\.63x, 1200 ms 0\.42x\)/);
  assert.match(block, /CPU bound \(default config\): 2 CPUs \/ \(enbd sys \+ legs 1\.60 s\/GiB\) = 1280 MiB\/s, 0\.63x/);
  assert.match(block, /1\.50 \(0\.90 0\.60\)/);
  assert.match(block, /\s16\s+1024 MiB\/s/);
  assert.match(block, /-> 0\.25x, NOT met; 0\.50x of the two readers/);
});

test('summarizeVerify: a failed default row gives no CPU bound and no verdict', () => {
  const results = unavailableVerify(kGiB, 'x');
  results.anchor.wallMs.push(500);
  results.runs.push(run({ error: 'boom', bytesPerSec: 0 }));
  summarizeVerify(results, { anchorLegCpuSec: [0.5], twoReadersLegCpuSec: [], cpus: 2 });
  assert.equal(results.cpuBound, null);
  assert.equal(results.throughputRatio, null);
  assert.equal(results.met, null);
  assert.equal(results.twoReaders.bytesPerSec, null);
  assert.match(verifyBlock(results), /two readers .*: - - of the anchor/);
});
