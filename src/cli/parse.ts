/**
 * Parsers for CLI option values: byte sizes ("4096", "64K", "1G"), durations ("5000", "500ms",
 * "2s", "1m"), listen addresses
 * ("10809", "127.0.0.1:10809", "[::1]:10809"). Each throws `usageError`: EnbdError('ENBD_ERR_USAGE',
 * "OPTION must be WHAT, got VALUE"), the one form of every flag and config error. OPTION is the
 * flag as the user wrote it (`--ring-slots`) or the config key and file (`legTimeoutMs in
 * mirror.yaml`); main.ts prints it as `enbd: error: ...` and exits 2.
 * Thread: main thread.
 */
import { EnbdError } from '../core/errors.js';

/** The value as shown in an error: as given, or quoted when it is empty or has spaces. */
export function shownValue(value: unknown): string {
  if (typeof value !== 'string') return JSON.stringify(value) ?? String(value);
  return value === '' || /[\s"]/.test(value) ? JSON.stringify(value) : value;
}

/** "OPTION must be WHAT, got VALUE" (a usage error: exit 2). */
export function usageError(option: string, mustBe: string, got: unknown): EnbdError {
  return new EnbdError('ENBD_ERR_USAGE', `${option} must be ${mustBe}, got ${shownValue(got)}`);
}

const kUnits: Record<string, number> = { '': 1, b: 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

export function parseBytes(option: string, text: string): number {
  const match = /^(\d+)\s*([kmgt]?)(i?b)?$/i.exec(text.trim());
  const unit = match?.[2]?.toLowerCase() ?? '';
  const multiplier = kUnits[unit];
  if (match === null || match[1] === undefined || multiplier === undefined) {
    throw usageError(option, 'a size in bytes (4096, 64K, 1G)', text);
  }
  const value = Number(match[1]) * multiplier;
  if (!Number.isSafeInteger(value)) throw usageError(option, 'a size below 8P', text);
  return value;
}

export function parseInteger(option: string, text: string, minimum: number, maximum: number): number {
  const value = Number(text);
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(value) || value < minimum || value > maximum) {
    throw usageError(option, `an integer from ${minimum} to ${maximum}`, text);
  }
  return value;
}

const kDurationUnitsMs: Record<string, number> = { '': 1, ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/**
 * A duration in milliseconds: a bare number is milliseconds (as the flags always took), or a
 * number with a unit: "500ms", "2s", "1.5s", "1m", "1h". Rounded to whole milliseconds.
 */
export function parseDurationMs(option: string, text: string, minimumMs: number, maximumMs: number): number {
  const match = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/i.exec(text.trim());
  const unit = kDurationUnitsMs[(match?.[2] ?? '').toLowerCase()];
  const value = match === null || match[1] === undefined || unit === undefined ? NaN : Math.round(Number(match[1]) * unit);
  if (!Number.isSafeInteger(value) || value < minimumMs || value > maximumMs) {
    throw usageError(option, `a duration from ${minimumMs} ms to ${maximumMs} ms (a bare number is ms; or 500ms, 2s, 1m, 1h)`, text);
  }
  return value;
}

/** The NBD server's abuse bounds (--max-connections, --handshake-timeout, --payload-timeout). */
export interface ServerLimits {
  connectionsMax: number;
  handshakeTimeoutMs: number;
  payloadTimeoutMs: number;
}

export const kServerLimitDefaults = { maxConnections: '128', handshakeTimeoutMs: '10000', payloadTimeoutMs: '30000' } as const;

/** Parses the three values (strings from flags or config); bounds as the server enforces them. */
export function parseServerLimits(maxConnections: string, handshakeTimeoutMs: string, payloadTimeoutMs: string, names: { maxConnections?: string; handshakeTimeoutMs?: string; payloadTimeoutMs?: string } = {}): ServerLimits {
  return {
    connectionsMax: parseInteger(names.maxConnections ?? '--max-connections', maxConnections, 1, 65_535),
    handshakeTimeoutMs: parseDurationMs(names.handshakeTimeoutMs ?? '--handshake-timeout', handshakeTimeoutMs, 0, 0x7fff_ffff),
    payloadTimeoutMs: parseDurationMs(names.payloadTimeoutMs ?? '--payload-timeout', payloadTimeoutMs, 0, 0x7fff_ffff),
  };
}

export interface ListenAddress {
  host: string;
  port: number;
}

export function parseListen(option: string, text: string, defaultHost = '127.0.0.1'): ListenAddress {
  const bracketed = /^\[([^\]]+)\]:(\d+)$/.exec(text);
  let host = defaultHost;
  let portText = text;
  if (bracketed !== null) {
    host = bracketed[1] ?? defaultHost;
    portText = bracketed[2] ?? '';
  } else if (text.includes(':')) {
    const at = text.lastIndexOf(':');
    host = text.slice(0, at);
    portText = text.slice(at + 1);
  }
  const port = Number(portText);
  if (host === '' || !/^\d+$/.test(portText) || port > 65535) {
    throw usageError(option, '[HOST:]PORT with a port from 0 to 65535', text);
  }
  return { host, port };
}
