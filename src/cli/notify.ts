/**
 * systemd readiness (`Type=notify`): READY=1 once every listener accepts, STATUS=... lines (the
 * leg summary for a mirror), STOPPING=1 when a graceful stop begins, and WATCHDOG=1 keep-alives
 * when the unit sets WatchdogSec=.
 *
 * Thread: main thread.
 *
 * Design notes
 * - The protocol is one datagram of `KEY=VALUE\n` lines to the AF_UNIX socket in
 *   $NOTIFY_SOCKET. node:dgram cannot send it: it has only udp4/udp6 sockets (createSocket of
 *   anything else throws ERR_SOCKET_BAD_TYPE), and the issue rules out a native addon. So each
 *   message is handed to systemd-notify(1), part of systemd itself: `systemd-notify
 *   --pid=OUR_PID KEY=VALUE ...`. The unit needs `NotifyAccess=all` (the sender is a child), and
 *   systemd-notify (systemd >= 246) waits on a BARRIER=1 round trip so systemd attributes the
 *   message before the child exits.
 * - NOTIFY_SOCKET is read once and removed from process.env (like sd_notify's
 *   unset_environment), so leg workers and the `--run` command do not inherit it.
 * - Without NOTIFY_SOCKET nothing is done; with it but no systemd-notify on PATH, one warning
 *   says readiness cannot be reported.
 * - Watchdog (sd_watchdog_enabled's rules): WATCHDOG_USEC set (and WATCHDOG_PID absent or our
 *   pid) starts an unref'd interval timer on the main event loop at half the interval; each tick
 *   queues WATCHDOG=1. The ping comes from the loop itself, so a stalled loop stops pinging and
 *   systemd restarts the service. A tick is skipped while the previous ping is still queued or
 *   in flight (a slow systemd-notify must not grow the queue). Both variables are removed from
 *   process.env like NOTIFY_SOCKET.
 *
 * Invariants: messages are sent one at a time, in order (a queue; at most kQueueMax waiting,
 * STATUS updates beyond it dropped); a failed send is logged at debug and never stops the daemon.
 */
import { execFile } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';
import type { Logger } from '../core/log.js';

const kSendTimeoutMs = 5000;
const kQueueMax = 16;

function findTool(name: string): string | null {
  const path = process.env['PATH'] ?? '';
  for (const directory of [...path.split(delimiter), '/usr/bin', '/bin']) {
    if (directory === '') continue;
    const candidate = join(directory, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return null;
}

/** STATUS text: one line, bounded. */
function statusLine(text: string): string {
  return text.replace(/[\r\n]+/g, ' ').slice(0, 512);
}

export class ServiceNotifier {
  private readonly tool: string;
  private readonly socket: string;
  private readonly logger: Logger;
  private readonly queue: string[][] = [];
  private sending = false;
  private pinging = false;
  private watchdog: NodeJS.Timeout | null = null;

  private constructor(tool: string, socket: string, logger: Logger) {
    this.tool = tool;
    this.socket = socket;
    this.logger = logger;
  }

  /** The keep-alive period in ms (half of WATCHDOG_USEC), or null when systemd wants no watchdog for us. */
  static watchdogPeriodMs(usecText: string | undefined, pidText: string | undefined, pid: number): number | null {
    if (usecText === undefined || !/^\d+$/.test(usecText)) return null;
    if (pidText !== undefined && pidText !== '' && pidText !== String(pid)) return null;
    const usec = Number(usecText);
    if (usec <= 0) return null;
    return Math.max(1, Math.floor(usec / 2000));
  }

  /** Null when not run by systemd with Type=notify (or when it cannot be reported). */
  static fromEnvironment(logger: Logger): ServiceNotifier | null {
    const socket = process.env['NOTIFY_SOCKET'];
    const periodMs = ServiceNotifier.watchdogPeriodMs(process.env['WATCHDOG_USEC'], process.env['WATCHDOG_PID'], process.pid);
    delete process.env['NOTIFY_SOCKET'];
    delete process.env['WATCHDOG_USEC'];
    delete process.env['WATCHDOG_PID'];
    if (socket === undefined || socket === '') return null;
    const tool = findTool('systemd-notify');
    if (tool === null) {
      logger.warn({ notifySocket: socket }, 'NOTIFY_SOCKET is set but systemd-notify is not installed: readiness cannot be reported (node:dgram has no Unix datagram sockets)');
      return null;
    }
    const notifier = new ServiceNotifier(tool, socket, logger);
    if (periodMs !== null) notifier.startWatchdog(periodMs);
    return notifier;
  }

  private startWatchdog(periodMs: number): void {
    this.logger.debug({ periodMs }, 'systemd watchdog: sending WATCHDOG=1 at half of WatchdogSec');
    this.watchdog = setInterval(() => {
      if (this.pinging) return;
      this.pinging = true;
      this.send(['WATCHDOG=1']);
    }, periodMs);
    this.watchdog.unref();
  }

  ready(status: string): void {
    this.send(['READY=1', `STATUS=${statusLine(status)}`]);
  }

  status(status: string): void {
    if (this.queue.length >= kQueueMax) return;
    this.send([`STATUS=${statusLine(status)}`]);
  }

  stopping(): void {
    // systemd stops watching once the stop begins; no more pings, so drained() can finish
    if (this.watchdog !== null) clearInterval(this.watchdog);
    this.watchdog = null;
    this.send(['STOPPING=1', 'STATUS=stopping']);
  }

  /**
   * Resolves once every queued message was handed to systemd-notify (or after `timeoutMs`): the
   * daemon awaits it before exiting, so STOPPING=1 is not lost behind a message still in flight.
   */
  async drained(timeoutMs = 3000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while ((this.sending || this.queue.length > 0) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
  }

  private send(fields: string[]): void {
    this.queue.push(fields);
    this.pump();
  }

  private pump(): void {
    if (this.sending) return;
    const fields = this.queue.shift();
    if (fields === undefined) return;
    this.sending = true;
    const env = { ...process.env, NOTIFY_SOCKET: this.socket };
    execFile(this.tool, [`--pid=${process.pid}`, ...fields], { env, timeout: kSendTimeoutMs }, (error, _stdout, stderr) => {
      if (error !== null) this.logger.debug({ err: error, stderr, fields }, 'systemd-notify failed');
      if (fields[0] === 'WATCHDOG=1') this.pinging = false;
      this.sending = false;
      this.pump();
    });
  }
}
