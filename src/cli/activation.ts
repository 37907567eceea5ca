/**
 * systemd socket activation (sd_listen_fds): a daemon started with LISTEN_PID = its own pid and
 * LISTEN_FDS = N serves the N listening sockets passed as fds 3 .. 3+N-1 (a `.socket` unit, or
 * a captive client such as `nbdinfo -- [ enbd serve disk.img ]`), instead of its default TCP
 * address. Explicit --socket / --listen are still bound as well.
 *
 * Thread: main thread.
 *
 * Invariants: the variables are read once and removed from process.env (like sd_listen_fds's
 * unset_environment), so leg workers and --run commands do not see them; a LISTEN_PID that is
 * not ours means the fds are not for us (ignored, as sd_listen_fds does).
 */
import { EnbdError } from '../core/errors.js';

export const kListenFdsStart = 3;
const kListenFdsMax = 64;

/** The inherited listening fds, or [] when not socket-activated. */
export function takeListenFds(): number[] {
  const pid = process.env['LISTEN_PID'];
  const count = process.env['LISTEN_FDS'];
  delete process.env['LISTEN_PID'];
  delete process.env['LISTEN_FDS'];
  delete process.env['LISTEN_FDNAMES'];
  if (pid === undefined || count === undefined || pid !== String(process.pid)) return [];
  const fds = Number(count);
  if (!/^\d+$/.test(count) || fds < 1 || fds > kListenFdsMax) {
    throw new EnbdError('ENBD_ERR_CONFIG', `LISTEN_FDS must be a count from 1 to ${kListenFdsMax}, got "${count}"`);
  }
  return Array.from({ length: fds }, (_, index) => kListenFdsStart + index);
}
