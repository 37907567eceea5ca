/**
 * Meta contexts beyond base:allocation (issue 17): a device may offer more status contexts, e.g.
 * the mirror's checkpoints as `qemu:dirty-bitmap:NAME` and its legs' resync dirty maps as
 * `enbd:dirty:LEG` (one flag each, bit 0 = dirty). This file holds the seam (what the server
 * asks of such a source), the query matching of LIST/SET_META_CONTEXT, and the extents of a
 * chunk map.
 *
 * Thread: main thread (the NBD server and the engine share it). Extents are computed
 * synchronously from in-memory maps.
 *
 * Design notes: query matching (NBD spec "Metadata querying"; qemu's rules for its namespace)
 * | query                          | LIST_META_CONTEXT          | SET_META_CONTEXT           |
 * |--------------------------------|----------------------------|----------------------------|
 * | none                           | every context              | nothing                    |
 * | `ns:` (`qemu:`, `enbd:`)       | every context of ns        | nothing                    |
 * | `qemu:dirty-bitmap:`,          | every context under it     | nothing                    |
 * | `enbd:dirty:` (empty leaf)     |                            |                            |
 * | an exact name                  | that context               | that context               |
 * | anything else                  | ignored                    | ignored                    |
 *
 * Extents (`mapExtents`): runs of equal state in the map, each ending at a chunk boundary
 * (adjacent chunks of the same state are merged), clipped to the asked range, at most
 * `extentsMax` of them; with REQ_ONE the caller keeps the first.
 *
 * Invariants:
 * - The extents cover [offset, offset + covered) without gaps, each of nonzero length.
 * - A context that disappeared after it was selected reports its range dirty (lean toward
 *   changed: a backup copies too much, never too little).
 */
import type { Extent } from '../../core/block-device.js';
import type { DirtyMap } from '../../bitmap/dirty-map.js';

/** What a device offers beyond base:allocation. */
export interface MetaContextSource {
  /** The context names offered now. */
  names(): string[];
  /** The map behind a context, or null when the context is gone. */
  map(name: string): DirtyMap | null;
}

/** The first id given to selected contexts other than base:allocation (which is 1). */
export const kExtraContextIdFirst = 16;
export const kDirtyFlag = 0x1;

/** Contexts (other than base:allocation) the queries select (SET) or list (LIST), in order, deduplicated. */
export function matchMetaContexts(names: readonly string[], queries: readonly string[], isSet: boolean): string[] {
  if (queries.length === 0) return isSet ? [] : [...names];
  const out: string[] = [];
  for (const query of queries) {
    for (const name of names) {
      const prefixMatch = !isSet && query.endsWith(':') && name.startsWith(query);
      if ((name === query || prefixMatch) && !out.includes(name)) out.push(name);
    }
  }
  return out;
}

/** Dirty/clean extents of `map` from `offsetBytes` for `lengthBytes` (clipped to the device). */
export function mapExtents(map: DirtyMap | null, offsetBytes: number, lengthBytes: number, extentsMax: number): Extent[] {
  if (map === null) return [{ lengthBytes, flags: kDirtyFlag }];
  const endBytes = Math.min(offsetBytes + lengthBytes, map.deviceBytes);
  const chunkBytes = map.chunkBytes;
  const limitChunk = Math.ceil(endBytes / chunkBytes);
  const out: Extent[] = [];
  let at = offsetBytes;
  while (at < endBytes && out.length < extentsMax) {
    const chunk = Math.floor(at / chunkBytes);
    const dirty = map.isChunkDirty(chunk);
    const nextChunk = dirty ? map.firstCleanChunk(chunk, limitChunk) : map.firstDirtyChunk(chunk, limitChunk);
    const next = Math.min(endBytes, nextChunk * chunkBytes);
    out.push({ lengthBytes: next - at, flags: dirty ? kDirtyFlag : 0 });
    at = next;
  }
  if (out.length === 0) out.push({ lengthBytes, flags: 0 });
  return out;
}
