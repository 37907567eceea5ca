/**
 * Names for NBD protocol numbers (commands, options, option reply errors, error values) and
 * the errno mappings: a host errno code to the NBD error value put on the wire, and a wire
 * error value to what the client reports. The numbers themselves live in protocol.ts (pure
 * data); this module is the one place that lists which error values exist.
 * Threads: any (pure functions and frozen tables).
 *
 * Design notes
 * - `errnoNames` is the NBD error list: `isNbdErrno` and `normalizeErrno` read it, so adding an
 *   error value is one line here plus its constant in protocol.ts.
 * - Host codes map like nbdkit's errno translation: EACCES/EROFS are EPERM, EDQUOT/EFBIG are
 *   ENOSPC, EOPNOTSUPP is ENOTSUP, anything unknown is EIO.
 * - Names are for logs and messages only; nothing branches on them.
 *
 * Invariants:
 * - Every value `nbdErrnoFromHostCode` returns is a key of `errnoNames`.
 */
import * as p from './protocol.js';

export const commandNames: Readonly<Record<number, string>> = {
  [p.kCmdRead]: 'READ',
  [p.kCmdWrite]: 'WRITE',
  [p.kCmdDisc]: 'DISC',
  [p.kCmdFlush]: 'FLUSH',
  [p.kCmdTrim]: 'TRIM',
  [p.kCmdCache]: 'CACHE',
  [p.kCmdWriteZeroes]: 'WRITE_ZEROES',
  [p.kCmdBlockStatus]: 'BLOCK_STATUS',
  [p.kCmdResize]: 'RESIZE',
};

export const errnoNames: Readonly<Record<number, string>> = {
  [p.kEPerm]: 'EPERM',
  [p.kEIo]: 'EIO',
  [p.kENoMem]: 'ENOMEM',
  [p.kEInval]: 'EINVAL',
  [p.kENoSpc]: 'ENOSPC',
  [p.kEOverflow]: 'EOVERFLOW',
  [p.kENotSup]: 'ENOTSUP',
  [p.kEShutdown]: 'ESHUTDOWN',
};

const kOptionNames: Readonly<Record<number, string>> = {
  [p.kOptExportName]: 'EXPORT_NAME',
  [p.kOptAbort]: 'ABORT',
  [p.kOptList]: 'LIST',
  [p.kOptStartTls]: 'STARTTLS',
  [p.kOptInfo]: 'INFO',
  [p.kOptGo]: 'GO',
  [p.kOptStructuredReply]: 'STRUCTURED_REPLY',
  [p.kOptListMetaContext]: 'LIST_META_CONTEXT',
  [p.kOptSetMetaContext]: 'SET_META_CONTEXT',
  [p.kOptExtendedHeaders]: 'EXTENDED_HEADERS',
};

const kReplyErrorNames: Readonly<Record<number, string>> = {
  [p.kRepErrUnsup]: 'ERR_UNSUP',
  [p.kRepErrPolicy]: 'ERR_POLICY',
  [p.kRepErrInvalid]: 'ERR_INVALID',
  [p.kRepErrPlatform]: 'ERR_PLATFORM',
  [p.kRepErrTlsReqd]: 'ERR_TLS_REQD',
  [p.kRepErrUnknown]: 'ERR_UNKNOWN',
  [p.kRepErrShutdown]: 'ERR_SHUTDOWN',
  [p.kRepErrBlockSizeReqd]: 'ERR_BLOCK_SIZE_REQD',
  [p.kRepErrTooBig]: 'ERR_TOO_BIG',
};

/** An option's name ('GO'), or `option N` for one without a name. */
export function optionName(option: number): string {
  return kOptionNames[option] ?? `option ${option}`;
}

/** An option reply error's name ('ERR_UNSUP'), or `error 0x...`. */
export function optionReplyErrorName(replyType: number): string {
  return kReplyErrorNames[replyType] ?? `error 0x${replyType.toString(16)}`;
}

/** True for the NBD error values the protocol defines. */
export function isNbdErrno(errno: number): boolean {
  return errnoNames[errno] !== undefined;
}

/** An NBD error value as the client reports it: known values pass, anything else is EINVAL. */
export function normalizeErrno(errno: number): number {
  return isNbdErrno(errno) ? errno : p.kEInval;
}

/** Map a host errno code (from fs or net) to the NBD error value to put on the wire. */
export function nbdErrnoFromHostCode(code: string | undefined): number {
  switch (code) {
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      return p.kEPerm;
    case 'ENOMEM':
      return p.kENoMem;
    case 'EINVAL':
      return p.kEInval;
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return p.kENoSpc;
    case 'EOVERFLOW':
      return p.kEOverflow;
    case 'ENOTSUP':
    case 'EOPNOTSUPP':
      return p.kENotSup;
    case 'ESHUTDOWN':
      return p.kEShutdown;
    default:
      return p.kEIo;
  }
}
