/**
 * Errors with stable codes (undici style): one base class, EnbdError, that every error class
 * in src/ extends, and the one list of codes (EnbdErrorCode; ARCHITECTURE.md "Error codes"
 * tables them). Structured clone drops an Error's class, name and code, so across threads we
 * send `{ code, errno, message }` as plain data (see `toPlainError`) and branch on `code`,
 * never on `instanceof` of a subclass.
 * Threads: any.
 *
 * Design notes
 * - Codes are stable API: the control protocol's answers and `--json` output carry them.
 *   Messages are for people and carry no codes (main.ts prints an EnbdError's message only;
 *   `describeError` adds a host errno code such as ENOENT, never ours).
 * - ENBD_ERR_CONFIG is for what the operator configured (flags, files, sizes at open);
 *   ENBD_ERR_REFUSED for an operator command the running mirror turns down (the last in-sync
 *   leg, a leg already removed). Option errors (OptionError: the ring, the dirty map, and
 *   ENBD_ERR_OPTION for every other API's options) carry the option path in the message
 *   ('ring.slotCount must be ...', 'options.port must be ...'), as the TypeError/RangeError
 *   they replace did.
 * - ENBD_ERR_ASSERT (AssertionError) is a programmer error: code that handles operating
 *   errors by catching EnbdError must rethrow it (`isOperatingError`).
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
  /** A run-time refusal of an operator command (the last in-sync leg, no such leg, ...). */
  | 'ENBD_ERR_REFUSED'
  | 'ENBD_ERR_URI'
  | 'ENBD_ERR_LEG'
  /** On-leg metadata (src/meta): a bad superblock, a leg too small, a refused create. */
  | 'ENBD_ERR_META'
  | 'ENBD_ERR_IO'
  /** Request ring and SPSC queue options (src/ring). */
  | 'ENBD_ERR_RING_OPTION'
  /** Dirty map options and attach checks (src/bitmap). */
  | 'ENBD_ERR_BITMAP_OPTION'
  /**
   * A bad option or argument of a library API: the NBD server's and client's options, the
   * metrics server, the log level, the buffer share, the hash pool, verify (OptionError).
   */
  | 'ENBD_ERR_OPTION'
  /** A failed assertion: a bug (src/core/assert.ts). */
  | 'ENBD_ERR_ASSERT'
  /** The CLI could not get an answer from the daemon's control socket (ControlError). */
  | 'ENBD_ERR_CONTROL'
  /** Checkpoints (changed-block tracking): a bad name, too many, unknown, frozen. */
  | 'ENBD_ERR_CHECKPOINT'
  /** Control socket framing (src/control/frame.ts). */
  | 'ENBD_CTL_FRAME_EMPTY'
  | 'ENBD_CTL_FRAME_TOO_LARGE'
  | 'ENBD_CTL_FRAME_UNDECODABLE'
  | 'ENBD_CTL_FRAME_UNENCODABLE'
  /** Control protocol answers (src/control/protocol.ts kControlErrorCodes). */
  | 'ENBD_CTL_BAD_REQUEST'
  | 'ENBD_CTL_BAD_PARAMS'
  | 'ENBD_CTL_UNKNOWN_METHOD'
  | 'ENBD_CTL_BUSY'
  | 'ENBD_CTL_INTERNAL';

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

/** A bad option value of an API: the ring, the dirty map, or any other (the message names the option path). */
export class OptionError extends EnbdError {
  constructor(code: 'ENBD_ERR_RING_OPTION' | 'ENBD_ERR_BITMAP_OPTION' | 'ENBD_ERR_OPTION', message: string) {
    super(code, message);
    this.name = 'OptionError';
  }
}

/** True for an EnbdError that is an operating error (not a failed assertion). */
export function isOperatingError(error: unknown): error is EnbdError {
  return error instanceof EnbdError && error.code !== 'ENBD_ERR_ASSERT';
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

/**
 * A message for the user: the error's own message, plus a host errno code (ENOENT, ...) when
 * it has one the message does not name. Our own codes are for machines and are left out.
 */
export function describeError(error: unknown): string {
  if (error instanceof EnbdError) return error.message;
  if (error instanceof Error) {
    const code = (error as NodeJS.ErrnoException).code;
    return code !== undefined && !error.message.includes(String(code))
      ? `${error.message} (${String(code)})`
      : error.message;
  }
  return String(error);
}
