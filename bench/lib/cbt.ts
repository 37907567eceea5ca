/**
 * Changed-block tracking costs and gains (issue 17, "Performance"), one run side by side:
 * - write path: 4 KiB random writes QD32 on one 2-leg `enbd mirror` (nbdkit memory legs,
 *   --metadata none) with no checkpoint, one and four active checkpoints; rounds interleave the
 *   three settings on the same daemon (checkpoints created/removed over the control socket).
 *   Target: one and four checkpoints >= 0.9x of none. Estimate: a mark is one DirtyMap
 *   markRange per checkpoint (a lock word CAS, a page lookup, a bit or): well under 1 us
 *   against ~30 us per request, so ~1.0x.
 * - backup: a 4 GiB 1-leg mirror filled with nbdkit pattern data, a checkpoint, then 1 % of
 *   its 64 KiB chunks rewritten at random; `enbd backup --since` of the changed extents (in
 *   process: runBackup, and the CLI's wall time with Node's start) vs a full `nbdcopy` of the
 *   export to a file. Target >= 20x. Estimate: 41 MiB vs 4 GiB is 100x less data; the backup's
 *   656 reads of 64 KiB and its control calls cost a few ms each way, so 20-60x in process.
 * Threads: harness main thread; the servers, fio and nbdcopy are child processes.
 * Invariants: every process started here is stopped before the phase returns; a failure is a
 * result with an error, never a throw out of runCbtBench.
 */
import { existsSync, mkdirSync, rmSync, statSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { ControlClient } from '../../src/control/client.js';
import { NbdClient } from '../../src/nbd/client/client.js';
import { runBackup } from '../../src/cli/backup.js';
import { runFio } from './fio.js';
import { runTool, startProcess, type ManagedProcess } from './proc.js';
import { kWorkloads } from './workloads.js';

const kMiB = 1024 * 1024;
const kChunkBytes = 64 * 1024;

export interface CbtWriteRow {
  checkpoints: number;
  iops: number[];
  medianIops: number;
  ratio: number | null;
}

export interface CbtResults {
  source: string;
  writePath: CbtWriteRow[];
  backup: {
    deviceBytes: number;
    changedBytes: number;
    backupMs: number;
    backupCliMs: number;
    fullCopyMs: number;
    ratio: number;
    cliRatio: number;
    /** `enbd backup --timings`'s line: the CLI's phases (ms since its start) and counts. */
    cliTimings: string | null;
  } | null;
  error: string | null;
}

export interface CbtBenchOptions {
  runDir: string;
  distRoot: string;
  rounds: number;
  runtimeSec: number;
  rampSec: number;
  sizeBytes: number;
  backupDeviceBytes: number;
  /** false: skip the randwrite part (--no-cbt-writes), only the backup. */
  writePath?: boolean;
  log: (line: string) => void;
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor((sorted.length - 1) / 2)] ?? 0;
}

async function startLeg(dir: string, name: string, sizeBytes: number, started: ManagedProcess[]): Promise<string> {
  const socketPath = join(dir, `${name}.sock`);
  started.push(await startProcess({ label: name, command: 'nbdkit', args: ['-f', '--exit-with-parent', '-U', socketPath, 'memory', String(sizeBytes)], socketPath, role: 'leg', logPath: join(dir, `${name}.log`) }));
  return `nbd+unix:///?socket=${socketPath}`;
}

async function startEnbd(options: CbtBenchOptions, dir: string, name: string, legs: string[], started: ManagedProcess[]): Promise<{ uri: string; control: string }> {
  const socketPath = join(dir, `${name}.sock`);
  const control = `${socketPath}.ctl`;
  const args = [join(options.distRoot, 'src/cli/main.js'), 'mirror', ...legs.flatMap((leg) => ['--leg', leg]), '--metadata', 'none', '-U', socketPath, '--control', control, '--log-level', 'warn'];
  started.push(await startProcess({ label: name, command: process.execPath, args, socketPath, role: 'server', logPath: join(dir, `${name}.log`) }));
  // The control socket is bound right after the export's.
  for (let waited = 0; !existsSync(control); waited += 50) {
    if (waited > 10_000) throw new Error(`${name}: no control socket ${control}`);
    await sleep(50);
  }
  return { uri: `nbd+unix:///?socket=${socketPath}`, control };
}

async function setCheckpoints(control: string, count: number): Promise<void> {
  const client = await ControlClient.connect(control);
  try {
    const listed = await client.call('checkpoint.list');
    for (const view of listed.checkpoints) await client.call('checkpoint.remove', { name: view.name });
    for (let index = 0; index < count; index += 1) await client.call('checkpoint.create', { name: `bench${index}` });
  } finally {
    client.close();
  }
}

async function writePath(options: CbtBenchOptions, dir: string, started: ManagedProcess[]): Promise<CbtWriteRow[]> {
  const legs = [await startLeg(dir, 'wleg0', options.sizeBytes, started), await startLeg(dir, 'wleg1', options.sizeBytes, started)];
  const mirror = await startEnbd(options, dir, 'wmirror', legs, started);
  const workload = kWorkloads.find((entry) => entry.name === 'randwrite-4k-qd32');
  if (workload === undefined) throw new Error('workload randwrite-4k-qd32 missing');
  const settings = [0, 1, 4];
  const iops = new Map<number, number[]>(settings.map((count) => [count, []]));
  for (let round = 0; round < options.rounds; round += 1) {
    const order = round % 2 === 0 ? settings : [...settings].reverse();
    for (const count of order) {
      await setCheckpoints(mirror.control, count);
      const result = await runFio(workload, { uri: mirror.uri, runtimeSec: options.runtimeSec, rampSec: options.rampSec, sizeBytes: options.sizeBytes, outputPath: join(dir, `fio-${count}-${round}.json`) });
      iops.get(count)?.push(result.iops);
      options.log(`cbt: randwrite-4k-qd32 with ${count} checkpoint(s), round ${round + 1}: ${Math.round(result.iops)} IOPS`);
    }
  }
  const none = median(iops.get(0) ?? []);
  return settings.map((count) => {
    const values = iops.get(count) ?? [];
    const medianIops = median(values);
    return { checkpoints: count, iops: values, medianIops, ratio: none > 0 ? medianIops / none : null };
  });
}

async function backup(options: CbtBenchOptions, dir: string, started: ManagedProcess[]): Promise<NonNullable<CbtResults['backup']>> {
  const deviceBytes = options.backupDeviceBytes;
  const leg = await startLeg(dir, 'bleg0', deviceBytes, started);
  const mirror = await startEnbd(options, dir, 'bmirror', [leg], started);
  const fill = await runTool('nbdcopy', ['--', '[', 'nbdkit', 'pattern', String(deviceBytes), ']', mirror.uri], 600_000);
  if (fill.status !== 0) throw new Error(`filling the device failed: ${fill.output}`);
  await setCheckpoints(mirror.control, 0);
  const control = await ControlClient.connect(mirror.control);
  try {
    await control.call('checkpoint.create', { name: 'b1' });
    // 1 % of the 64 KiB chunks, at random, rewritten.
    const chunks = deviceBytes / kChunkBytes;
    const picked = new Set<number>();
    while (picked.size < Math.round(chunks / 100)) picked.add(Math.floor(Math.random() * chunks));
    const client = await NbdClient.connect(mirror.uri);
    const data = Buffer.alloc(kChunkBytes, 0x5a);
    const list = [...picked];
    for (let at = 0; at < list.length; at += 32) await Promise.all(list.slice(at, at + 32).map(async (chunk) => await client.write(chunk * kChunkBytes, data)));
    await client.flush();
    await client.disconnect();
    const incremental = join(dir, 'inc.img');
    let startedAt = performance.now();
    const manifest = await runBackup(control, { since: 'b1', to: incremental, newCheckpoint: 'b2', uri: mirror.uri, control: mirror.control });
    const backupMs = performance.now() - startedAt;
    options.log(`cbt: in-process backup: ${manifest.extents.length} extents, ${backupMs.toFixed(0)} ms`);
    // Again through the CLI (Node's start included), from b2 after the same changes again.
    for (let at = 0; at < list.length; at += 32) {
      const again = await NbdClient.connect(mirror.uri);
      await Promise.all(list.slice(at, at + 32).map(async (chunk) => await again.write(chunk * kChunkBytes, data)));
      await again.disconnect();
    }
    startedAt = performance.now();
    const cli = await runTool(process.execPath, [join(options.distRoot, 'src/cli/main.js'), 'backup', '--since', 'b2', '--to', join(dir, 'inc2.img'), '--new-checkpoint', 'b3', '--control', mirror.control, '--timings'], 300_000);
    const backupCliMs = performance.now() - startedAt;
    if (cli.status !== 0) throw new Error(`enbd backup failed: ${cli.output}`);
    const cliTimings = /timings \(ms since the process started\): (.*)$/m.exec(cli.output)?.[1] ?? null;
    options.log(`cbt: enbd backup --timings: ${cliTimings ?? '(none printed)'}`);
    const fullPath = join(dir, 'full.img');
    startedAt = performance.now();
    // --flush: the full copy is made durable too, as enbd backup syncs its file.
    const full = await runTool('nbdcopy', ['--flush', mirror.uri, fullPath], 600_000);
    const fullCopyMs = performance.now() - startedAt;
    if (full.status !== 0) throw new Error(`nbdcopy failed: ${full.output}`);
    if (statSync(fullPath).size !== deviceBytes) throw new Error('nbdcopy wrote a short file');
    rmSync(fullPath, { force: true });
    options.log(`cbt: backup of ${manifest.changedBytes} changed bytes: ${backupMs.toFixed(0)} ms (CLI ${backupCliMs.toFixed(0)} ms); full nbdcopy ${fullCopyMs.toFixed(0)} ms`);
    return { deviceBytes, changedBytes: manifest.changedBytes, backupMs, backupCliMs, fullCopyMs, ratio: fullCopyMs / backupMs, cliRatio: fullCopyMs / backupCliMs, cliTimings };
  } finally {
    control.close();
  }
}

export async function runCbtBench(options: CbtBenchOptions): Promise<CbtResults> {
  const dir = join(options.runDir, 'cbt');
  mkdirSync(dir, { recursive: true });
  const started: ManagedProcess[] = [];
  const results: CbtResults = { source: 'issue 17: changed-block tracking (Performance)', writePath: [], backup: null, error: null };
  try {
    if (options.writePath !== false) results.writePath = await writePath(options, dir, started);
    for (const process of started.splice(0).reverse()) await process.stop();
    results.backup = await backup(options, dir, started);
  } catch (error) {
    results.error = error instanceof Error ? error.message : String(error);
    options.log(`cbt: ${results.error}`);
  } finally {
    for (const process of started.reverse()) await process.stop();
    rmSync(dir, { recursive: true, force: true });
  }
  return results;
}

export function cbtBlock(results: CbtResults): string {
  const lines = [`changed-block tracking (${results.source})`];
  for (const row of results.writePath) {
    lines.push(`  randwrite-4k-qd32, ${row.checkpoints} checkpoint(s): ${Math.round(row.medianIops)} IOPS${row.ratio === null ? '' : `  ${row.ratio.toFixed(2)}x of none (target >= 0.9x)`}`);
  }
  const b = results.backup;
  if (b !== null) {
    lines.push(`  backup of ${(b.changedBytes / kMiB).toFixed(1)} MiB changed of ${(b.deviceBytes / kMiB / 1024).toFixed(1)} GiB: ${b.backupMs.toFixed(0)} ms in process, ${b.backupCliMs.toFixed(0)} ms as enbd backup (Node start included); full nbdcopy ${b.fullCopyMs.toFixed(0)} ms`);
    lines.push(`  backup vs full copy: ${b.ratio.toFixed(1)}x in process, ${b.cliRatio.toFixed(1)}x with the CLI's start (target >= 20x)`);
    if (b.cliTimings !== null) lines.push(`  enbd backup phases (ms since its start): ${b.cliTimings}`);
  }
  if (results.error !== null) lines.push(`  error: ${results.error}`);
  return lines.join('\n');
}
