/**
 * Where a verify's CPU goes, per thread (issue 14, "Performance of verify"): two `nbdkit memory`
 * legs filled from `nbdkit pattern`, one mirror in this process, an untimed 64 MiB warm-up
 * verify, then `--reps` timed verifies of the whole device; for each: MiB/s, this process's CPU
 * per GiB of device (user + system), the legs' CPU per GiB, and every thread's CPU per GiB from
 * /proc/self/task/TID/stat (main first, then V8/libuv helpers, leg actors, hash workers, in
 * creation order). nbdcopy leg0 -> null: before and after is the anchor, as in lib/verify.ts.
 * Run: node dist/bench/verify-threads.bench.js [--size-mib N] [--reps N] [--threads N]
 * (never run by tests; Linux only). Another build: ENBD_TREE=/abs/dist (its src/ is imported).
 * Threads: harness main thread; the mirror's actors and pool on worker threads.
 *
 * Invariants:
 * - The legs are stopped and the run directory removed before exit, also on errors.
 * - A verify that checks fewer bytes than the device or finds a mismatch is reported as such.
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pino } from 'pino';
import { startNbdkitLeg } from './lib/legs.js';
import { runTool, type ManagedProcess } from './lib/proc.js';
import { unixUri } from './lib/case.js';
import { treeCpuSeconds } from './lib/cpu.js';

const kGiB = 1024 ** 3;
const kToolTimeoutMs = 600_000;

interface Options {
  sizeMiB: number;
  reps: number;
  threads: number;
}

function parse(argv: readonly string[]): Options {
  const options: Options = { sizeMiB: 1024, reps: 2, threads: 2 };
  for (let at = 0; at < argv.length; at += 2) {
    const value = Number(argv[at + 1]);
    if (!Number.isInteger(value) || value < 1) throw new Error(`${argv[at] ?? ''} needs a positive integer`);
    if (argv[at] === '--size-mib') options.sizeMiB = value;
    else if (argv[at] === '--reps') options.reps = value;
    else if (argv[at] === '--threads') options.threads = value;
    else throw new Error(`unknown option ${argv[at] ?? ''}`);
  }
  return options;
}

/** CPU ticks (utime + stime) of every thread of this process. */
function threadTicks(): Map<string, { name: string; ticks: number }> {
  const threads = new Map<string, { name: string; ticks: number }>();
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      const text = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
      const name = text.slice(text.indexOf('(') + 1, text.lastIndexOf(')'));
      const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
      threads.set(tid, { name, ticks: Number(fields[11]) + Number(fields[12]) });
    } catch {
      // the thread ended between the listing and the read
    }
  }
  return threads;
}

async function main(): Promise<void> {
  const options = parse(process.argv.slice(2));
  const tree = process.env.ENBD_TREE ?? new URL('..', import.meta.url).pathname;
  const { MirrorDevice } = (await import(join(tree, 'src/engine/mirror.js'))) as typeof import('../src/engine/mirror.js');
  const entries = (await import(join(tree, 'src/cli/actor-entry.js'))) as typeof import('../src/cli/actor-entry.js');
  const sizeBytes = options.sizeMiB * 1024 * 1024;
  const runDir = mkdtempSync(join(tmpdir(), 'enbd-verify-threads-'));
  const legs: ManagedProcess[] = [];
  try {
    const sockets = [join(runDir, 'leg0.sock'), join(runDir, 'leg1.sock')];
    for (const [index, socket] of sockets.entries()) legs.push(await startNbdkitLeg(runDir, `leg${index}`, socket, ['memory', String(sizeBytes)]));
    const pattern = await startNbdkitLeg(runDir, 'pattern', join(runDir, 'pattern.sock'), ['pattern', String(sizeBytes)]);
    await Promise.all(sockets.map(async (socket) => await runTool('nbdcopy', [unixUri(join(runDir, 'pattern.sock')), unixUri(socket)], kToolTimeoutMs)));
    await pattern.stop();
    const legPids = legs.map((leg) => leg.pid);
    const anchor = async (): Promise<number> => (await runTool('nbdcopy', [unixUri(sockets[0] as string), 'null:'], kToolTimeoutMs)).wallMs;
    const anchorMs = [await anchor()];
    const logger = pino({ level: 'warn' }, pino.destination({ dest: join(runDir, 'mirror.log'), sync: true }));
    const mirror = await MirrorDevice.open({
      legs: sockets.map((socket) => unixUri(socket)), actorEntry: entries.kConnectionActorEntry, logger, logLevel: 'warn',
      verify: { threads: options.threads, algorithm: 'xxh64', workerEntry: entries.kHashWorkerEntry },
    });
    const rows: string[] = [];
    try {
      mirror.startVerify({ lengthBytes: Math.min(64 * 1024 * 1024, sizeBytes) });
      await mirror.verifyDone();
      for (let rep = 0; rep < options.reps; rep += 1) {
        const before = threadTicks();
        const cpu = process.cpuUsage();
        const legsBefore = treeCpuSeconds(legPids);
        const startedAt = performance.now();
        mirror.startVerify({});
        await mirror.verifyDone();
        const wallMs = performance.now() - startedAt;
        const used = process.cpuUsage(cpu);
        const legsCpu = treeCpuSeconds(legPids) - legsBefore;
        const after = threadTicks();
        const gib = sizeBytes / kGiB;
        const progress = mirror.verifyStatus().current;
        const checked = progress !== null && progress.bytesChecked === sizeBytes && progress.mismatchChunks === 0;
        const perThread = [...after].map(([tid, now]) => ({ name: now.name, perGiB: (now.ticks - (before.get(tid)?.ticks ?? 0)) / 100 / gib }))
          .filter((thread) => thread.perGiB >= 0.02).map((thread) => `${thread.name}:${thread.perGiB.toFixed(2)}`).join(' ');
        rows.push(`verify ${(sizeBytes / 2 ** 20 / (wallMs / 1000)).toFixed(0)} MiB/s, enbd CPU ${((used.user + used.system) / 1e6 / gib).toFixed(2)} s/GiB (user ${(used.user / 1e6 / gib).toFixed(2)}), legs ${(legsCpu / gib).toFixed(2)} s/GiB${checked ? '' : ', NOT all checked equal'}\n  threads (s/GiB): ${perThread}`);
      }
    } finally {
      await mirror.close();
      logger.flush();
    }
    anchorMs.push(await anchor());
    const meanMs = (anchorMs[0] as number + (anchorMs[1] as number)) / 2;
    process.stdout.write(`${options.sizeMiB} MiB, ${options.threads} pool threads; anchor nbdcopy leg0 null: ${(options.sizeMiB / (meanMs / 1000)).toFixed(0)} MiB/s (${anchorMs.map((ms) => ms.toFixed(0)).join(', ')} ms)\n${rows.join('\n')}\n`);
  } finally {
    await Promise.all(legs.map(async (leg) => await leg.stop()));
    rmSync(runDir, { recursive: true, force: true });
  }
}

await main();
