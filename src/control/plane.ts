/**
 * The control plane of `enbd mirror`, as runMirror starts it: picks the control socket path,
 * binds the ControlServer, and wires the mirror's methods and events to it.
 *
 * Thread: the daemon's main thread.
 *
 * Control socket path (`--control PATH`, config key `control`):
 * | given                                   | path                                      |
 * |-----------------------------------------|-------------------------------------------|
 * | --control none                          | no control socket                         |
 * | --control PATH                          | PATH                                      |
 * | embedded default, default data socket   | DATA_DIR/enbd.ctl                         |
 * | --socket SOCK                           | SOCK.ctl                                  |
 * | TCP only (--listen)                     | ./enbd.ctl (the current directory)        |
 * A second daemon on the same path is refused (the path is live); a stale socket left by a
 * daemon that died is replaced.
 */
import { join, resolve } from 'node:path';
import { EnbdError } from '../core/errors.js';
import type { Logger } from '../core/log.js';
import type { MirrorOperations } from '../engine/view.js';
import type { NbdServer } from '../nbd/server/server.js';
import { MirrorControl } from './handlers.js';
import { ControlServer } from './server.js';

/** sun_path is 108 bytes on Linux, including the terminating NUL. */
export const kSocketPathBytesMax = 107;
export const kControlDisabled = 'none';

export interface ControlPathInput {
  /** The --control value (or config key), null when not given. */
  control: string | null;
  /** The data socket (after the embedded default filled it in), or null for TCP only. */
  socket: string | null;
  dataDir: string;
  embedded: boolean;
}

/** The control socket path for these settings, or null when disabled (`--control none`). */
export function controlPathFor(input: ControlPathInput): string | null {
  if (input.control === kControlDisabled) return null;
  if (input.control !== null) return resolve(input.control);
  if (input.embedded && input.socket !== null && resolve(input.socket) === join(input.dataDir, 'enbd.sock')) {
    return join(input.dataDir, 'enbd.ctl');
  }
  if (input.socket !== null) return `${resolve(input.socket)}.ctl`;
  return resolve('enbd.ctl');
}

export interface ControlPlaneOptions extends ControlPathInput {
  /** The engine's face (a MirrorDevice). */
  mirror: MirrorOperations;
  server: NbdServer;
  logger: Logger;
}

export interface ControlPlane {
  readonly path: string;
  close(): Promise<void>;
}

/** Binds the control socket and serves the mirror's methods; null when disabled. */
export async function startControlPlane(options: ControlPlaneOptions): Promise<ControlPlane | null> {
  const path = controlPathFor(options);
  if (path === null) {
    options.logger.info('control socket disabled (--control none)');
    return null;
  }
  if (Buffer.byteLength(path) > kSocketPathBytesMax) {
    throw new EnbdError('ENBD_ERR_CONFIG', `control socket path ${path} is longer than ${kSocketPathBytesMax} bytes; pass a shorter --control PATH`);
  }
  const logger = options.logger.child({ component: 'control' });
  let server: ControlServer | null = null;
  const control = new MirrorControl({
    mirror: options.mirror,
    server: options.server,
    logger: options.logger,
    controlPath: path,
    broadcast: (event, data) => server?.broadcast(event, data),
  });
  try {
    server = await ControlServer.listen({
      path,
      logger,
      handlers: control.handlers(),
      onSubscribersChanged: (count) => control.onSubscribersChanged(count),
    });
  } catch (error) {
    control.close();
    throw error;
  }
  const bound = server;
  return {
    path,
    close: async () => {
      control.close();
      await bound.close();
    },
  };
}
