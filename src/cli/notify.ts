/**
 * systemd readiness (`Type=notify`): READY=1 once every listener accepts, STATUS=... lines (the
 * leg summary for a mirror), STOPPING=1 when a graceful stop begins.
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

  private constructor(tool: string, socket: string, logger: Logger) {
    this.tool = tool;
    this.socket = socket;
    this.logger = logger;
  }

  /** Null when not run by systemd with Type=notify (or when it cannot be reported). */
  static fromEnvironment(logger: Logger): ServiceNotifier | null {
    const socket = process.env['NOTIFY_SOCKET'];
    delete process.env['NOTIFY_SOCKET'];
    if (socket === undefined || socket === '') return null;
    const tool = findTool('systemd-notify');
    if (tool === null) {
      logger.warn({ notifySocket: socket }, 'NOTIFY_SOCKET is set but systemd-notify is not installed: readiness cannot be reported (node:dgram has no Unix datagram sockets)');
      return null;
    }
    return new ServiceNotifier(tool, socket, logger);
  }

  ready(status: string): void {
    this.send(['READY=1', `STATUS=${statusLine(status)}`]);
  }

  status(status: string): void {
    if (this.queue.length >= kQueueMax) return;
    this.send([`STATUS=${statusLine(status)}`]);
  }

  stopping(): void {
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
      this.sending = false;
      this.pump();
    });
  }
}
