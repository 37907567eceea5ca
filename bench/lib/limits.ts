/**
 * This machine's physical limits, printed beside the results so ratios can be read
 * against what the hardware allows: memcpy GB/s (Buffer.copy in a loop, 4 KiB and 1 MiB),
 * Unix-socket stream throughput between two Node processes (1 MiB writes), and Unix-socket
 * ping-pong round trips per second at 4 KiB, QD1 (the wake-up floor for small I/O).
 * About one second each (`durationMs`).
 * Threads: harness main thread plus one short-lived peer process (lib/limits-peer.ts).
 *
 * Back-of-envelope: memcpy is tens of GB/s for cache-resident 4 KiB, lower for 1 MiB;
 * a socket stream a few GB/s (two copies through the kernel); ping-pong 20-60 k/s on 2 vCPUs.
 */
import { spawn } from 'node:child_process';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { assert } from '../../src/core/assert.js';

const kKiB = 1024;
const kMiB = 1024 * kKiB;
const kCopiesPerClockCheck = 256;
const kStreamChunkBytes = kMiB;
const kPingPongBytes = 4 * kKiB;
const kPeerReadyTimeoutMs = 10_000;

export interface MachineLimits {
  memcpy4KiBGBPerSec: number;
  memcpy1MiBGBPerSec: number;
  unixStreamGBPerSec: number;
  unixPingPong4KiBPerSec: number;
}

/** GB/s (1e9 bytes) of Buffer.copy between two blockBytes buffers for about durationMs. */
export function measureMemcpy(blockBytes: number, durationMs: number): number {
  assert(blockBytes > 0 && durationMs > 0);
  const source = Buffer.alloc(blockBytes, 0x5a);
  const target = Buffer.alloc(blockBytes);
  const startMs = performance.now();
  let copies = 0;
  let nowMs = startMs;
  while (nowMs - startMs < durationMs) {
    for (let index = 0; index < kCopiesPerClockCheck; index++) source.copy(target, 0, 0, blockBytes);
    copies += kCopiesPerClockCheck;
    nowMs = performance.now();
  }
  assert(target[blockBytes - 1] === 0x5a, 'copy happened');
  return (copies * blockBytes) / ((nowMs - startMs) / 1000) / 1e9;
}

async function startPeer(mode: 'sink' | 'echo', socketPath: string): Promise<() => void> {
  const peerPath = join(fileURLToPath(new URL('.', import.meta.url)), 'limits-peer.js');
  const child = spawn(process.execPath, [peerPath, mode, socketPath], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise<void>((resolveReady, reject) => {
    const timer = setTimeout(() => reject(new Error('limits peer did not start')), kPeerReadyTimeoutMs);
    child.stdout.once('data', () => {
      clearTimeout(timer);
      resolveReady();
    });
    child.once('exit', (code) => reject(new Error(`limits peer exited ${String(code)}`)));
  });
  return () => child.kill('SIGKILL');
}

async function connectTo(socketPath: string): Promise<Socket> {
  return await new Promise((resolveSocket, reject) => {
    const socket = connect(socketPath, () => resolveSocket(socket));
    socket.once('error', reject);
  });
}

/** GB/s from this process to a sink process over a Unix socket, 1 MiB writes. */
export async function measureUnixStream(socketPath: string, durationMs: number): Promise<number> {
  const stopPeer = await startPeer('sink', socketPath);
  try {
    const socket = await connectTo(socketPath);
    const chunk = Buffer.alloc(kStreamChunkBytes, 0xa5);
    const startMs = performance.now();
    while (performance.now() - startMs < durationMs) {
      if (!socket.write(chunk)) await new Promise((resolveDrain) => socket.once('drain', resolveDrain));
    }
    const countReply = new Promise<Buffer>((resolveCount) => socket.once('data', resolveCount));
    socket.end();
    const reply = await countReply;
    const elapsedSec = (performance.now() - startMs) / 1000;
    assert(reply.length >= 8, 'sink replied with its byte count');
    return Number(reply.readBigUInt64LE(0)) / elapsedSec / 1e9;
  } finally {
    stopPeer();
  }
}

/** Round trips per second of a 4 KiB message to an echo process and back, one at a time. */
export async function measureUnixPingPong(socketPath: string, durationMs: number): Promise<number> {
  const stopPeer = await startPeer('echo', socketPath);
  try {
    const socket = await connectTo(socketPath);
    const message = Buffer.alloc(kPingPongBytes, 0x3c);
    let roundTrips = 0;
    let pendingBytes = 0;
    const startMs = performance.now();
    await new Promise<void>((resolveDone) => {
      socket.on('data', (chunk: Buffer) => {
        pendingBytes -= chunk.length;
        if (pendingBytes > 0) return;
        assert(pendingBytes === 0, 'echo returned exactly what was sent');
        roundTrips++;
        if (performance.now() - startMs >= durationMs) {
          resolveDone();
          return;
        }
        pendingBytes = kPingPongBytes;
        socket.write(message);
      });
      pendingBytes = kPingPongBytes;
      socket.write(message);
    });
    const elapsedSec = (performance.now() - startMs) / 1000;
    socket.destroy();
    return roundTrips / elapsedSec;
  } finally {
    stopPeer();
  }
}

export async function measureLimits(runDir: string, durationMs: number): Promise<MachineLimits> {
  return {
    memcpy4KiBGBPerSec: measureMemcpy(4 * kKiB, durationMs),
    memcpy1MiBGBPerSec: measureMemcpy(kMiB, durationMs),
    unixStreamGBPerSec: await measureUnixStream(join(runDir, 'limits-stream.sock'), durationMs),
    unixPingPong4KiBPerSec: await measureUnixPingPong(join(runDir, 'limits-pingpong.sock'), durationMs),
  };
}
