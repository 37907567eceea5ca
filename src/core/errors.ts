/**
 * Error classes with stable codes (undici style). Structured clone drops an Error's class,
 * name and code, so across threads we send `{ code, errno, message }` as plain data
 * (see `toPlainError`) and branch on `code`, never on `instanceof`.
 * Threads: any.
 */

export type EnbdErrorCode =
  | 'ENBD_ERR_HANDSHAKE'
  | 'ENBD_ERR_PROTOCOL'
  | 'ENBD_ERR_TIMEOUT'
  | 'ENBD_ERR_CONNECT'
  | 'ENBD_ERR_CLOSED'
  | 'ENBD_ERR_NBD_REPLY'
  | 'ENBD_ERR_CONFIG'
  /** A bad flag or config value: the CLI exits 2 (a usage error, as commander's own). */
  | 'ENBD_ERR_USAGE'
  | 'ENBD_ERR_URI'
  | 'ENBD_ERR_LEG'
  /** On-leg metadata (src/meta): a bad superblock, a leg too small, a refused create. */
  | 'ENBD_ERR_META'
  | 'ENBD_ERR_IO';

export class EnbdError extends Error {
  readonly code: EnbdErrorCode;
  /** NBD errno (protocol value, e.g. 5 for EIO) when the failure maps to one. */
  readonly errno: number;
  constructor(code: EnbdErrorCode, message: string, errno = 0, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'EnbdError';
    this.code = code;
    this.errno = errno;
  }
}

export interface PlainError {
  code: string;
  errno: number;
  message: string;
}

export function toPlainError(error: unknown): PlainError {
  if (error instanceof EnbdError) {
    return { code: error.code, errno: error.errno, message: error.message };
  }
  if (error instanceof Error) {
    const code = (error as NodeJS.ErrnoException).code;
    return { code: typeof code === 'string' ? code : 'ERR_UNKNOWN', errno: 0, message: error.message };
  }
  return { code: 'ERR_UNKNOWN', errno: 0, message: String(error) };
}

/** A message for the user: the error's own message plus its code when it has one. */
export function describeError(error: unknown): string {
  if (error instanceof Error) {
    const code = (error as NodeJS.ErrnoException).code;
    return code !== undefined && !error.message.includes(String(code))
      ? `${error.message} (${String(code)})`
      : error.message;
  }
  return String(error);
}
