/**
 * Logging: pino, structured. Pretty-printed on a TTY (pino-pretty transport), JSON lines
 * otherwise. Level from ENBD_LOG_LEVEL or the CLI's --log-level. Logs go to stderr so that
 * stdout stays for command output (status tables, JSON).
 * When stderr is the systemd journal ($JOURNAL_STREAM names stderr's device:inode), each JSON
 * line starts with its syslog priority, `<3>{"level":50,...}` (sd-daemon(3) prefixes), so
 * `journalctl -p err` selects pino's error and fatal lines.
 * Threads: main thread and workers; a worker creates its own logger with the same options.
 */
import { fstatSync, writeSync } from 'node:fs';
import { pino, type DestinationStream, type Logger, type LevelWithSilent } from 'pino';
import { OptionError } from './errors.js';

export type { Logger };

const kLevels: readonly string[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export function isLogLevel(value: string): value is LevelWithSilent {
  return kLevels.includes(value);
}

/** pino level -> syslog priority: fatal crit(2), error err(3), warn warning(4), info info(6), debug/trace debug(7). */
export function syslogPriority(pinoLevel: number): number {
  if (pinoLevel >= 60) return 2;
  if (pinoLevel >= 50) return 3;
  if (pinoLevel >= 40) return 4;
  if (pinoLevel >= 30) return 6;
  return 7;
}

/** True when $JOURNAL_STREAM is stderr's "device:inode" (systemd connected stderr to journald). */
export function stderrIsJournal(): boolean {
  const stream = process.env['JOURNAL_STREAM'];
  if (stream === undefined || stream === '') return false;
  try {
    const stats = fstatSync(2, { bigint: true });
    return stream === `${stats.dev}:${stats.ino}`;
  } catch {
    return false;
  }
}

const kLevelField = /^\{"level":(\d+)/;

/** Writes each pino line to stderr (synchronously) with its `<priority>` prefix. */
function journalDestination(): DestinationStream {
  return {
    write(line: string): void {
      const level = kLevelField.exec(line)?.[1];
      writeSync(2, `<${syslogPriority(level === undefined ? 30 : Number(level))}>${line}`);
    },
  };
}

export function createLogger(options: { level?: string; name?: string; pretty?: boolean } = {}): Logger {
  const level = options.level ?? process.env['ENBD_LOG_LEVEL'] ?? 'info';
  if (!isLogLevel(level)) throw new OptionError('ENBD_ERR_OPTION', `log level must be one of ${kLevels.join(', ')}`);
  const pretty = options.pretty ?? (process.stderr.isTTY === true && process.env['ENBD_LOG_JSON'] !== '1');
  const base = { name: options.name ?? 'enbd' };
  if (pretty) {
    return pino({
      level,
      base,
      transport: { target: 'pino-pretty', options: { destination: 2, colorize: true, translateTime: 'SYS:HH:MM:ss.l' } },
    });
  }
  if (stderrIsJournal()) return pino({ level, base }, journalDestination());
  return pino({ level, base }, pino.destination({ dest: 2, sync: true }));
}
