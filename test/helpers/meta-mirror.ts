/**
 * An inline fault mirror over FaultStores with on-leg metadata, and readers of what the stores
 * durably hold (superblock, bitmap), for the metadata keeper's tests
 * (test/unit/engine/meta-keeper*.test.ts).
 *
 * Thread: test main thread.
 */
import { assembleArray } from '../../src/meta/assemble.js';
import { createArray } from '../../src/meta/create-array.js';
import { superblockOffsets, type LegLayout } from '../../src/meta/layout.js';
import { LegMeta, bitmapTest, inspectCopy } from '../../src/meta/leg-meta.js';
import type { Superblock } from '../../src/meta/superblock.js';
import type { MirrorDevice, MirrorOptions } from '../../src/engine/mirror.js';
import * as p from '../../src/nbd/protocol.js';
import { openFaultMirror, type FaultMirror, type FaultMirrorTuning, type FaultStore } from './fault-device.js';

/** The write-intent bitmap's chunk in these tests. */
export const kMetaChunkBytes = 64 * 1024;

export interface MetaMirror {
  fm: FaultMirror;
  mirror: MirrorDevice;
  stores: FaultStore[];
  layout: LegLayout;
}

export interface MetaMirrorOptions {
  /** Engine tuning (e.g. long leg timeouts while metadata requests are held on purpose). */
  tuning?: FaultMirrorTuning;
  /** Stores the mirror can open later (leg add), not members of the array. */
  extraStores?: FaultStore[];
  /** More mirror options (e.g. `verify`). */
  extra?: Partial<MirrorOptions>;
}

/** createArray (--assume-clean) and assembleArray on the stores, then an inline mirror with the metadata. */
export async function openMetaMirror(stores: FaultStore[], heartbeatMs: number, options: MetaMirrorOptions = {}): Promise<MetaMirror> {
  const created = await Promise.all(stores.map(async (store) => await store.connect(0)));
  await createArray(stores.map((store, index) => ({ uri: store.name, meta: new LegMeta(created[index] as NonNullable<(typeof created)[number]>) })), {
    name: 'keeper-test', assumeClean: true, force: false, bitmapChunkBytes: kMetaChunkBytes,
  });
  await Promise.all(created.map(async (device) => await device.close()));
  const devices = await Promise.all(stores.map(async (store) => await store.connect(0)));
  const assembled = await assembleArray(stores.map((store) => store.name), devices, { forceSource: null, degraded: false });
  const fm = await openFaultMirror([...stores, ...(options.extraStores ?? [])], options.tuning ?? {}, { ...(options.extra ?? {}), metadata: assembled, heartbeatMs, legs: stores.map((store) => store.name) });
  return { fm, mirror: fm.mirror, stores, layout: assembled.plan.layout };
}

/** The newest valid superblock on the store's bytes (`durable`: as of its last flush/FUA). */
export function superblockOf(store: FaultStore, durable = false): Superblock | null {
  const bytes = durable ? store.durable : store.bytes;
  const offsets = superblockOffsets(store.sizeBytes);
  const copies = offsets.map((offset, copy) => inspectCopy(copy, offset, bytes.slice(offset, offset + 4096))).filter((copy) => copy.status === 'valid');
  copies.sort((a, b) => (b.sequence ?? 0) - (a.sequence ?? 0));
  return copies[0]?.superblock ?? null;
}

export function bitmapOf(store: FaultStore, layout: LegLayout, durable = false): Uint8Array {
  const bytes = durable ? store.durable : store.bytes;
  return bytes.slice(layout.bitmapOffsetBytes, layout.bitmapOffsetBytes + layout.bitmapBytes);
}

/** The chunks whose bit is set in `bitmap`. */
export function setBits(bitmap: Uint8Array, layout: LegLayout): number[] {
  const bits: number[] = [];
  for (let chunk = 0; chunk < layout.chunkCount; chunk += 1) if (bitmapTest(bitmap, chunk)) bits.push(chunk);
  return bits;
}

/** Deterministic bytes for `seed`. */
export function pattern(seed: number, length: number): Uint8Array {
  const data = new Uint8Array(length);
  let x = (seed * 2654435761) >>> 0;
  for (let index = 0; index < length; index += 1) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    data[index] = x >>> 24;
  }
  return data;
}

export function isBitmapPageWrite(request: { command: number; offsetBytes: number }, layout: LegLayout): boolean {
  return request.command === p.kCmdWrite && request.offsetBytes >= layout.bitmapOffsetBytes && request.offsetBytes < layout.bitmapOffsetBytes + layout.bitmapAreaBytes;
}
