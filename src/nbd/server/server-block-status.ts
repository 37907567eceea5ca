/**
 * NBD server, NBD_CMD_BLOCK_STATUS: asks the device for base:allocation extents and clips
 * them to what one reply chunk may carry.
 *
 * Thread: main thread (session master).
 *
 * Design notes
 * BLOCK_STATUS is not a hot path (one Promise and two small arrays per request are fine). A
 * device without block status answers one data extent for the asked range. Extents are cut
 * to at most kExtentBytesMax each (u32, block aligned) and kExtentsMax per reply; with
 * NBD_CMD_FLAG_REQ_ONE only the first is sent. Only the HOLE and ZERO bits are passed on (other
 * contexts, src/nbd/server/meta-contexts.ts, pass their own mask).
 * The asked length is clipped to the export's end and is at least 1 (an offset at or past the
 * end is refused with EINVAL by the caller before asking).
 *
 * Invariants:
 * - The clipped lengths are positive and sum to at most `askedBytes`; at least one is given.
 */
import type { BlockDevice, Extent } from '../../core/block-device.js';
import * as p from '../protocol.js';

export const kExtentsMax = 65536;
const kExtentBytesMax = 0xffff_f000;

/** Bytes a BLOCK_STATUS at `offset` for `length` asks about (`offset` inside the export). */
export function blockStatusAskedBytes(offset: number, length: number, sizeBytes: number): number {
  return Math.max(1, Math.min(length, sizeBytes - offset));
}

/** The device's extents for the range, or one data extent when it has no block status. */
export function deviceExtents(device: BlockDevice, offset: number, askedBytes: number): Promise<Extent[]> {
  return device.features.blockStatus
    ? device.getExtents(offset, askedBytes)
    : Promise.resolve<Extent[]>([{ lengthBytes: askedBytes, flags: 0 }]);
}

/** The extents one reply carries: `lengths`/`flags` filled (both empty on entry). */
export function clipExtents(
  extents: Extent[],
  askedBytes: number,
  reqOne: boolean,
  lengths: number[],
  flags: number[],
  flagMask: number = p.kStateHole | p.kStateZero,
): void {
  let covered = 0;
  for (const extent of extents) {
    let remaining = Math.min(extent.lengthBytes, askedBytes - covered);
    while (remaining > 0 && lengths.length < kExtentsMax) {
      const piece = Math.min(remaining, kExtentBytesMax);
      lengths.push(piece);
      flags.push(extent.flags & flagMask);
      covered += piece;
      remaining -= piece;
    }
    if (covered >= askedBytes || lengths.length >= kExtentsMax || (reqOne && lengths.length > 0)) break;
  }
  if (lengths.length === 0) {
    lengths.push(askedBytes);
    flags.push(0);
  }
}
