/**
 * Prometheus endpoint of `enbd mirror --metrics [HOST:]PORT`: an HTTP server (node:http) that
 * answers `GET /metrics` (and HEAD) with the text exposition of a private prom-client Registry:
 * the enbd_* series (series.ts), the request latency histogram (histogram.ts) and prom-client's
 * default Node.js process metrics (process_*, nodejs_*; unprefixed, as dashboards expect).
 * Any other path is 404; another method on /metrics is 405.
 *
 * Thread: main thread (the session master's event loop).
 *
 * Scrape path (nothing runs on the request path; the engine only bumps its own counters):
 *   GET /metrics -> Sampler.refresh(): legStats() raced against legStatsTimeoutMs, then the
 *   synchronous reads (stats, legStatus, ringCounters, latency snapshots, server counters)
 *   -> registry.metrics(): each family's collect() refills itself from that one sample
 *   -> 200 text/plain; version=0.0.4
 *
 * Bounds: at most kConnectionsMax scrape connections; a scrape waits at most
 * legStatsTimeoutMs for the leg actors (then leaves their series out, enbd_leg_stats_up 0).
 * The default-metrics collectors (a GC observer, an event-loop-delay monitor) stay installed
 * after close(); they hold no handle open (the process can exit).
 */
import { listenOn } from '../core/listen.js';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { Registry, collectDefaultMetrics } from 'prom-client';
import type { Logger } from '../core/log.js';
import { assert } from '../core/assert.js';
import { OptionError, describeError } from '../core/errors.js';
import {
  Sampler,
  kLegStatsTimeoutMsDefault,
  type MetricsMirror,
  type MetricsNbdServer,
} from './sample.js';
import { registerSeries } from './series.js';

export type { MetricsMirror, MetricsNbdServer } from './sample.js';

export interface MetricsServerOptions {
  /** Address to listen on, e.g. 127.0.0.1 or :: */
  host: string;
  /** TCP port; 0 picks a free one (see the returned port). */
  port: number;
  /** The mirror (a MirrorDevice). */
  mirror: MetricsMirror;
  /** The NBD server in front of it (an NbdServer). */
  server: MetricsNbdServer;
  logger: Logger;
  /** Longest wait for the leg actors' stats per scrape (default 500 ms). */
  legStatsTimeoutMs?: number;
  /** Include prom-client's default process metrics (default true). */
  defaultMetrics?: boolean;
}

export interface MetricsServer {
  /** The bound port. */
  readonly port: number;
  /** Stops listening and closes open scrape connections. Idempotent. */
  close(): Promise<void>;
}

export const kMetricsPath = '/metrics';
const kConnectionsMax = 16;

/** Builds the private registry with every series; exported for tests. */
export function createMetricsRegistry(sampler: Sampler, defaultMetrics: boolean): Registry {
  const registry = new Registry();
  registerSeries(registry, sampler);
  if (defaultMetrics) collectDefaultMetrics({ register: registry });
  return registry;
}

function pathOf(request: IncomingMessage): string {
  const url = request.url ?? '/';
  const query = url.indexOf('?');
  return query < 0 ? url : url.slice(0, query);
}

function reply(
  response: ServerResponse,
  status: number,
  body: string,
  headers: Record<string, string> = {},
): void {
  response.writeHead(status, {
    'Content-Type': 'text/plain; charset=utf-8',
    'Content-Length': String(Buffer.byteLength(body)),
    ...headers,
  });
  response.end(body);
}

async function handle(
  request: IncomingMessage,
  response: ServerResponse,
  sampler: Sampler,
  registry: Registry,
  logger: Logger,
): Promise<void> {
  if (pathOf(request) !== kMetricsPath) {
    reply(response, 404, `not found: metrics are at ${kMetricsPath}\n`);
    return;
  }
  if (request.method !== 'GET' && request.method !== 'HEAD') {
    reply(response, 405, 'method not allowed\n', { Allow: 'GET, HEAD' });
    return;
  }
  try {
    await sampler.refresh();
    const body = await registry.metrics();
    if (response.destroyed) return;
    response.writeHead(200, {
      'Content-Type': registry.contentType,
      'Content-Length': String(Buffer.byteLength(body)),
    });
    response.end(request.method === 'HEAD' ? undefined : body);
  } catch (error) {
    logger.error({ err: error }, 'metrics: scrape failed');
    if (response.headersSent || response.destroyed) response.destroy();
    else reply(response, 500, `scrape failed: ${describeError(error)}\n`);
  }
}

async function listen(server: Server, host: string, port: number): Promise<number> {
  await listenOn(server, { host, port }, '--metrics: ');
  const address = server.address();
  assert(typeof address === 'object' && address !== null, 'a TCP server has an address');
  return address.port;
}

/** Starts the metrics HTTP server; resolves once it listens. */
export async function startMetricsServer(options: MetricsServerOptions): Promise<MetricsServer> {
  const { host, port, logger } = options;
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new OptionError('ENBD_ERR_OPTION', 'options.port must be an integer from 0 to 65535');
  }
  const timeoutMs = options.legStatsTimeoutMs ?? kLegStatsTimeoutMsDefault;
  if (!Number.isInteger(timeoutMs) || timeoutMs < 1) {
    throw new OptionError('ENBD_ERR_OPTION', 'options.legStatsTimeoutMs must be a positive integer');
  }
  const sampler = new Sampler(options.mirror, options.server, timeoutMs, logger);
  const registry = createMetricsRegistry(sampler, options.defaultMetrics ?? true);
  const server = createServer((request, response) => {
    void handle(request, response, sampler, registry, logger);
  });
  server.maxConnections = kConnectionsMax;
  const bound = await listen(server, host, port);
  const shown = host.includes(':') ? `[${host}]` : host;
  logger.info({ host, port: bound }, `metrics at http://${shown}:${bound}${kMetricsPath}`);
  let closing: Promise<void> | null = null;
  return {
    port: bound,
    close: async () => {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
      await closing;
    },
  };
}
