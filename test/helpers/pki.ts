/**
 * Test PKI: a CA, a server certificate (CN=localhost, SAN localhost and 127.0.0.1) and a client
 * certificate, written with openssl into a directory laid out the way nbdkit and libnbd look
 * for them (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem).
 * Keys are P-256 (fast to generate; GnuTLS, OpenSSL and qemu all accept them).
 *
 * Threads: test process main thread (synchronous openssl runs, a few tens of ms each).
 * Invariants: every file exists when makePki returns; key files are mode 0600.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

function openssl(args: string[], cwd: string): void {
  const result = spawnSync('openssl', args, { cwd, encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`openssl ${args.join(' ')} failed: ${result.stderr}`);
}

const kKeyArgs = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

/**
 * Creates DIR with a fresh CA and certificates signed by it; returns DIR. `serverDays` /
 * `clientDays` 0 make a certificate whose notAfter is now (expired a second later).
 */
export function makePki(dir: string, options: { serverHost?: string; days?: number; serverDays?: number; clientDays?: number } = {}): string {
  mkdirSync(dir, { recursive: true });
  const days = String(options.days ?? 30);
  const host = options.serverHost ?? 'localhost';
  openssl(['req', '-x509', ...kKeyArgs, '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', days, '-subj', '/CN=enbd test CA'], dir);
  writeFileSync(join(dir, 'server.cnf'), `subjectAltName=DNS:${host},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n`);
  writeFileSync(join(dir, 'client.cnf'), 'extendedKeyUsage=clientAuth\n');
  for (const [role, cn] of [['server', host], ['client', 'enbd test client']] as const) {
    openssl(['req', ...kKeyArgs, '-keyout', `${role}-key.pem`, '-out', `${role}.csr`, '-subj', `/CN=${cn}`], dir);
    const roleDays = String((role === 'server' ? options.serverDays : options.clientDays) ?? days);
    openssl(['x509', '-req', '-in', `${role}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${role}-cert.pem`, '-days', roleDays, '-extfile', `${role}.cnf`], dir);
    chmodSync(join(dir, `${role}-key.pem`), 0o600);
  }
  chmodSync(join(dir, 'ca-key.pem'), 0o600);
  return dir;
}
