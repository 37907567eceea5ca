/**
 * Logging: pino, structured. Pretty-printed on a TTY (pino-pretty transport), JSON lines
 * otherwise. Level from ENBD_LOG_LEVEL or the CLI's --log-level. Logs go to stderr so that
 * stdout stays for command output (status tables, JSON).
 * Threads: main thread and workers; a worker creates its own logger with the same options.
 */
import { pino, type Logger, type LevelWithSilent } from 'pino';

export type { Logger };

const kLevels: readonly string[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export function isLogLevel(value: string): value is LevelWithSilent {
  return kLevels.includes(value);
}

export function createLogger(options: { level?: string; name?: string; pretty?: boolean } = {}): Logger {
  const level = options.level ?? process.env['ENBD_LOG_LEVEL'] ?? 'info';
  if (!isLogLevel(level)) throw new RangeError(`log level must be one of ${kLevels.join(', ')}`);
  const pretty = options.pretty ?? (process.stderr.isTTY === true && process.env['ENBD_LOG_JSON'] !== '1');
  const base = { name: options.name ?? 'enbd' };
  if (pretty) {
    return pino({
      level,
      base,
      transport: { target: 'pino-pretty', options: { destination: 2, colorize: true, translateTime: 'SYS:HH:MM:ss.l' } },
    });
  }
  return pino({ level, base }, pino.destination({ dest: 2, sync: true }));
}
