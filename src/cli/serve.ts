/**
 * `enbd serve FILE`: our own NBD file server, on a Unix socket and/or TCP, until SIGINT/SIGTERM.
 * SIGHUP is logged and ignored (src/cli/hangup.ts). nbdkit's habits (-U -, -P, --run,
 * --exit-with-parent, -f, -p, -e) come from src/cli/host.ts.
 * Thread: main thread.
 */
import { statfsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { createLogger } from '../core/log.js';
import { EnbdError } from '../core/errors.js';
import { FileDevice } from '../stubs/file-device.js';
import { createNbdServer } from '../nbd/server/server.js';
import { checkTcpFree, checkUnixFree } from '../core/listen.js';
import { kServerLimitDefaults, parseBytes, parseListen, parseServerLimits } from './parse.js';
import { installShutdown } from './shutdown.js';
import { loadServerTls, parseTlsMode } from '../nbd/server/server-tls.js';
import { installHangup } from './hangup.js';
import { ServiceNotifier } from './notify.js';
import { takeListenFds } from './activation.js';
import { bannerStream, hostCleanup, hostReady, kPrivateSocket, makePrivateSocket, parseHostHabits, type HostHabits } from './host.js';

const kTmpfsMagic = 0x01021994;
const kRamfsMagic = 0x858458f6;

/**
 * True when the file lives on tmpfs or ramfs: its I/O is a memory copy that cannot block on a
 * device, so doing it on the serving thread (`--io sync`) is safe and saves the thread-pool
 * round trip. Anything else (or an unknown file system) gets the thread pool.
 */
function isMemoryBacked(path: string): boolean {
  try {
    const type = statfsSync(dirname(path)).type;
    return type === kTmpfsMagic || type === kRamfsMagic;
  } catch {
    return false;
  }
}

export async function runServe(file: string, options: Record<string, unknown>): Promise<void> {
  const habits = parseHostHabits(options);
  try {
    await runServeWith(file, options, habits);
  } catch (error) {
    hostCleanup(habits); // the -U - directory of a start that failed
    throw error;
  }
}

async function runServeWith(file: string, options: Record<string, unknown>, habits: HostHabits): Promise<void> {
  const logger = createLogger({ level: String(options['logLevel'] ?? 'info') });
  // SIGHUP (a closed terminal) must not kill the server: it has no config to reload
  installHangup(logger, 'enbd serve has no configuration to reload');
  const notifier = ServiceNotifier.fromEnvironment(logger);
  const maximumPayloadBytes = parseBytes('--max-payload', String(options['maxPayload'] ?? '32M'));
  const limits = parseServerLimits(
    String(options['maxConnections'] ?? kServerLimitDefaults.maxConnections),
    String(options['handshakeTimeout'] ?? kServerLimitDefaults.handshakeTimeoutMs),
    String(options['payloadTimeout'] ?? kServerLimitDefaults.payloadTimeoutMs),
  );
  const socketOption = options['socket'];
  const socketPath = typeof socketOption !== 'string' ? null : socketOption === kPrivateSocket ? makePrivateSocket(habits) : resolve(socketOption);
  const activated = takeListenFds(); // systemd socket activation: replaces the default TCP address
  const listenText = typeof options['listen'] === 'string' ? options['listen'] : socketPath === null && activated.length === 0 ? '127.0.0.1:10809' : null;
  const listen = listenText === null ? null : parseListen('--listen', listenText);
  const exportName = String(options['name'] ?? '');
  const ioAsked = String(options['io'] ?? 'auto');
  if (ioAsked !== 'sync' && ioAsked !== 'async' && ioAsked !== 'auto') {
    throw new EnbdError('ENBD_ERR_CONFIG', `--io must be auto, sync or async, got "${ioAsked}"`);
  }
  const io = ioAsked === 'auto' ? (isMemoryBacked(resolve(file)) ? 'sync' : 'async') : ioAsked;
  const tls = loadServerTls({
    mode: parseTlsMode('--tls', String(options['tls'] ?? 'off')),
    ...(typeof options['tlsCertificates'] === 'string' ? { certificatesDir: resolve(options['tlsCertificates']) } : {}),
    verifyPeer: options['tlsVerifyPeer'] === true,
    ...(typeof options['tlsPsk'] === 'string' ? { pskFile: resolve(options['tlsPsk']) } : {}),
  });
  // both listeners are checked before the file is opened or either is bound
  if (socketPath !== null) await checkUnixFree(socketPath, '--socket');
  if (listen !== null) await checkTcpFree(listen.host, listen.port, '--listen');
  const device = FileDevice.open(resolve(file), { readOnly: options['readOnly'] === true, io });
  const server = createNbdServer({
    device,
    exportName,
    ...(typeof options['description'] === 'string' ? { description: options['description'] } : {}),
    logger,
    maximumPayloadBytes,
    ...limits,
    readOnly: options['readOnly'] === true,
    directReceive: options['receive'] === 'direct',
    tls,
  });
  const banner = bannerStream(habits, activated.length > 0);
  let tcp: { host: string; port: number } | null = null;
  try {
    for (const fd of activated) await server.listenFd(fd);
    if (activated.length > 0) banner.write(`enbd serve: socket activation: ${activated.length} inherited listener${activated.length === 1 ? '' : 's'} (fd ${activated.join(', ')})\n`);
    if (socketPath !== null) await server.listenUnix(socketPath, '--socket');
    if (listen !== null) {
      const port = await server.listenTcp(listen.host, listen.port);
      tcp = { host: listen.host, port };
      const host = listen.host.includes(':') ? `[${listen.host}]` : listen.host;
      banner.write(`enbd serve: nbd://${host}:${port}/${encodeURIComponent(exportName)}\n`);
    }
  } catch (error) {
    await server.close();
    await device.close();
    throw error;
  }
  if (socketPath !== null) {
    banner.write(`enbd serve: nbd+unix:///${encodeURIComponent(exportName)}?socket=${socketPath}\n`);
  }
  logger.info({ file, sizeBytes: device.sizeBytes, readOnly: device.features.readOnly, io, tls: tls?.mode ?? 'off' }, 'serving');
  const shutdown = installShutdown(logger, async () => {
    notifier?.stopping();
    try {
      await server.close();
      await device.close();
    } finally {
      hostCleanup(habits);
      await notifier?.drained();
    }
  });
  hostReady(habits, { exportName, unixSocket: socketPath, tcp }, logger, shutdown);
  notifier?.ready(`serving ${resolve(file)}${device.features.readOnly ? ' read-only' : ''}`);
}
