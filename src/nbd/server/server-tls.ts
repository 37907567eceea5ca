/**
 * NBD server, TLS: the export's TLS settings (`--tls off|on|require`, `--tls-certificates DIR`,
 * `--tls-verify-peer`, `--tls-psk FILE`), loaded once into a node:tls SecureContext, and the
 * in-place upgrade of an accepted socket after NBD_OPT_STARTTLS was acknowledged.
 *
 * Thread: main thread (session master). Loading reads files synchronously at startup only.
 *
 * Design notes
 * - The certificate directory uses nbdkit's file names: ca-cert.pem (optional unless peers
 *   are verified), server-cert.pem, server-key.pem.
 * - The upgrade wraps the same socket (tls.TLSSocket with isServer): the ACK was already
 *   queued on the plain socket's handle, so it leaves before any TLS record.
 * - PSK (`--tls-psk FILE`, psktool's `username:hexkey` lines, as nbdkit): no certificate; the
 *   client's identity selects the key (unknown identity: handshake fails). TLS 1.3 (external
 *   PSK) and TLS 1.2 PSK suites are allowed; both interoperate with GnuTLS (libnbd, nbdkit).
 *   Certificates and PSK are exclusive.
 * - Modes follow nbdkit: `on` offers STARTTLS but serves plain clients too (NBD's SELECTIVETLS
 *   with no TLS-only export), `require` is FORCEDTLS.
 *
 * Invariants:
 * - A configuration error (missing file, bad PEM) throws ENBD_ERR_CONFIG at startup naming
 *   the file; nothing is loaded per connection.
 * - With peer verification on, a client without a valid certificate signed by the CA never
 *   gets past the TLS handshake (none: OpenSSL fails it; invalid or expired: the connection
 *   checks peerVerifyError on 'secure' before any option is read).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Socket } from 'node:net';
import { TLSSocket, createSecureContext, type SecureContext } from 'node:tls';
import { EnbdError, describeError } from '../../core/errors.js';
import { kPskCiphers, parsePskFile } from '../tls-psk.js';

export type TlsMode = 'off' | 'on' | 'require';

export interface ServerTlsSettings {
  mode: TlsMode;
  /** Directory holding ca-cert.pem, server-cert.pem, server-key.pem. */
  certificatesDir?: string;
  /** Ask clients for a certificate and check it against ca-cert.pem. */
  verifyPeer?: boolean;
  /** psktool key file (`username:hexkey` per line): PSK instead of certificates. */
  pskFile?: string;
}

/** A loaded TLS configuration, shared by every connection of a server. */
export interface ServerTls {
  readonly mode: 'on' | 'require';
  readonly secureContext: SecureContext;
  readonly verifyPeer: boolean;
  /** PSK keys by identity, or null when certificates are used. */
  readonly pskKeys: ReadonlyMap<string, Buffer> | null;
}

/**
 * The verification result of a server socket's client certificate: null when it verified,
 * else the OpenSSL code (CERT_HAS_EXPIRED, UNABLE_TO_VERIFY_LEAF_SIGNATURE, ...). node:tls
 * checks this only for sockets accepted by a tls.Server (its 'secure' listener); a socket
 * upgraded by hand must ask its handle, as that listener does. A handle without the check
 * fails closed.
 */
export function peerVerifyError(socket: TLSSocket): string | null {
  const handle = (socket as unknown as { _handle?: { verifyError?: () => Error | null } | null })._handle;
  if (handle === null || handle === undefined || typeof handle.verifyError !== 'function') return 'cannot check the client certificate';
  const error = handle.verifyError();
  return error === null ? null : ((error as NodeJS.ErrnoException).code ?? error.message);
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
    if (settings.certificatesDir !== undefined || settings.verifyPeer === true || settings.pskFile !== undefined) {
      throw new EnbdError('ENBD_ERR_CONFIG', '--tls-certificates, --tls-verify-peer and --tls-psk need --tls on or --tls require');
    }
    return null;
  }
  if (settings.pskFile !== undefined) {
    if (settings.certificatesDir !== undefined || settings.verifyPeer === true) {
      throw new EnbdError('ENBD_ERR_CONFIG', '--tls-psk excludes --tls-certificates and --tls-verify-peer');
    }
    let text: string;
    try {
      text = readFileSync(settings.pskFile, 'utf8');
    } catch (error) {
      throw new EnbdError('ENBD_ERR_CONFIG', `--tls-psk: cannot read ${settings.pskFile}: ${describeError(error)}`);
    }
    const pskKeys = parsePskFile(text, settings.pskFile);
    return { mode: settings.mode, secureContext: createSecureContext({ ciphers: kPskCiphers }), verifyPeer: false, pskKeys };
  }
  const dir = settings.certificatesDir;
  if (dir === undefined || dir === '') {
    throw new EnbdError('ENBD_ERR_CONFIG', `--tls ${settings.mode} needs --tls-certificates DIR (ca-cert.pem, server-cert.pem, server-key.pem) or --tls-psk FILE`);
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
  return { mode: settings.mode, secureContext, verifyPeer, pskKeys: null };
}

/**
 * Upgrades an accepted plain socket in place, as the server side of a TLS handshake. The
 * caller has removed its own listeners from `plain` and must listen on the result ('secure'
 * when the handshake is done, 'error' when it failed).
 */
export function upgradeServerSocket(plain: Socket, tls: ServerTls): TLSSocket {
  const keys = tls.pskKeys;
  return new TLSSocket(plain, {
    isServer: true,
    secureContext: tls.secureContext,
    requestCert: tls.verifyPeer,
    rejectUnauthorized: tls.verifyPeer,
    ...(keys !== null ? { pskCallback: (_socket: TLSSocket, identity: string) => keys.get(identity) ?? null } : {}),
  } as ConstructorParameters<typeof TLSSocket>[1]);
}
