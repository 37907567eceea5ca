/**
 * One predicate that decides whether a transmission request may reach the device, and the NBD
 * error it gets otherwise (nbdkit's validate_request is the model). Pure: no I/O, no
 * allocation. Thread: main thread (session master), once per request.
 *
 * Order of checks (first failure wins):
 * | check                                     | error     |
 * |-------------------------------------------|-----------|
 * | write-ish command on a read-only export    | EPERM     |
 * | command unknown or not advertised          | EINVAL    |
 * | flag unknown or not valid for the command  | EINVAL    |
 * | BLOCK_STATUS without a selected context    | EINVAL    |
 * | READ longer than the maximum payload       | EOVERFLOW |
 * | WRITE longer than the maximum payload      | EINVAL    |
 * | WRITE / WRITE_ZEROES past the end          | ENOSPC    |
 * | READ / TRIM / CACHE / BLOCK_STATUS past end | EINVAL    |
 * | FAST_ZERO the device cannot do fast        | ENOTSUP   |
 */
import * as p from '../protocol.js';

export interface ValidationContext {
  sizeBytes: number;
  transmissionFlags: number;
  maximumPayloadBytes: number;
  structuredReplies: boolean;
  metaContextSelected: boolean;
  /** Device can honour FAST_ZERO (otherwise such requests fail fast with ENOTSUP). */
  fastZero: boolean;
}

const kAllowedFlags: readonly number[] = (() => {
  const allowed: number[] = [];
  allowed[p.kCmdRead] = p.kCmdFlagFua | p.kCmdFlagDf;
  allowed[p.kCmdWrite] = p.kCmdFlagFua;
  allowed[p.kCmdDisc] = p.kCmdFlagFua;
  allowed[p.kCmdFlush] = p.kCmdFlagFua;
  allowed[p.kCmdTrim] = p.kCmdFlagFua;
  allowed[p.kCmdCache] = p.kCmdFlagFua;
  allowed[p.kCmdWriteZeroes] = p.kCmdFlagFua | p.kCmdFlagNoHole | p.kCmdFlagFastZero;
  allowed[p.kCmdBlockStatus] = p.kCmdFlagFua | p.kCmdFlagReqOne;
  return allowed;
})();

function commandAdvertised(command: number, flags: number): boolean {
  switch (command) {
    case p.kCmdRead:
    case p.kCmdWrite:
    case p.kCmdDisc:
    case p.kCmdBlockStatus:
      return true;
    case p.kCmdFlush:
      return (flags & p.kTxFlagSendFlush) !== 0;
    case p.kCmdTrim:
      return (flags & p.kTxFlagSendTrim) !== 0;
    case p.kCmdCache:
      // Some clients send CACHE unadvertised; it is a harmless hint, so accept it.
      return true;
    case p.kCmdWriteZeroes:
      return (flags & p.kTxFlagSendWriteZeroes) !== 0;
    default:
      return false;
  }
}

function writesData(command: number): boolean {
  return command === p.kCmdWrite || command === p.kCmdTrim || command === p.kCmdWriteZeroes;
}

/**
 * Returns 0 when the request may go to the device, else the NBD error value to reply with.
 * `offsetBytes` may be any non-negative number (an offset >= 2^53 arrives as Infinity-safe
 * large value and is simply out of range).
 */
export function validateRequest(
  context: ValidationContext,
  command: number,
  flags: number,
  offsetBytes: number,
  lengthBytes: number,
): number {
  const exportFlags = context.transmissionFlags;
  const readOnly = (exportFlags & p.kTxFlagReadOnly) !== 0;
  if (readOnly && writesData(command)) return p.kEPerm;
  if (!commandAdvertised(command, exportFlags)) return p.kEInval;
  const allowed = kAllowedFlags[command] ?? 0;
  if ((flags & ~allowed) !== 0) return p.kEInval;
  if ((flags & p.kCmdFlagDf) !== 0 && !context.structuredReplies) return p.kEInval;
  if ((flags & p.kCmdFlagFastZero) !== 0 && (exportFlags & p.kTxFlagSendFastZero) === 0) {
    return p.kEInval;
  }
  if (command === p.kCmdBlockStatus && !(context.structuredReplies && context.metaContextSelected)) {
    return p.kEInval;
  }
  if (command === p.kCmdFlush || command === p.kCmdDisc) return 0;
  if (command === p.kCmdRead && lengthBytes > context.maximumPayloadBytes) return p.kEOverflow;
  if (command === p.kCmdWrite && lengthBytes > context.maximumPayloadBytes) return p.kEInval;
  const pastEnd = offsetBytes > context.sizeBytes || lengthBytes > context.sizeBytes - offsetBytes;
  if (pastEnd) {
    return command === p.kCmdWrite || command === p.kCmdWriteZeroes ? p.kENoSpc : p.kEInval;
  }
  if ((flags & p.kCmdFlagFastZero) !== 0 && !context.fastZero) return p.kENotSup;
  return 0;
}
