/**
 * NbdClient's Promise API bookkeeping: requests made by read/write/flush/trim/writeZeroes/
 * cache/getExtents (resync, tools and tests use them; the mirror's hot path does not).
 * Threads: the NbdClient's thread.
 *
 * Design notes
 * - Each Promise request gets an internal id (1 .. MAX_SAFE_INTEGER, wrapping) that is its
 *   token in the client's request table, with the `internal` mark set in its slot, so its
 *   completion comes here and never reaches the BlockDevice completion handler (ids cannot
 *   clash with caller tokens).
 * - A request longer than one piece is split into pieces issued all at once; the call settles
 *   when every piece did and rejects with the first failure (after all settled).
 * - A failed request rejects with ENBD_ERR_NBD_REPLY carrying the NBD errno, the operation,
 *   the range and, when the connection failed, why.
 * - BLOCK_STATUS: the reply parser hands the extents to the request (`get(id).extents`).
 *
 * Invariants:
 * - Every registered request is completed exactly once (the client completes every slot).
 */
import { assert } from '../../core/assert.js';
import { EnbdError } from '../../core/errors.js';
import type { Extent } from '../../core/block-device.js';
import { commandNames, errnoNames } from '../protocol-names.js';

export interface InternalRequest {
  command: number;
  offsetBytes: number;
  lengthBytes: number;
  resolve: () => void;
  reject: (error: EnbdError) => void;
  extents: Extent[] | null;
}

/** Submits an internal request with `id` as its token (the client's submit path). */
export type InternalSubmit = (
  command: number,
  flags: number,
  offsetBytes: number,
  lengthBytes: number,
  data: Uint8Array | null,
  id: number,
) => void;

export class PromiseRequests {
  private readonly requests = new Map<number, InternalRequest>();
  private nextId = 1;

  constructor(private readonly submit: InternalSubmit) {}

  /** The id the next `request` will use. */
  get upcomingId(): number {
    return this.nextId;
  }

  get(id: number): InternalRequest | undefined {
    return this.requests.get(id);
  }

  request(
    command: number,
    flags: number,
    offsetBytes: number,
    lengthBytes: number,
    data: Uint8Array | null,
  ): Promise<void> {
    const id = this.nextId;
    this.nextId = id >= Number.MAX_SAFE_INTEGER ? 1 : id + 1;
    return new Promise<void>((resolve, reject) => {
      const request = { command, offsetBytes, lengthBytes, resolve, reject, extents: null };
      this.requests.set(id, request);
      this.submit(command, flags, offsetBytes, lengthBytes, data, id);
    });
  }

  /** Request `id` completed with `errno`; `reason` is why the connection failed, if it did. */
  complete(id: number, errno: number, reason: EnbdError | null): void {
    const request = this.requests.get(id);
    assert(request !== undefined, 'internal request is known');
    this.requests.delete(id);
    if (errno === 0) {
      request.resolve();
      return;
    }
    const name = errnoNames[errno] ?? `errno ${errno}`;
    const operation = commandNames[request.command] ?? 'request';
    const what = `${operation} at ${request.offsetBytes}+${request.lengthBytes}`;
    const why = reason === null ? '' : ` (${reason.message})`;
    request.reject(new EnbdError('ENBD_ERR_NBD_REPLY', `${what} failed: ${name}${why}`, errno));
  }

  /** Issue one request per piece of at most `pieceBytes`, all at once; resolve when all did. */
  async pieces(
    command: number,
    flags: number,
    offsetBytes: number,
    lengthBytes: number,
    pieceBytes: number,
    data: Uint8Array | null,
  ): Promise<void> {
    if (lengthBytes <= pieceBytes) {
      await this.request(command, flags, offsetBytes, lengthBytes, data);
      return;
    }
    const requests: Promise<void>[] = [];
    for (let doneBytes = 0; doneBytes < lengthBytes; doneBytes += pieceBytes) {
      const countBytes = Math.min(pieceBytes, lengthBytes - doneBytes);
      const view = data === null ? null : data.subarray(doneBytes, doneBytes + countBytes);
      requests.push(this.request(command, flags, offsetBytes + doneBytes, countBytes, view));
    }
    const results = await Promise.allSettled(requests);
    for (const result of results) if (result.status === 'rejected') throw result.reason;
  }
}
