/**
 * The rig of the online-verify interop tests (verify.test.ts, verify-load.test.ts): nbdkit file
 * legs in a scratch folder, `enbd mirror` processes over them with a control socket, a direct
 * control connection per mirror (the CLI costs a process a call), bytes scribbled on a leg's
 * file behind the mirror's back, and waiting for a verify to end.
 * Threads: test process main thread; nbdkit and the daemon are child processes.
 *
 * Design notes
 * - One rig per describe block: `before` makes it, `after` closes it (control connections,
 *   then every mirror, then the legs, then the folder).
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import type { StatusResult, VerifyProgressView } from '../../src/control/protocol.js';
import { ControlClient } from '../../src/control/client.js';
import { scratch, type Scratch } from './tools.js';
import { startMirror, stopAllMirrors, type MirrorProcess } from './mirror.js';
import { FileLeg } from './meta-legs.js';
import { MirrorControl } from './fault-legs.js';

/** Writes `bytes` into a leg's file directly (the mirror does not see it). */
export function scribble(leg: FileLeg, offsetBytes: number, bytes: Buffer): void {
  const fd = openSync(leg.file, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offsetBytes);
  } finally {
    closeSync(fd);
  }
}

export class VerifyRig {
  readonly dir: Scratch;
  private readonly legs: FileLeg[] = [];
  private seq = 0;
  private readonly clients = new Map<MirrorControl, ControlClient>();

  constructor(prefix: string) {
    this.dir = scratch(prefix);
  }

  /** nbdkit file legs whose files all start as `contents`. */
  async fileLegs(count: number, contents: Buffer): Promise<FileLeg[]> {
    const made: FileLeg[] = [];
    for (let index = 0; index < count; index += 1) {
      this.seq += 1;
      const leg = new FileLeg(this.dir.path(`leg${this.seq}.img`), this.dir.path(`leg${this.seq}.sock`));
      writeFileSync(leg.file, contents);
      await leg.start();
      this.legs.push(leg);
      made.push(leg);
    }
    return made;
  }

  /** `enbd mirror` over `uris` with a control socket (and a direct control connection). */
  async mirrorOf(uris: string[], extra: string[] = []): Promise<{ mirror: MirrorProcess; control: MirrorControl }> {
    this.seq += 1;
    const controlPath = this.dir.path(`m${this.seq}.ctl`);
    const mirror = await startMirror({ legs: uris, socketPath: this.dir.path(`m${this.seq}.sock`), args: ['--control', controlPath, ...extra] });
    const control = await MirrorControl.connect(controlPath);
    this.clients.set(control, await ControlClient.connect(controlPath));
    return { mirror, control };
  }

  /** The direct control connection of a mirror made by mirrorOf. */
  client(control: MirrorControl): ControlClient {
    return this.clients.get(control) as ControlClient;
  }

  async waitVerifyDone(control: MirrorControl, timeoutMs = 40_000): Promise<VerifyProgressView> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const status: StatusResult = await control.status();
      const current = status.verify?.current ?? null;
      if (current !== null && !current.running) return current;
      if (Date.now() > deadline) assert.fail(`verify did not finish within ${timeoutMs} ms: ${JSON.stringify(current)}`);
      await sleep(50);
    }
  }

  /** verify.start over the control socket (what the CLI sends), then waits for it to end. */
  async verify(control: MirrorControl, params: Record<string, number | boolean> = {}): Promise<VerifyProgressView> {
    const started = await this.client(control).call('verify.start', params);
    assert.equal(started.running, true);
    return await this.waitVerifyDone(control);
  }

  async close(): Promise<void> {
    for (const client of this.clients.values()) client.close();
    await stopAllMirrors();
    await Promise.all(this.legs.map(async (leg) => await leg.stop()));
    this.dir.cleanup();
  }
}
