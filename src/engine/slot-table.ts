/**
 * The session master's per-slot request table: what the master remembers about the request in
 * each ring slot beyond what the slot descriptor in shared memory says (the descriptor is for
 * the actors; this table never leaves the main thread). One typed array per field, indexed by
 * the request's first slot, allocated once: nothing per request.
 *
 * Thread: main thread only (plain reads and writes, no Atomics).
 *
 * | field    | set by                          | meaning                                            |
 * |----------|---------------------------------|----------------------------------------------------|
 * | token    | bind (acquireBuffer/submit)     | the server's (or an internal) token; -1 free; the  |
 * |          |                                 | slot index is the server's lease handle            |
 * | internal | bind; submit of a lent WRITE    | 1: the engine frees the slot at completion (its own|
 * |          |                                 | runs, payload-less client requests, lent WRITEs)   |
 * | span     | bind                            | slots in the request's run                         |
 * | tried    | start / retryRead               | legs a READ was already sent to                    |
 * | upToDate | settleWriteTarget (under lock)  | targeted legs clean for the whole range at dispatch|
 * | inSync   | settleWriteTarget / FLUSH start | targeted legs that were in sync at dispatch        |
 * | seq      | settleWriteTarget / FLUSH start | the lifecycle's failure sequence at dispatch: a leg |
 * |          |                                 | that failed after it may have lost an unflushed ack|
 * | started  | start                           | performance.now() at arrival (latency)             |
 * | kind     | start                           | latency kind (kLatencyKinds index), -1 none        |
 * | phase    | copyRange; startKeeper (3);     | 0 client request; resync copy 1 READ, 2 WRITE;     |
 * |          | the verifier (4, 5); write-     | 3 the keeper's metadata run; verify 4 I/O, 5 lock; |
 * |          | behind (6)                      | 6 a write-behind shadow write                      |
 * | copyLeg  | copyRange                       | resync copy: the leg it copies to                  |
 * | epoch    | copyRange                       | resync copy: the target's epoch when it started    |
 *
 * Invariants:
 * - A data-changing request succeeds only if `upToDate & ~failed` is non-zero at completion:
 *   a leg that was up to date for its whole range holds it.
 * - `upToDate` is a subset of the slot's target mask, both settled under the range lock.
 */
export class SlotTable {
  readonly token: Int32Array;
  readonly internal: Uint8Array;
  readonly span: Int32Array;
  readonly tried: Int32Array;
  readonly upToDate: Int32Array;
  readonly inSync: Int32Array;
  readonly seq: Int32Array;
  readonly started: Float64Array;
  readonly kind: Int8Array;
  readonly phase: Uint8Array;
  readonly copyLeg: Int8Array;
  readonly epoch: Int32Array;

  constructor(readonly slotCount: number) {
    this.token = new Int32Array(slotCount).fill(-1);
    this.internal = new Uint8Array(slotCount);
    this.span = new Int32Array(slotCount).fill(1);
    this.tried = new Int32Array(slotCount);
    this.upToDate = new Int32Array(slotCount);
    this.inSync = new Int32Array(slotCount);
    this.seq = new Int32Array(slotCount);
    this.started = new Float64Array(slotCount);
    this.kind = new Int8Array(slotCount).fill(-1);
    this.phase = new Uint8Array(slotCount);
    this.copyLeg = new Int8Array(slotCount).fill(-1);
    this.epoch = new Int32Array(slotCount);
  }
}
