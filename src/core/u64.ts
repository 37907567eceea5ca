/**
 * 64-bit integers as two u32 halves: NBD offsets and sizes on the wire, ring slot offsets,
 * superblock sequence numbers. JavaScript numbers hold integers exactly up to 2^53, so a u64
 * that fits is `high * kTwoPow32 + low`, and splits as `Math.floor(value / kTwoPow32)` and
 * `value % kTwoPow32`. Constants only (no logic), imported by ring/, nbd/ and meta/.
 * Thread: any.
 */

/** 2^32: the weight of the high u32 half of a u64. */
export const kTwoPow32 = 0x1_0000_0000;
