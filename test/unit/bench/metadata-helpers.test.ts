/**
 * Pure helpers of the bench's on-leg metadata measurements (bench/lib/metadata.ts, lib/fio.ts):
 * the leg size that holds a region at a chunk (smallest such, checked against the layout), and
 * the fio options the cold and warm steps rely on (random map kept, one pass, region offset).
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fioArgs } from '../../../bench/lib/fio.js';
import { legBytesFor } from '../../../bench/lib/metadata.js';
import { kWorkloads } from '../../../bench/lib/workloads.js';
import { computeLayout, defaultBitmapChunkBytes } from '../../../src/meta/layout.js';

const KiB = 1024;
const MiB = 1024 * KiB;

test('legBytesFor: the data area holds the region, one chunk less would not', () => {
  for (const region of [16 * MiB, 256 * MiB, 512 * MiB, 1024 * MiB]) {
    for (const chunk of [undefined, 4 * KiB, 256 * KiB, MiB]) {
      const legBytes = legBytesFor(region, chunk);
      const used = chunk ?? defaultBitmapChunkBytes(legBytes);
      assert.ok(computeLayout(legBytes, used).dataSizeBytes >= region, `region ${region} chunk ${String(chunk)}`);
      if (legBytes > region) {
        const smaller = legBytes - used;
        const fits = computeLayout(smaller, chunk ?? defaultBitmapChunkBytes(smaller)).dataSizeBytes >= region;
        assert.equal(fits, false, `region ${region} chunk ${String(chunk)}: ${smaller} would do`);
      }
    }
  }
  // The metadata takes room: a leg exactly the region's size never holds the region.
  assert.ok(legBytesFor(256 * MiB) > 256 * MiB);
});

test('fioArgs: random map, one pass and offset only when asked', () => {
  const randwrite = kWorkloads.find((workload) => workload.name === 'randwrite-4k-qd32');
  assert.ok(randwrite !== undefined);
  const base = { uri: 'nbd+unix:///?socket=/x', runtimeSec: 2, rampSec: 1, sizeBytes: 256 * MiB, outputPath: '/tmp/x.json' };
  const plain = fioArgs(randwrite, base);
  assert.ok(plain.includes('--norandommap') && plain.includes('--time_based'));
  assert.ok(!plain.some((arg) => arg.startsWith('--offset=')));
  const cold = fioArgs(randwrite, { ...base, randomMap: true, timeBased: false, offsetBytes: 256 * MiB });
  assert.ok(!cold.includes('--norandommap') && !cold.includes('--time_based'));
  assert.ok(cold.includes('--randrepeat=0'));
  assert.ok(cold.includes(`--offset=${256 * MiB}`) && cold.includes(`--size=${256 * MiB}`));
});
