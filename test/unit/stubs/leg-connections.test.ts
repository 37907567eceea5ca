/**
 * ConnectionGroup (src/stubs/leg-connections.ts) over fake connections that answer when told:
 * requests go to the connection with the fewest pending (ties round robin), a FLUSH goes to
 * every connection and completes once, after the last answer, with the first error; the first
 * lost connection fires the group's onClose once; fence() holds only when every connection's
 * fence holds; every token completes exactly once (property over random request mixes and
 * answer orders). Also the leg URI's connections=N parameter (src/stubs/open-leg.ts).
 * Thread: test main thread.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { propertyRuns } from '../../helpers/runs.js';
import { noFeatures, type BlockDevice, type CompletionHandler, type Extent } from '../../../src/core/block-device.js';
import { EnbdError } from '../../../src/core/errors.js';
import * as p from '../../../src/nbd/protocol.js';
import { ConnectionGroup, type GroupMember } from '../../../src/stubs/leg-connections.js';
import { parseLegUri } from '../../../src/stubs/open-leg.js';

class FakeConnection implements GroupMember, BlockDevice {
  readonly sizeBytes = 1 << 20;
  readonly features = { ...noFeatures(), flush: true, multiConn: true };
  readonly blockSizes = { minimumBytes: 1, preferredBytes: 4096, maximumBytes: 1 << 20 };
  readonly description = 'fake';
  onClose: ((error: EnbdError | null) => void) | null = null;
  isConnected = true;
  readonly held: Array<{ command: number; token: number }> = [];
  fenceResult = true;
  fenced = 0;
  closed = 0;
  private handler: CompletionHandler = () => undefined;
  get inFlight(): number {
    return this.held.length;
  }
  setCompletionHandler(handler: CompletionHandler): void {
    this.handler = handler;
  }
  submit(command: number, _flags: number, _offset: number, _length: number, _data: Uint8Array | null, token: number): void {
    this.held.push({ command, token });
  }
  /** Answers the held request at `index` (default the oldest). */
  answer(errno = 0, index = 0): void {
    const [request] = this.held.splice(index, 1);
    assert.ok(request !== undefined, 'a held request to answer');
    this.handler(request.token, errno);
  }
  async getExtents(_offset: number, lengthBytes: number): Promise<Extent[]> {
    return [{ lengthBytes, flags: 0 }];
  }
  async fence(): Promise<boolean> {
    this.fenced += 1;
    return this.fenceResult;
  }
  async close(): Promise<void> {
    this.closed += 1;
  }
}

function groupOf(count: number): { group: ConnectionGroup; members: FakeConnection[]; completed: Array<[number, number]> } {
  const members = Array.from({ length: count }, () => new FakeConnection());
  const group = new ConnectionGroup(members);
  const completed: Array<[number, number]> = [];
  group.setCompletionHandler((token, errno) => completed.push([token, errno]));
  return { group, members, completed };
}

describe('ConnectionGroup', () => {
  test('requests go to the connection with the fewest pending; ties rotate', () => {
    const { group, members } = groupOf(3);
    for (let token = 0; token < 6; token += 1) group.submit(p.kCmdWrite, 0, token * 4096, 4096, new Uint8Array(4096), token);
    assert.deepEqual(members.map((member) => member.held.length), [2, 2, 2]);
    members[1]?.answer();
    members[1]?.answer();
    group.submit(p.kCmdRead, 0, 0, 4096, new Uint8Array(4096), 10);
    group.submit(p.kCmdRead, 0, 0, 4096, new Uint8Array(4096), 11);
    assert.deepEqual(members.map((member) => member.held.length), [2, 2, 2], 'both new requests went to the idle connection');
    assert.deepEqual(group.pendingPerConnection(), [2, 2, 2]);
    assert.equal(group.inFlight, 6);
  });

  test('FLUSH goes to every connection and completes once, after the last answer, with the first error', () => {
    const { group, members, completed } = groupOf(3);
    group.submit(p.kCmdFlush, 0, 0, 0, null, 7);
    assert.deepEqual(members.map((member) => member.held.map((request) => request.command)), [[p.kCmdFlush], [p.kCmdFlush], [p.kCmdFlush]]);
    members[2]?.answer(0);
    members[0]?.answer(p.kEIo);
    assert.deepEqual(completed, [], 'not complete while a connection has not answered');
    members[1]?.answer(0);
    assert.deepEqual(completed, [[7, p.kEIo]]);
    group.submit(p.kCmdFlush, 0, 0, 0, null, 7);
    for (const member of members) member.answer(0);
    assert.deepEqual(completed, [[7, p.kEIo], [7, 0]], 'the token is free again after its flush');
  });

  test('the first lost connection fires onClose once; fence holds only when every connection holds', async () => {
    const { group, members } = groupOf(3);
    const closes: Array<string | null> = [];
    group.onClose = (error) => closes.push(error === null ? null : error.message);
    members[1]?.onClose?.(new EnbdError('ENBD_ERR_CLOSED', 'lost one'));
    members[2]?.onClose?.(new EnbdError('ENBD_ERR_CLOSED', 'lost two'));
    assert.deepEqual(closes, ['lost one']);
    assert.equal(group.isConnected, false);
    (members[0] as FakeConnection).fenceResult = false;
    assert.equal(await group.fence(10), false);
    (members[0] as FakeConnection).fenceResult = true;
    assert.equal(await group.fence(10), true);
    assert.deepEqual(members.map((member) => member.fenced), [2, 2, 2]);
    await group.close();
    assert.deepEqual(members.map((member) => member.closed), [1, 1, 1]);
  });

  test('property: every token completes exactly once, whatever the mix and the answer order', () => {
    fc.assert(fc.property(
      fc.integer({ min: 1, max: 5 }),
      fc.array(fc.record({ flush: fc.boolean(), errno: fc.constantFrom(0, 0, 0, p.kEIo) }), { minLength: 1, maxLength: 60 }),
      fc.array(fc.nat(), { minLength: 1, maxLength: 200 }),
      (count, requests, picks) => {
        const { group, members, completed } = groupOf(count);
        const errnos = new Map<number, number>();
        requests.forEach((request, token) => {
          errnos.set(token, request.errno);
          if (request.flush) group.submit(p.kCmdFlush, 0, 0, 0, null, token);
          else group.submit(p.kCmdWrite, 0, 0, 4096, new Uint8Array(4096), token);
        });
        let step = 0;
        while (members.some((member) => member.held.length > 0)) {
          const busy = members.filter((member) => member.held.length > 0);
          const member = busy[(picks[step % picks.length] ?? 0) % busy.length] as FakeConnection;
          const index = (picks[(step + 1) % picks.length] ?? 0) % member.held.length;
          const token = member.held[index]?.token ?? -1;
          member.answer(errnos.get(token) ?? 0, index);
          step += 1;
        }
        assert.equal(completed.length, requests.length);
        assert.equal(new Set(completed.map(([token]) => token)).size, requests.length, 'each token once');
        for (const [token, errno] of completed) assert.equal(errno, errnos.get(token));
        assert.deepEqual(group.pendingPerConnection(), new Array<number>(count).fill(0));
      },
    ), { numRuns: propertyRuns(200) });
  });
});

describe('leg URI connections=N', () => {
  test('taken off the NBD URI, kept in the address; other query parameters stay', () => {
    const leg = parseLegUri('nbd+unix:///disk?socket=/run/leg.sock&connections=4');
    assert.equal(leg.kind, 'nbd');
    assert.ok(leg.kind === 'nbd');
    assert.equal(leg.connections, 4);
    assert.deepEqual(leg.address, { kind: 'unix', socketPath: '/run/leg.sock', exportName: 'disk' });
    const tcp = parseLegUri('nbd://host:10810/export?connections=2');
    assert.ok(tcp.kind === 'nbd' && tcp.connections === 2 && tcp.address.kind === 'tcp' && tcp.address.port === 10810);
    const plain = parseLegUri('nbd://host/export');
    assert.ok(plain.kind === 'nbd' && plain.connections === undefined);
  });

  test('out of range or not a number: a URI error naming the URI', () => {
    for (const bad of ['0', '17', 'x', '-1', '']) {
      assert.throws(() => parseLegUri(`nbd://host/export?connections=${bad}`), (error: unknown) =>
        error instanceof EnbdError && error.code === 'ENBD_ERR_URI' && error.message.includes(`connections=${bad}`) && /1\.\.16/.test(error.message));
    }
  });
});

describe('leg URI write-mostly=1', () => {
  test('taken off the NBD URI (nbd:// takes no other query), kept in the address; file: URIs too', () => {
    const tcp = parseLegUri('nbd://host:10810/export?write-mostly=1&connections=2');
    assert.ok(tcp.kind === 'nbd' && tcp.writeMostly === true && tcp.connections === 2 && tcp.address.kind === 'tcp' && tcp.address.exportName === 'export');
    const unix = parseLegUri('nbd+unix:///disk?socket=/run/leg.sock&write-mostly=0');
    assert.ok(unix.kind === 'nbd' && unix.writeMostly === false);
    assert.deepEqual(unix.address, { kind: 'unix', socketPath: '/run/leg.sock', exportName: 'disk' });
    const file = parseLegUri('file:///tmp/leg.img?write-mostly=1');
    assert.ok(file.kind === 'file' && file.path === '/tmp/leg.img' && file.writeMostly === true);
    assert.equal(parseLegUri('nbd://host/export').writeMostly, undefined);
    assert.equal(parseLegUri('/tmp/plain?write-mostly=1').writeMostly, undefined, 'a plain path has no query');
    assert.throws(() => parseLegUri('nbd://host/export?write-mostly=2'), (error: unknown) =>
      error instanceof EnbdError && error.code === 'ENBD_ERR_URI' && error.message.includes('write-mostly=2') && /0 or 1/.test(error.message));
  });
});
