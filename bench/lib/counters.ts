/**
 * enbd's own WRITE-path counters, read just before and just after each fio run; the difference
 * is stored with the row: userspace copies and bytes copied per WRITE request.
 * Source: the daemon's control socket (`<socket>.ctl`, on by default, so reading it adds nothing
 * to the server's hot path): one `status` call, `stats.*` below. The Prometheus endpoint
 * (`--metrics`) carries the same counters (parseCounters reads them), but serving it cost 2-9 %
 * of 4 KiB and 1 MiB write throughput here (the opt-in case enbd-mirror2-shared-metrics), so the
 * matrix does not turn it on.
 * Threads: harness main thread.
 *
 * Counters (src/engine/mirror.ts, src/nbd/server/server.ts; Prometheus names in brackets):
 *   writeRequests       [enbd_write_requests_total]              WRITEs the engine received
 *   writeCopies         [enbd_write_payload_copies_total]        copies the engine counted: one
 *                                                                per WRITE for socket chunk ->
 *                                                                ring slot, plus one per leg in
 *                                                                --copy-mode per-leg
 *   writeBytesCopied    [enbd_write_payload_copied_bytes_total]  bytes of those copies
 *   payloadBytesCopied / payloadBytesDirect
 *                       [enbd_server_write_payload_bytes_total{receive="copied"|"direct"}]
 *                                                                payload bytes the NBD server
 *                                                                copied out of socket chunks, or
 *                                                                read straight into the slot
 *
 * The engine counts the receive copy once per WRITE whatever the server did; with
 * `--receive direct` part of the payload was never copied (a 1 MiB payload's tail is read
 * straight into its slot; payloads under 64 KiB are still copied). So the honest figure is
 * bytes: copiedBytes = engine copied bytes - server direct bytes, and "copies per WRITE" is
 * copiedBytes / payload bytes (1.00 = every payload byte copied once in userspace).
 *
 * Invariants: a read that fails or lacks a counter yields null, never zeros; a delta is
 * computed only from two complete snapshots of the same process.
 */
import { createServer } from 'node:net';
import { assert } from '../../src/core/assert.js';
import { ControlClient } from '../../src/control/client.js';
import type { StatusResult } from '../../src/control/protocol.js';

const kScrapeTimeoutMs = 3_000;

export interface CounterSnapshot {
  writeRequests: number;
  /** Engine-counted payload copies (receive copy + per-leg copies). */
  writeCopies: number;
  writeBytesCopied: number;
  /** Server: payload bytes copied from socket chunks / read straight into slots. */
  payloadBytesCopied: number;
  payloadBytesDirect: number;
}

/** Counters over one fio run (after - before), and what they mean per WRITE. */
export interface CounterDelta extends CounterSnapshot {
  /** Payload bytes of the WRITEs (server copied + direct). */
  writeBytes: number;
  /** Engine-counted copies per WRITE (the receive copy counted even when direct). */
  copiesPerWriteCounted: number | null;
  /** Bytes really copied in userspace per WRITE: engine copied bytes - direct bytes. */
  bytesCopiedPerWrite: number | null;
  /** Userspace copies per WRITE, byte-weighted: bytes copied / payload bytes. */
  copiesPerWrite: number | null;
}

type Labels = Record<string, string>;

/** Parses one sample line of the Prometheus text format (no escapes in our label values). */
function parseLine(line: string): { name: string; labels: Labels; value: number } | null {
  const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)/.exec(line);
  if (match === null) return null;
  const labels: Labels = {};
  for (const pair of (match[2] ?? '').split(',')) {
    const labelMatch = /^\s*([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"\s*$/.exec(pair);
    if (labelMatch !== null) labels[labelMatch[1] ?? ''] = labelMatch[2] ?? '';
  }
  const value = Number(match[3]);
  return Number.isFinite(value) ? { name: match[1] ?? '', labels, value } : null;
}

/** The snapshot in a /metrics body, or null when a series is missing. */
export function parseCounters(text: string): CounterSnapshot | null {
  const found = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line.startsWith('#') || line.trim() === '') continue;
    const sample = parseLine(line);
    if (sample === null) continue;
    const receive = sample.labels['receive'];
    const key = receive === undefined ? sample.name : `${sample.name}/${receive}`;
    found.set(key, sample.value);
  }
  const pick = (key: string): number | undefined => found.get(key);
  const snapshot = {
    writeRequests: pick('enbd_write_requests_total'),
    writeCopies: pick('enbd_write_payload_copies_total'),
    writeBytesCopied: pick('enbd_write_payload_copied_bytes_total'),
    payloadBytesCopied: pick('enbd_server_write_payload_bytes_total/copied'),
    payloadBytesDirect: pick('enbd_server_write_payload_bytes_total/direct'),
  };
  for (const value of Object.values(snapshot)) if (value === undefined) return null;
  return snapshot as CounterSnapshot;
}

/** GET http://host:port/metrics and parse it; null on any failure (logged by the caller). */
export async function scrapeCounters(host: string, port: number): Promise<CounterSnapshot | null> {
  assert(Number.isInteger(port) && port > 0 && port < 65536, 'metrics port');
  try {
    const response = await fetch(`http://${host}:${port}/metrics`, { signal: AbortSignal.timeout(kScrapeTimeoutMs) });
    if (!response.ok) return null;
    return parseCounters(await response.text());
  } catch {
    return null;
  }
}

/** The whole `status` answer of the control socket (legs, export...); null on any failure. */
export async function readControlStatus(controlPath: string): Promise<StatusResult | null> {
  let client: ControlClient | null = null;
  try {
    client = await ControlClient.connect(controlPath, kScrapeTimeoutMs);
    return await client.call('status', {}, kScrapeTimeoutMs);
  } catch {
    return null;
  } finally {
    client?.close();
  }
}

/** One `status` call on the control socket; null on any failure. */
export async function readControlCounters(controlPath: string): Promise<CounterSnapshot | null> {
  let client: ControlClient | null = null;
  try {
    client = await ControlClient.connect(controlPath, kScrapeTimeoutMs);
    const { stats } = await client.call('status', {}, kScrapeTimeoutMs);
    return {
      writeRequests: stats.writeRequests, writeCopies: stats.writeCopies, writeBytesCopied: stats.writeBytesCopied,
      payloadBytesCopied: stats.payloadBytesCopied, payloadBytesDirect: stats.payloadBytesDirect,
    };
  } catch {
    return null;
  } finally {
    client?.close();
  }
}

export function counterDelta(before: CounterSnapshot | null, after: CounterSnapshot | null): CounterDelta | null {
  if (before === null || after === null) return null;
  const delta: CounterSnapshot = {
    writeRequests: after.writeRequests - before.writeRequests,
    writeCopies: after.writeCopies - before.writeCopies,
    writeBytesCopied: after.writeBytesCopied - before.writeBytesCopied,
    payloadBytesCopied: after.payloadBytesCopied - before.payloadBytesCopied,
    payloadBytesDirect: after.payloadBytesDirect - before.payloadBytesDirect,
  };
  // Counters only grow within one process; a decrease means a restart: no delta.
  if (Object.values(delta).some((value) => value < 0)) return null;
  const writeBytes = delta.payloadBytesCopied + delta.payloadBytesDirect;
  const copiedBytes = Math.max(0, delta.writeBytesCopied - delta.payloadBytesDirect);
  const perWrite = (value: number): number | null => (delta.writeRequests > 0 ? value / delta.writeRequests : null);
  return {
    ...delta, writeBytes,
    copiesPerWriteCounted: perWrite(delta.writeCopies),
    bytesCopiedPerWrite: perWrite(copiedBytes),
    copiesPerWrite: writeBytes > 0 && delta.writeRequests > 0 ? copiedBytes / writeBytes : null,
  };
}

/** A TCP port that was free a moment ago on 127.0.0.1 (the server binds it right after). */
export async function freeTcpPort(): Promise<number> {
  return await new Promise<number>((resolvePort, rejectPort) => {
    const server = createServer();
    server.once('error', rejectPort);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close(() => (port > 0 ? resolvePort(port) : rejectPort(new Error('no port'))));
    });
  });
}
