/**
 * Fair share of a device's payload buffers (the mirror's request ring) among the NBD server's
 * connections, so that one connection's pipelined or stalled large requests cannot take the
 * whole ring and freeze every other client.
 *
 * Thread: main thread (the NBD server and its connections). Pure bookkeeping: integers only,
 * nothing allocated per request.
 *
 * Design notes
 * Buffer bytes are charged in the device's allocation units (a 4 KiB request on a ring of
 * 256 KiB slots costs a whole slot), so many small requests count for what they really hold.
 * A connection is *active* while it holds buffer bytes or waits for a buffer. With C the
 * capacity and A the active connections (the asker included):
 *
 *   share = floor(C / (A + 1))        one share is always left for a connection yet to come
 *
 * | asker holds | request charge c                      | decision                         |
 * |-------------|---------------------------------------|----------------------------------|
 * | h           | h + c <= share                        | may acquire                      |
 * | 0           | > share, asker is the only active one | may acquire (nobody to be fair to)|
 * | 0           | > share, T + c + share <= C           | may acquire (a share stays free) |
 * | 0           | > share, otherwise                    | wait for others' releases        |
 * | h > 0       | h + c > share                         | wait for its own releases        |
 *
 * (T: bytes held by all connections.) "May acquire" only lets the asker ask the device, which
 * still answers null when it has no room. Why the extra share: shares shrink as connections
 * arrive, but bytes already handed out cannot be taken back; a stalled client keeps its buffer
 * until the payload timeout closes it. With share = C / A two stallers with C/2 each would fill
 * the ring; with the free share a newcomer's request up to `share` always finds room once
 * requests in flight complete (up to slot rounding and the engine's own resync slots).
 * A request larger than the share waits while others hold most of the ring, so under heavy
 * load such requests can wait long (never forever: the holders' requests complete or time
 * out); the mirror keeps the maximum payload at capacity/8 so this takes 7+ busy clients.
 *
 * Invariants:
 * - heldTotalBytes is the sum of every user's heldBytes; activeCount counts users with
 *   heldBytes > 0 or wanting (kept by `update`, the only writer of both user fields).
 * - Charges are whole units and at least one unit; released exactly as acquired.
 */
import { assert } from '../../core/assert.js';
import { OptionError } from '../../core/errors.js';

/** Capacity split into this many units when the device does not say its unit size. */
export const kDefaultUnitsPerCapacity = 256;
const kUnitBytesMin = 4096;

/** The per-connection state the share reads and updates (lives on the connection). */
export interface ShareUser {
  /** Charged bytes of device buffers this user holds now. */
  shareHeldBytes: number;
  /** The user waits for a buffer (its parsing stopped for it). */
  shareWanting: boolean;
}

/** The fair share for `activeCount` active connections (the asker included). */
export function fairShareBytes(capacityBytes: number, activeCount: number): number {
  assert(activeCount >= 1, 'the asker is active');
  return Math.floor(capacityBytes / (activeCount + 1));
}

/**
 * The decision table above. `activeCount` includes the asker; `heldTotalBytes` includes what
 * the asker holds.
 */
export function mayAcquireShare(
  capacityBytes: number,
  activeCount: number,
  heldTotalBytes: number,
  heldBytes: number,
  chargeBytes: number,
): boolean {
  assert(heldBytes <= heldTotalBytes, 'the asker holds part of the total');
  assert(chargeBytes > 0, 'a charge is at least one unit');
  const share = fairShareBytes(capacityBytes, activeCount);
  if (heldBytes + chargeBytes <= share) return true;
  if (heldBytes > 0) return false;
  if (activeCount === 1) return true;
  return heldTotalBytes + chargeBytes + share <= capacityBytes;
}

export class BufferShare {
  private heldTotal = 0;
  private active = 0;
  readonly unitBytes: number;

  constructor(
    readonly capacityBytes: number,
    unitBytes: number | undefined,
  ) {
    if (!Number.isSafeInteger(capacityBytes) || capacityBytes <= 0) {
      throw new OptionError('ENBD_ERR_OPTION', 'device.bufferCapacityBytes must be a positive integer');
    }
    const unit =
      unitBytes ?? Math.max(kUnitBytesMin, Math.floor(capacityBytes / kDefaultUnitsPerCapacity));
    if (!Number.isSafeInteger(unit) || unit <= 0 || unit > capacityBytes) {
      throw new OptionError('ENBD_ERR_OPTION', 'device.bufferUnitBytes must be a positive integer up to the capacity');
    }
    this.unitBytes = unit;
  }

  get heldTotalBytes(): number {
    return this.heldTotal;
  }

  get activeCount(): number {
    return this.active;
  }

  /** Bytes a request of `lengthBytes` is charged: whole units, at least one. */
  chargeFor(lengthBytes: number): number {
    const units = lengthBytes <= this.unitBytes ? 1 : Math.ceil(lengthBytes / this.unitBytes);
    return units * this.unitBytes;
  }

  mayAcquire(user: ShareUser, chargeBytes: number): boolean {
    const counted = user.shareHeldBytes > 0 || user.shareWanting;
    const activeCount = counted ? this.active : this.active + 1;
    const held = user.shareHeldBytes;
    return mayAcquireShare(this.capacityBytes, activeCount, this.heldTotal, held, chargeBytes);
  }

  acquired(user: ShareUser, chargeBytes: number): void {
    assert(chargeBytes > 0, 'acquired a charged buffer');
    this.update(user, chargeBytes, user.shareWanting);
  }

  released(user: ShareUser, chargeBytes: number): void {
    assert(chargeBytes > 0, 'released a charged buffer');
    assert(chargeBytes <= user.shareHeldBytes, 'released what was acquired');
    this.update(user, -chargeBytes, user.shareWanting);
  }

  setWanting(user: ShareUser, wanting: boolean): void {
    if (user.shareWanting !== wanting) this.update(user, 0, wanting);
  }

  private update(user: ShareUser, heldDeltaBytes: number, wanting: boolean): void {
    const wasActive = user.shareHeldBytes > 0 || user.shareWanting;
    user.shareHeldBytes += heldDeltaBytes;
    user.shareWanting = wanting;
    this.heldTotal += heldDeltaBytes;
    const isActive = user.shareHeldBytes > 0 || user.shareWanting;
    if (isActive !== wasActive) this.active += isActive ? 1 : -1;
    assert(user.shareHeldBytes >= 0, 'held bytes never negative');
    assert(this.heldTotal >= user.shareHeldBytes, 'the total covers every user');
    assert(this.active >= 0, 'active count never negative');
  }
}
