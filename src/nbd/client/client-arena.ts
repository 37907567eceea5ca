/**
 * Ring arena for outgoing 28-byte NBD request headers, so that the client's send path
 * allocates nothing per request. Headers are appended at `head`; consecutive headers form a
 * "run" that is handed to the sink (the socket) as one view; a run's bytes are reused only
 * after the sink reports that run written (`releaseRun`, called in write order).
 * Threads: the NbdClient's thread only.
 *
 * Layout (bytes in use are those handed to the sink and not yet released, plus the pending run):
 *
 *   not wrapped:  [ free | in use: tail .. head | free ]       free space: end, then [0, tail)
 *   wrapped:      [ in use: 0 .. head | free: head .. tail | in use: tail .. gap | gap ]
 *
 * head === tail means empty when not wrapped and full when wrapped. Wrapping first flushes the
 * pending run (a run never spans the end). A run end at or below `tail` while wrapped can only
 * be a post-wrap run: every pre-wrap run ends above `tail`. When the arena is empty it restarts
 * at 0. When full, `reserve` returns -1 and the caller writes that header from its own buffer.
 *
 * A run of one header (the common case before a WRITE payload, which splits the run) is handed
 * over as a view cached per header position (headers sit at multiples of 28 bytes), created on
 * first use and kept: a steady stream of WRITEs creates no view per request.
 *
 * Invariants:
 * - Bytes of a run handed to the sink are not handed out again before that run is released.
 * - runEndsCount <= capacity / kRequestHeaderBytes + 1.
 */
import { assert } from '../../core/assert.js';
import { kRequestHeaderBytes } from '../protocol.js';

export interface RunSink {
  /** Write `view` (arena bytes) and call `releaseRun` on the arena once it has been written. */
  writeRun(view: Buffer): void;
}

export class HeaderArena {
  readonly buffer: Buffer;
  private head = 0;
  private runStart = 0;
  private tail = 0;
  private wrapped = false;
  private readonly runEnds: Int32Array;
  private runEndsFirst = 0;
  private runEndsCount = 0;
  /** Cached one-header views by position (at / kRequestHeaderBytes), filled on first use. */
  private readonly headerViews: (Buffer | null)[];

  constructor(
    readonly capacityBytes: number,
    private readonly sink: RunSink,
  ) {
    assert(capacityBytes >= 2 * kRequestHeaderBytes, 'arena holds at least two headers');
    this.buffer = Buffer.alloc(capacityBytes);
    this.runEnds = new Int32Array(Math.ceil(capacityBytes / kRequestHeaderBytes) + 2);
    this.headerViews = new Array<Buffer | null>(Math.floor(capacityBytes / kRequestHeaderBytes)).fill(null);
  }

  get pendingRuns(): number {
    return this.runEndsCount;
  }

  /** Offset of 28 free bytes for a header (part of the pending run), or -1 when full. */
  reserve(): number {
    const needBytes = kRequestHeaderBytes;
    if (!this.wrapped) {
      if (this.tail === this.head && this.runStart === this.head && this.runEndsCount === 0) {
        this.head = 0;
        this.tail = 0;
        this.runStart = 0;
      }
      if (this.capacityBytes - this.head < needBytes) {
        if (this.tail < needBytes) return -1;
        this.flushRun();
        this.wrapped = true;
        this.head = 0;
        this.runStart = 0;
      }
    } else if (this.tail - this.head < needBytes) {
      return -1;
    }
    const at = this.head;
    this.head += needBytes;
    assert(this.head <= this.capacityBytes, 'header inside the arena');
    return at;
  }

  /** Hand the pending run (if any) to the sink. */
  flushRun(): void {
    const start = this.runStart;
    const end = this.head;
    if (end === start) return;
    assert(end > start, 'a run never spans the wrap point');
    assert(this.runEndsCount < this.runEnds.length, 'run-end FIFO bounded by the arena size');
    this.runEnds[(this.runEndsFirst + this.runEndsCount) % this.runEnds.length] = end;
    this.runEndsCount += 1;
    this.runStart = end;
    this.sink.writeRun(end - start === kRequestHeaderBytes ? this.headerView(start) : this.buffer.subarray(start, end));
  }

  /** The cached view of the one header at `at` (a multiple of kRequestHeaderBytes). */
  private headerView(at: number): Buffer {
    const index = at / kRequestHeaderBytes;
    assert(Number.isInteger(index) && index < this.headerViews.length, 'headers sit at multiples of the header size');
    let view = this.headerViews[index] ?? null;
    if (view === null) {
      view = this.buffer.subarray(at, at + kRequestHeaderBytes);
      this.headerViews[index] = view;
    }
    return view;
  }

  /** The sink wrote the oldest outstanding run: its bytes may be reused. */
  releaseRun(): void {
    if (this.runEndsCount === 0) return; // reset() ran after the connection closed
    const end = this.runEnds[this.runEndsFirst] as number;
    this.runEndsFirst = (this.runEndsFirst + 1) % this.runEnds.length;
    this.runEndsCount -= 1;
    if (this.wrapped && end <= this.tail) this.wrapped = false;
    this.tail = end;
  }

  /** Forget every run (the connection is gone; late releases are ignored). */
  reset(): void {
    this.head = 0;
    this.runStart = 0;
    this.tail = 0;
    this.wrapped = false;
    this.runEndsFirst = 0;
    this.runEndsCount = 0;
  }
}
