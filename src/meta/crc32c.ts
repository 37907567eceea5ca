/**
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of every superblock copy.
 * Written here (a 256-entry table, one byte per step) rather than taken from npm: it is twenty
 * lines, runs only on 4 KiB superblocks (never on the data path), and avoids a native addon.
 * Check value: crc32c("123456789") = 0xE3069283 (tested in test/unit/meta/superblock.test.ts).
 * Threads: any. Allocation: the table once, at module load.
 */

const kPolynomialReflected = 0x82f63b78;

const kTable: Uint32Array = buildTable();

function buildTable(): Uint32Array {
  const table = new Uint32Array(256);
  for (let index = 0; index < 256; index += 1) {
    let value = index;
    for (let bit = 0; bit < 8; bit += 1) value = (value & 1) !== 0 ? (value >>> 1) ^ kPolynomialReflected : value >>> 1;
    table[index] = value >>> 0;
  }
  return table;
}

/** CRC-32C of `bytes[start, end)` as an unsigned 32-bit number. */
export function crc32c(bytes: Uint8Array, start = 0, end = bytes.length): number {
  let crc = 0xffffffff;
  for (let at = start; at < end; at += 1) {
    crc = (kTable[(crc ^ (bytes[at] as number)) & 0xff] as number) ^ (crc >>> 8);
  }
  return (crc ^ 0xffffffff) >>> 0;
}
