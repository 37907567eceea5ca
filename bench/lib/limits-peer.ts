/**
 * Peer process for lib/limits.ts: listens on a Unix socket and serves exactly one
 * connection, then exits. Modes:
 *   sink  - count every byte received; on the client's end, reply with the count as a
 *           64-bit little-endian integer and close.
 *   echo  - write every received chunk straight back (ping-pong latency).
 * Prints "ready" on stdout once listening. Usage: node limits-peer.js <sink|echo> <socket>
 * Threads: its own process, main thread.
 */
import { createServer, type Socket } from 'node:net';
import { assert } from '../../src/core/assert.js';

const mode = process.argv[2];
const socketPath = process.argv[3];
assert(mode === 'sink' || mode === 'echo', 'mode must be sink or echo');
assert(socketPath !== undefined && socketPath.startsWith('/'), 'socket path must be absolute');

function serveSink(socket: Socket): void {
  let receivedBytes = 0;
  socket.on('data', (chunk: Buffer) => (receivedBytes += chunk.length));
  socket.on('end', () => {
    const reply = Buffer.alloc(8);
    reply.writeBigUInt64LE(BigInt(receivedBytes));
    socket.end(reply);
  });
}

function serveEcho(socket: Socket): void {
  socket.on('data', (chunk: Buffer) => socket.write(chunk));
  socket.on('end', () => socket.end());
}

const server = createServer((socket) => {
  server.close();
  socket.on('close', () => process.exit(0));
  if (mode === 'sink') serveSink(socket);
  else serveEcho(socket);
});
server.listen(socketPath, () => process.stdout.write('ready\n'));
