/**
 * Several connections per leg (issue 15) against real nbdkit legs that serialise requests per
 * connection (`--filter=noparallel serialize=requests`, multi-conn advertised), each behind
 * nbdkit's log filter, so the test sees which connection carried which request:
 * - `legConnections: 4` (and a leg URI's `connections=2`): the leg opens that many
 *   connections, a burst of writes reaches every one of them, a client FLUSH reaches every
 *   connection of every leg, and the bytes read back through the mirror and from each leg's
 *   file equal what was written.
 * - A leg over several connections that dies (SIGKILL) mid-writes degrades as one unit, comes
 *   back over the same number of connections, resyncs, and the legs end byte-identical.
 * - `enbd mirror --leg-connections 4` on a leg without multi-conn (nbdkit's multi-conn filter,
 *   mode disable): one connection, a log line saying why, and the data still right.
 * Only correctness is asserted, never time (the speed-up is the bench's --legconn-only phase).
 * Threads: test main thread (an in-process mirror with actor workers; one CLI mirror).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { NbdClient } from '../../src/nbd/client/client.js';
import { startInProcessMirror, startMirror, stopAllMirrors } from '../helpers/mirror.js';
import { requires, scratch, startNbdkit, unixUri, waitFor, type Child, type Scratch } from '../helpers/tools.js';

const kMiB = 1024 * 1024;
const kLegBytes = 16 * kMiB;
const kBlock = 4096;

let dir: Scratch;

before(() => {
  dir = scratch('enbd-legconn-');
});

after(async () => {
  await stopAllMirrors();
  dir.cleanup();
});

interface LoggedLeg {
  child: Child;
  socket: string;
  image: string;
  log: string;
  uri: string;
}

/** An nbdkit file leg serialising per connection, with the log filter (and extra filters). */
async function startLeg(name: string, options: { multiConn?: boolean; fresh?: boolean; query?: string; logName?: string } = {}): Promise<LoggedLeg> {
  const image = dir.path(`${name}.img`);
  const log = dir.path(`${options.logName ?? name}.log`);
  if (options.fresh !== false) writeFileSync(image, Buffer.alloc(kLegBytes));
  const socket = dir.path(`${name}.sock`);
  const filters = ['--filter=log', '--filter=noparallel'];
  if (options.multiConn === false) filters.push('--filter=multi-conn');
  const params = [`logfile=${log}`, 'serialize=requests', ...(options.multiConn === false ? ['multi-conn-mode=disable'] : [])];
  const child = await startNbdkit(socket, ['file', image, ...params], filters);
  return { child, socket, image, log, uri: `${unixUri(socket)}${options.query ?? ''}` };
}

interface LogSummary {
  /** Connection ids that connected (the mirror's handshakes). */
  connected: Set<number>;
  writesBy: Map<number, number>;
  flushesBy: Map<number, number>;
}

/** Reads nbdkit's log filter output: "connection=N Connect ..." and "connection=N Write id=..." lines. */
function summarise(logPath: string): LogSummary {
  const summary: LogSummary = { connected: new Set(), writesBy: new Map(), flushesBy: new Map() };
  for (const line of readFileSync(logPath, 'utf8').split('\n')) {
    const match = /connection=(\d+) (Connect|Write|Flush) /.exec(line);
    if (match === null) continue;
    const id = Number(match[1]);
    if (match[2] === 'Connect') summary.connected.add(id);
    else if (match[2] === 'Write') summary.writesBy.set(id, (summary.writesBy.get(id) ?? 0) + 1);
    else summary.flushesBy.set(id, (summary.flushesBy.get(id) ?? 0) + 1);
  }
  return summary;
}

/** `count` random 4 KiB-aligned writes, all in flight at once; the model keeps the bytes. */
async function burst(client: NbdClient, model: Buffer, count: number): Promise<void> {
  await Promise.all(Array.from({ length: count }, async () => {
    const blocks = 1 + Math.floor(Math.random() * 4);
    const offset = Math.floor(Math.random() * (kLegBytes / kBlock - blocks)) * kBlock;
    const data = randomBytes(blocks * kBlock);
    data.copy(model, offset);
    await client.write(offset, data);
  }));
}

function assertSame(actual: Buffer, expected: Buffer, what: string): void {
  if (actual.equals(expected)) return;
  let at = 0;
  while (at < expected.length && actual[at] === expected[at]) at += 1;
  assert.fail(`${what}: first difference at byte ${at}`);
}

describe('several connections per leg', () => {
  test('connections per leg from the option and the URI; writes spread, FLUSH on every connection, bytes right', async (t) => {
    if (!requires(t, 'nbdkit')) return;
    const legs = [await startLeg('spread-0'), await startLeg('spread-1', { query: '&connections=2' })];
    const mirror = await startInProcessMirror({
      legs: legs.map((leg) => leg.uri), socketPath: dir.path('spread.sock'), engine: { legConnections: 4 },
    });
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      await burst(client, model, 48);
      await client.flush();
      const summaries = legs.map((leg) => summarise(leg.log));
      assert.equal(summaries[0]?.connected.size, 4, 'leg 0: --leg-connections 4');
      assert.equal(summaries[1]?.connected.size, 2, 'leg 1: its URI says connections=2');
      for (const [index, summary] of summaries.entries()) {
        for (const id of summary.connected) {
          assert.ok((summary.writesBy.get(id) ?? 0) > 0, `leg ${index}: connection ${id} carried writes (${JSON.stringify([...summary.writesBy])})`);
          assert.ok((summary.flushesBy.get(id) ?? 0) > 0, `leg ${index}: connection ${id} got the FLUSH (${JSON.stringify([...summary.flushesBy])})`);
        }
      }
      assertSame(await client.read(0, kLegBytes), model, 'read back through the mirror');
      for (const [index, leg] of legs.entries()) assertSame(readFileSync(leg.image), model, `leg ${index} file`);
    } finally {
      await client.close();
      await mirror.close();
      for (const leg of legs) await leg.child.stop();
    }
  });

  test('a leg over several connections dies mid-writes: it degrades as one unit, returns over as many, resyncs, legs identical', async (t) => {
    if (!requires(t, 'nbdkit')) return;
    const legs = [await startLeg('die-0'), await startLeg('die-1')];
    const mirror = await startInProcessMirror({
      legs: legs.map((leg) => leg.uri), socketPath: dir.path('die.sock'),
      engine: { legConnections: 3, reconnectMinMs: 100, reconnectMaxMs: 200 },
    });
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      await burst(client, model, 24);
      const dying = legs[1] as LoggedLeg;
      const writes = burst(client, model, 48);
      await dying.child.stop('SIGKILL');
      await writes;
      await waitFor('leg 1 leaves the in-sync state', () => mirror.device.legStatus()[1]?.state !== 'in-sync', 20_000);
      // The same image, a new nbdkit (and a new log): the leg returns over three connections again.
      legs[1] = await startLeg('die-1', { fresh: false, logName: 'die-1-again' });
      await burst(client, model, 24);
      await waitFor('both legs in sync', () => mirror.device.legStatus().every((leg) => leg.state === 'in-sync'), 60_000);
      await client.flush();
      assert.equal(summarise((legs[1] as LoggedLeg).log).connected.size, 3, 'leg 1 came back over three connections');
      assertSame(await client.read(0, kLegBytes), model, 'read back through the mirror');
      for (const [index, leg] of legs.entries()) assertSame(readFileSync(leg.image), model, `leg ${index} file after the resync`);
    } finally {
      await client.close();
      await mirror.close();
      for (const leg of legs) await leg.child.stop();
    }
  });

  test('enbd mirror --leg-connections 4 on a leg without multi-conn: one connection, a log line why, bytes right', async (t) => {
    if (!requires(t, 'nbdkit')) return;
    const legs = [await startLeg('single-0', { multiConn: false }), await startLeg('single-1')];
    const mirror = await startMirror({
      legs: legs.map((leg) => leg.uri), socketPath: dir.path('single.sock'), args: ['--leg-connections', '4'], logLevel: 'info',
    });
    const client = await NbdClient.connect(mirror.uri);
    const model = Buffer.alloc(kLegBytes);
    try {
      await burst(client, model, 32);
      await client.flush();
      assert.equal(summarise((legs[0] as LoggedLeg).log).connected.size, 1, 'no multi-conn: one connection');
      assert.equal(summarise((legs[1] as LoggedLeg).log).connected.size, 4, 'multi-conn: four connections');
      assert.match(mirror.stderr() + mirror.stdout(), /does not advertise multi-conn/);
      assertSame(await client.read(0, kLegBytes), model, 'read back through the mirror');
      for (const [index, leg] of legs.entries()) assertSame(readFileSync(leg.image), model, `leg ${index} file`);
    } finally {
      await client.close();
      await mirror.stop();
      for (const leg of legs) await leg.child.stop();
    }
  });
});
