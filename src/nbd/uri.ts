/**
 * NBD URIs (NetworkBlockDevice/nbd doc/uri.md) <-> typed addresses. Pure functions, no I/O.
 * Threads: any.
 *
 * Accepted forms:
 *   nbd://HOST[:PORT][/EXPORT]             TCP; PORT defaults to 10809; IPv6 as [::1]
 *   nbd+unix:///[EXPORT]?socket=PATH       Unix domain socket; the authority must be empty
 *   nbds://HOST[:PORT][/EXPORT][?TLS]      the same over TLS (STARTTLS before the option haggling)
 *   nbds+unix:///[EXPORT]?socket=PATH[&TLS]
 * TLS query parameters (libnbd's meaning): tls-certificates=DIR (ca-cert.pem, and optionally
 * client-cert.pem + client-key.pem), tls-verify-peer=false (do not check the server's
 * certificate), tls-hostname=NAME (the name its certificate must carry; default the URI's
 * host, none for Unix sockets), tls-psk-file=FILE (psktool `username:hexkey` lines: PSK instead
 * of certificates) with tls-username=NAME or the URI's user (nbds://alice@host/); libnbd's
 * default user is the local login name.
 * EXPORT is the percent-decoded path after the first '/', possibly empty (the default export).
 *
 * Invariants:
 * - parseNbdUri either returns a complete, valid address or throws EnbdError('ENBD_ERR_URI')
 *   whose message quotes the URI and says what is wrong.
 * - parseNbdUri(formatNbdUri(a)) deep-equals a for every valid address a (property-tested).
 * - Host names are kept without IPv6 brackets; formatNbdUri adds them back.
 */
import { EnbdError } from '../core/errors.js';
import { kDefaultPort, kStringBytesMax } from './protocol.js';

/** TLS settings of an nbds:// address (present only for the nbds schemes). */
export interface NbdTlsSettings {
  certificatesDir?: string;
  /** Check the server's certificate chain (and host name when known); default true. */
  verifyPeer: boolean;
  hostname?: string;
  /** PSK key file and the identity to use from it. */
  pskFile?: string;
  username?: string;
}

export type NbdAddress =
  | { kind: 'tcp'; host: string; port: number; exportName: string; tls?: NbdTlsSettings }
  | { kind: 'unix'; socketPath: string; exportName: string; tls?: NbdTlsSettings };

const kPortMax = 65535;
const kHostPattern = /^[A-Za-z0-9._~!$&'()*+,;=%-]+$/;
const kIpv6Pattern = /^[0-9A-Fa-f:.]+(%[A-Za-z0-9._~-]+)?$/;
const kPortPattern = /^[0-9]{1,5}$/;
const kUnsupportedSchemes: Readonly<Record<string, string>> = {
  'nbd+vsock': 'vsock transport is not supported',
  'nbds+vsock': 'vsock transport and TLS are not supported',
};

function uriError(text: string, problem: string): EnbdError {
  return new EnbdError('ENBD_ERR_URI', `invalid NBD URI '${text}': ${problem}`);
}

function decodeComponent(text: string, value: string, what: string): string {
  try {
    return decodeURIComponent(value);
  } catch {
    throw uriError(text, `${what} has a malformed percent-encoding`);
  }
}

function encodeKeepingSlashes(value: string): string {
  return encodeURIComponent(value).replace(/%2F/gi, '/');
}

/** Parse an NBD URI; throws EnbdError('ENBD_ERR_URI') naming the URI and the problem. */
export function parseNbdUri(text: string): NbdAddress {
  if (typeof text !== 'string' || text.length === 0) throw uriError(String(text), 'empty URI');
  const schemeEnd = text.indexOf('://');
  if (schemeEnd <= 0) throw uriError(text, "expected 'nbd://' or 'nbd+unix://'");
  const scheme = text.slice(0, schemeEnd).toLowerCase();
  const unsupported = kUnsupportedSchemes[scheme];
  if (unsupported !== undefined) throw uriError(text, unsupported);
  if (scheme !== 'nbd' && scheme !== 'nbd+unix' && scheme !== 'nbds' && scheme !== 'nbds+unix') {
    throw uriError(text, `unknown scheme '${scheme}' (expected nbd, nbd+unix, nbds or nbds+unix)`);
  }
  const tls = scheme.startsWith('nbds');
  let rest = text.slice(schemeEnd + 3);
  if (rest.includes('#')) throw uriError(text, 'fragments (#...) are not allowed');
  let query: string | null = null;
  const queryStart = rest.indexOf('?');
  if (queryStart >= 0) {
    query = rest.slice(queryStart + 1);
    rest = rest.slice(0, queryStart);
  }
  const pathStart = rest.indexOf('/');
  let authority = pathStart >= 0 ? rest.slice(0, pathStart) : rest;
  let user: string | null = null;
  const at = authority.lastIndexOf('@');
  if (tls && at >= 0) {
    user = decodeComponent(text, authority.slice(0, at), 'user name');
    if (user === '') throw uriError(text, 'empty user name before @');
    authority = authority.slice(at + 1);
  }
  const path = pathStart >= 0 ? rest.slice(pathStart + 1) : '';
  const exportName = decodeComponent(text, path, 'export name');
  if (Buffer.byteLength(exportName, 'utf8') > kStringBytesMax) {
    throw uriError(text, `export name longer than ${kStringBytesMax} bytes`);
  }
  if (exportName.includes('\0')) throw uriError(text, 'export name contains a NUL byte');
  if (scheme === 'nbd' || scheme === 'nbds') {
    if (query !== null && !tls) throw uriError(text, 'query parameters are not supported for nbd:// (TLS ones need nbds://)');
    const { host, port } = parseAuthority(text, authority);
    const parsed = parseQuery(text, query, false, tls, user);
    return { kind: 'tcp', host, port, exportName, ...(tls ? { tls: parsed.tls } : {}) };
  }
  if (authority.length !== 0) {
    const hint = `write ${scheme}:///EXPORT?socket=PATH`;
    throw uriError(text, `${scheme}:// takes no host ('${authority}'); ${hint}`);
  }
  const parsed = parseQuery(text, query, true, tls, user);
  return { kind: 'unix', socketPath: parsed.socketPath as string, exportName, ...(tls ? { tls: parsed.tls } : {}) };
}

function parseAuthority(text: string, authority: string): { host: string; port: number } {
  if (authority.length === 0) throw uriError(text, 'missing host');
  if (authority.includes('@')) {
    throw uriError(text, 'user names in the authority are not supported');
  }
  let host: string;
  let portText: string | null = null;
  if (authority.startsWith('[')) {
    const close = authority.indexOf(']');
    if (close < 0) throw uriError(text, "IPv6 host is missing its closing ']'");
    host = authority.slice(1, close);
    if (!host.includes(':') || !kIpv6Pattern.test(host)) {
      throw uriError(text, `'${host}' is not an IPv6 address`);
    }
    const after = authority.slice(close + 1);
    if (after.length !== 0) {
      if (!after.startsWith(':')) throw uriError(text, `unexpected '${after}' after the IPv6 host`);
      portText = after.slice(1);
    }
  } else {
    const colon = authority.indexOf(':');
    host = colon >= 0 ? authority.slice(0, colon) : authority;
    if (colon >= 0) portText = authority.slice(colon + 1);
    if (portText !== null && portText.includes(':')) {
      throw uriError(text, 'IPv6 hosts must be written in brackets, e.g. nbd://[::1]:10809/');
    }
    if (host.length === 0) throw uriError(text, 'missing host');
    if (!kHostPattern.test(host)) throw uriError(text, `invalid host '${host}'`);
  }
  let port = kDefaultPort;
  if (portText !== null) {
    if (!kPortPattern.test(portText)) throw uriError(text, `bad port '${portText}'`);
    port = Number(portText);
    if (port < 1 || port > kPortMax) {
      throw uriError(text, `port ${port} is out of range 1..${kPortMax}`);
    }
  }
  return { host, port };
}

const kTlsKeys = new Set(['tls-certificates', 'tls-verify-peer', 'tls-hostname', 'tls-psk-file', 'tls-username']);

function parseQuery(text: string, query: string | null, unix: boolean, tls: boolean, user: string | null): { socketPath: string | null; tls: NbdTlsSettings } {
  if (unix && (query === null || query.length === 0)) {
    throw uriError(text, 'nbd+unix:// requires ?socket=PATH');
  }
  let socketPath: string | null = null;
  const settings: NbdTlsSettings = { verifyPeer: true };
  const seen = new Set<string>();
  for (const pair of query === null || query.length === 0 ? [] : query.split('&')) {
    const equals = pair.indexOf('=');
    const key = equals >= 0 ? pair.slice(0, equals) : pair;
    const value = decodeComponent(text, equals >= 0 ? pair.slice(equals + 1) : '', key);
    if (seen.has(key)) throw uriError(text, `${key} is given more than once`);
    seen.add(key);
    if (key === 'socket' && unix) {
      socketPath = value;
    } else if (tls && kTlsKeys.has(key)) {
      if (key === 'tls-certificates') {
        if (value === '' || value.includes('\0')) throw uriError(text, 'tls-certificates is empty or contains a NUL byte');
        settings.certificatesDir = value;
      } else if (key === 'tls-psk-file' || key === 'tls-username') {
        if (value === '' || value.includes('\0')) throw uriError(text, `${key} is empty or contains a NUL byte`);
        if (key === 'tls-psk-file') settings.pskFile = value;
        else settings.username = value;
      } else if (key === 'tls-verify-peer') {
        if (value !== 'true' && value !== 'false') throw uriError(text, `tls-verify-peer must be true or false, got '${value}'`);
        settings.verifyPeer = value === 'true';
      } else {
        if (value === '') throw uriError(text, 'tls-hostname is empty');
        settings.hostname = value;
      }
    } else if (kTlsKeys.has(key)) {
      throw uriError(text, `${key} needs a TLS scheme (nbds:// or nbds+unix://)`);
    } else {
      throw uriError(text, `unsupported query parameter '${key}'`);
    }
  }
  if (user !== null) {
    if (settings.username !== undefined && settings.username !== user) throw uriError(text, 'the user name and tls-username differ');
    settings.username = user;
  }
  if (settings.pskFile !== undefined && settings.certificatesDir !== undefined) {
    throw uriError(text, 'tls-psk-file and tls-certificates exclude each other');
  }
  if (settings.username !== undefined && settings.pskFile === undefined) {
    throw uriError(text, 'a user name (or tls-username) needs tls-psk-file');
  }
  if (unix) {
    if (socketPath === null || socketPath.length === 0) throw uriError(text, 'socket path is empty');
    if (socketPath.includes('\0')) throw uriError(text, 'socket path contains a NUL byte');
  }
  return { socketPath, tls: settings };
}

function formatTlsQuery(tls: NbdTlsSettings): string[] {
  const parts: string[] = [];
  if (tls.certificatesDir !== undefined) parts.push(`tls-certificates=${encodeKeepingSlashes(tls.certificatesDir)}`);
  if (!tls.verifyPeer) parts.push('tls-verify-peer=false');
  if (tls.hostname !== undefined) parts.push(`tls-hostname=${encodeURIComponent(tls.hostname)}`);
  if (tls.pskFile !== undefined) parts.push(`tls-psk-file=${encodeKeepingSlashes(tls.pskFile)}`);
  if (tls.username !== undefined) parts.push(`tls-username=${encodeURIComponent(tls.username)}`);
  return parts;
}

/** Format an address as an NBD URI; throws ENBD_ERR_URI for addresses that have none. */
export function formatNbdUri(address: NbdAddress): string {
  let exportPart: string;
  try {
    exportPart = encodeKeepingSlashes(address.exportName);
  } catch {
    const name = JSON.stringify(address.exportName);
    throw new EnbdError('ENBD_ERR_URI', `export name ${name} is not valid UTF-8`);
  }
  if (address.kind === 'unix') {
    let socketPart: string;
    try {
      socketPart = encodeKeepingSlashes(address.socketPath);
    } catch {
      const path = JSON.stringify(address.socketPath);
      throw new EnbdError('ENBD_ERR_URI', `socket path ${path} is not valid UTF-8`);
    }
    const tlsParts = address.tls === undefined ? [] : formatTlsQuery(address.tls);
    return `${address.tls === undefined ? 'nbd' : 'nbds'}+unix:///${exportPart}?${[`socket=${socketPart}`, ...tlsParts].join('&')}`;
  }
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  if (address.tls === undefined) return `nbd://${host}:${address.port}/${exportPart}`;
  const tlsParts = formatTlsQuery(address.tls);
  return `nbds://${host}:${address.port}/${exportPart}${tlsParts.length > 0 ? `?${tlsParts.join('&')}` : ''}`;
}

/** Short human form for logs and error messages: 'unix:/path/sock' or 'host:port'. */
export function describeNbdAddress(address: NbdAddress): string {
  if (address.kind === 'unix') return `unix:${address.socketPath}`;
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  return `${host}:${address.port}`;
}
