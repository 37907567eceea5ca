/**
 * NBD client, TLS: turns an nbds:// address's settings (libnbd's query parameters) into
 * node:tls connect options, and upgrades a connected socket in place after the server
 * acknowledged NBD_OPT_STARTTLS.
 *
 * Thread: whichever thread owns the connection (a leg actor's worker, or main). The
 * certificate files are read at each connect (small; picks up renewed certificates).
 *
 * Design notes
 * - tls-certificates=DIR: ca-cert.pem (trusted CA; without it the system CAs), and
 *   client-cert.pem + client-key.pem when both exist (for servers that verify peers).
 * - tls-verify-peer=false: no chain or name check (as libnbd). Otherwise the chain is checked,
 *   and the name is checked against tls-hostname, else the host of a TCP address; a Unix
 *   socket without tls-hostname checks the chain only (it has no name).
 *
 * - tls-psk-file=FILE: pre-shared key for the identity tls-username (or the URI's user, else the
 *   local login name, as libnbd); no certificates, so no chain or name check. TLS 1.3 external
 *   PSK, or the TLS 1.2 PSK suites; both interoperate with GnuTLS (nbdkit --tls-psk).
 *
 * Invariants:
 * - A missing or unreadable certificate file fails the connect with ENBD_ERR_HANDSHAKE naming
 *   the file; a failed TLS handshake names the server.
 */
import { existsSync, readFileSync } from 'node:fs';
import { isIP, type Socket } from 'node:net';
import { join } from 'node:path';
import { checkServerIdentity, connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import { userInfo } from 'node:os';
import { EnbdError, describeError } from '../../core/errors.js';
import { kPskCiphers, parsePskFile } from '../tls-psk.js';
import type { NbdAddress, NbdTlsSettings } from '../uri.js';

function readPem(path: string, what = 'tls-certificates'): Buffer {
  try {
    return readFileSync(path);
  } catch (error) {
    throw new EnbdError('ENBD_ERR_HANDSHAKE', `${what}: cannot read ${path}: ${describeError(error)}`);
  }
}

/** node:tls options for an nbds address. */
export function clientTlsOptions(address: NbdAddress, settings: NbdTlsSettings): ConnectionOptions {
  if (settings.pskFile !== undefined) {
    const keys = parsePskFile(readPem(settings.pskFile, 'tls-psk-file').toString('utf8'), settings.pskFile, 'tls-psk-file');
    const identity = settings.username ?? userInfo().username;
    const psk = keys.get(identity);
    if (psk === undefined) {
      throw new EnbdError('ENBD_ERR_HANDSHAKE', `tls-psk-file ${settings.pskFile} has no key for user '${identity}' (set tls-username or USER@ in the URI)`);
    }
    return { ciphers: kPskCiphers, checkServerIdentity: () => undefined, pskCallback: () => ({ psk, identity }) };
  }
  const options: ConnectionOptions = { rejectUnauthorized: settings.verifyPeer };
  const dir = settings.certificatesDir;
  if (dir !== undefined) {
    const caPath = join(dir, 'ca-cert.pem');
    if (existsSync(caPath)) options.ca = readPem(caPath);
    const certPath = join(dir, 'client-cert.pem');
    const keyPath = join(dir, 'client-key.pem');
    if (existsSync(certPath) && existsSync(keyPath)) {
      options.cert = readPem(certPath);
      options.key = readPem(keyPath);
    }
  }
  const hostname = settings.hostname ?? (address.kind === 'tcp' ? address.host : undefined);
  if (hostname !== undefined && isIP(hostname) === 0) options.servername = hostname;
  if (hostname === undefined) {
    options.checkServerIdentity = () => undefined;
  } else {
    options.checkServerIdentity = (_host, certificate) => checkServerIdentity(hostname, certificate);
  }
  return options;
}

/** Starts the client side of TLS on a connected socket (the caller listens for the outcome). */
export function upgradeClientSocket(plain: Socket, address: NbdAddress, settings: NbdTlsSettings): TLSSocket {
  return tlsConnect({ ...clientTlsOptions(address, settings), socket: plain });
}
