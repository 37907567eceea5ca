/**
 * NBD server, TLS: the export's TLS settings (`--tls off|on|require`, `--tls-certificates DIR`,
 * `--tls-verify-peer`), loaded once into a node:tls SecureContext, and the in-place upgrade of
 * an accepted socket after NBD_OPT_STARTTLS was acknowledged.
 *
 * Thread: main thread (session master). Loading reads files synchronously at startup only.
 *
 * Design notes
 * - The certificate directory uses nbdkit's file names: ca-cert.pem (optional unless peers
 *   are verified), server-cert.pem, server-key.pem.
 * - The upgrade wraps the same socket (tls.TLSSocket with isServer): the ACK was already
 *   queued on the plain socket's handle, so it leaves before any TLS record.
 * - Modes follow nbdkit: `on` offers STARTTLS but serves plain clients too (NBD's SELECTIVETLS
 *   with no TLS-only export), `require` is FORCEDTLS.
 *
 * Invariants:
 * - A configuration error (missing file, bad PEM) throws ENBD_ERR_CONFIG at startup naming
 *   the file; nothing is loaded per connection.
 * - With peer verification on, a client without a certificate signed by the CA never gets
 *   past the TLS handshake.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Socket } from 'node:net';
import { TLSSocket, createSecureContext, type SecureContext } from 'node:tls';
import { EnbdError, describeError } from '../core/errors.js';

export type TlsMode = 'off' | 'on' | 'require';

export interface ServerTlsSettings {
  mode: TlsMode;
  /** Directory holding ca-cert.pem, server-cert.pem, server-key.pem. */
  certificatesDir?: string;
  /** Ask clients for a certificate and check it against ca-cert.pem. */
  verifyPeer?: boolean;
}

/** A loaded TLS configuration, shared by every connection of a server. */
export interface ServerTls {
  readonly mode: 'on' | 'require';
  readonly secureContext: SecureContext;
  readonly verifyPeer: boolean;
}

export function parseTlsMode(option: string, text: string): TlsMode {
  if (text === 'off' || text === 'on' || text === 'require') return text;
  throw new EnbdError('ENBD_ERR_CONFIG', `${option} must be off, on or require, got "${text}"`);
}

function readPem(dir: string, name: string, required: boolean): Buffer | null {
  const path = join(dir, name);
  try {
    return readFileSync(path);
  } catch (error) {
    if (!required && (error as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new EnbdError('ENBD_ERR_CONFIG', `--tls-certificates: cannot read ${path}: ${describeError(error)}`);
  }
}

/** Loads the settings; null when TLS is off. Throws ENBD_ERR_CONFIG naming what is wrong. */
export function loadServerTls(settings: ServerTlsSettings): ServerTls | null {
  if (settings.mode === 'off') {
    if (settings.certificatesDir !== undefined || settings.verifyPeer === true) {
      throw new EnbdError('ENBD_ERR_CONFIG', '--tls-certificates and --tls-verify-peer need --tls on or --tls require');
    }
    return null;
  }
  const dir = settings.certificatesDir;
  if (dir === undefined || dir === '') {
    throw new EnbdError('ENBD_ERR_CONFIG', `--tls ${settings.mode} needs --tls-certificates DIR (ca-cert.pem, server-cert.pem, server-key.pem)`);
  }
  const verifyPeer = settings.verifyPeer === true;
  const cert = readPem(dir, 'server-cert.pem', true) as Buffer;
  const key = readPem(dir, 'server-key.pem', true) as Buffer;
  const ca = readPem(dir, 'ca-cert.pem', verifyPeer);
  let secureContext: SecureContext;
  try {
    secureContext = createSecureContext({ cert, key, ...(ca !== null ? { ca } : {}) });
  } catch (error) {
    throw new EnbdError('ENBD_ERR_CONFIG', `--tls-certificates ${dir}: ${describeError(error)}`);
  }
  return { mode: settings.mode, secureContext, verifyPeer };
}

/**
 * Upgrades an accepted plain socket in place, as the server side of a TLS handshake. The
 * caller has removed its own listeners from `plain` and must listen on the result ('secure'
 * when the handshake is done, 'error' when it failed).
 */
export function upgradeServerSocket(plain: Socket, tls: ServerTls): TLSSocket {
  return new TLSSocket(plain, {
    isServer: true,
    secureContext: tls.secureContext,
    requestCert: tls.verifyPeer,
    rejectUnauthorized: tls.verifyPeer,
  });
}
