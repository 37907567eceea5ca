/**
 * TLS-PSK key files and cipher list, shared by the NBD server (`--tls-psk FILE`) and the
 * client (`tls-psk-file=`): psktool's `username:hexkey` lines, as nbdkit and libnbd read them.
 * Threads: any (pure functions and a constant).
 *
 * Design notes
 * - Node's default cipher list has no PSK suites: kPskCiphers lists the TLS 1.2 PSK suites
 *   GnuTLS offers; TLS 1.3 external PSK needs no cipher change.
 * - A bad line is named by file and line number; a file without keys is refused.
 *
 * Invariants:
 * - parsePskFile returns at least one key, each a non-empty identity with whole hex bytes.
 */
import { EnbdError } from '../core/errors.js';

/** OpenSSL cipher list (TLS 1.2) with the PSK suites GnuTLS offers; TLS 1.3 suites are separate. */
export const kPskCiphers = 'ECDHE-PSK-AES256-GCM-SHA384:ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES128-GCM-SHA256:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305';

/** Parses a psktool key file: `username:hexkey` lines (blank lines and # comments skipped). */
export function parsePskFile(text: string, path: string, what = '--tls-psk'): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  for (const [index, raw] of text.split('\n').entries()) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const colon = line.indexOf(':');
    const name = colon > 0 ? line.slice(0, colon) : '';
    const hex = colon > 0 ? line.slice(colon + 1) : '';
    if (name === '' || !/^([0-9a-fA-F]{2})+$/.test(hex)) {
      throw new EnbdError('ENBD_ERR_CONFIG', `${what} ${path}:${index + 1}: expected username:hexkey (psktool format)`);
    }
    keys.set(name, Buffer.from(hex, 'hex'));
  }
  if (keys.size === 0) throw new EnbdError('ENBD_ERR_CONFIG', `${what} ${path}: no keys`);
  return keys;
}
