/**
 * CPU accounting of a process tree from /proc (Linux only): utime + stime of a root PID and
 * every live descendant, plus their cutime + cstime (children already reaped), in seconds.
 * /proc/PID/stat of a thread-group leader already sums all its threads, so worker threads
 * are included; child processes are found by scanning /proc for matching ppid.
 * Threads: harness main thread. Called twice per measurement window, never on a hot path.
 *
 * Invariants:
 * - A sample is a sum over the tree *as it is at sampling time*; a child that exits and is
 *   reaped by its parent between two samples moves into the parent's cutime, so the delta
 *   stays correct. A child re-parented to init is lost (documented limitation).
 * - Clock ticks per second come from `getconf CLK_TCK` once (100 on every Linux we know).
 */
import { readdirSync, readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { assert } from '../../src/core/assert.js';

const kDefaultClockTicksPerSecond = 100;
/** Field numbers (1-based, man proc(5)) counted from the field after the ")" of comm. */
const kStatFieldParentPid = 4;
const kStatFieldUserTicks = 14;
const kStatFieldSystemTicks = 15;
const kStatFieldChildUserTicks = 16;
const kStatFieldChildSystemTicks = 17;
/** comm is field 2; fields after it start at 3. */
const kStatFirstFieldAfterComm = 3;

let clockTicksPerSecondCached = 0;

export function clockTicksPerSecond(): number {
  if (clockTicksPerSecondCached === 0) {
    const result = spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' });
    const parsed = Number.parseInt(result.stdout ?? '', 10);
    const valid = Number.isInteger(parsed) && parsed > 0;
    clockTicksPerSecondCached = valid ? parsed : kDefaultClockTicksPerSecond;
  }
  assert(clockTicksPerSecondCached > 0);
  return clockTicksPerSecondCached;
}

export interface ProcStat {
  pid: number;
  parentPid: number;
  /** utime + stime + cutime + cstime, in clock ticks. */
  totalTicks: number;
}

/** Parses the text of /proc/PID/stat; returns null on anything unexpected. */
export function parseProcStat(pid: number, text: string): ProcStat | null {
  const commEnd = text.lastIndexOf(')');
  if (commEnd < 0) return null;
  const fields = text.slice(commEnd + 2).trim().split(' ');
  const field = (number: number): number => Number(fields[number - kStatFirstFieldAfterComm]);
  const parentPid = field(kStatFieldParentPid);
  const ticks = [
    kStatFieldUserTicks, kStatFieldSystemTicks, kStatFieldChildUserTicks, kStatFieldChildSystemTicks,
  ].map(field);
  if (!Number.isInteger(parentPid)) return null;
  if (ticks.some((tick) => !Number.isInteger(tick) || tick < 0)) return null;
  const totalTicks = ticks.reduce((sum, tick) => sum + tick, 0);
  return { pid, parentPid, totalTicks };
}

export function readProcStat(pid: number): ProcStat | null {
  assert(Number.isInteger(pid) && pid > 0, `pid must be a positive integer, got ${pid}`);
  try {
    return parseProcStat(pid, readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return null; // exited between listing and reading: not an error
  }
}

function allProcStats(): ProcStat[] {
  const stats: ProcStat[] = [];
  for (const entry of readdirSync('/proc')) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid <= 0) continue;
    const stat = readProcStat(pid);
    if (stat !== null) stats.push(stat);
  }
  return stats;
}

/** Every live process of the tree rooted at rootPid, root first (empty when the root is gone). */
export function processTree(rootPid: number): ProcStat[] {
  const stats = allProcStats();
  const root = stats.find((stat) => stat.pid === rootPid);
  if (root === undefined) return [];
  const tree: ProcStat[] = [root];
  const kMaxTreeSize = 4096; // bound: a runaway fork bomb must not hang the harness
  for (let index = 0; index < tree.length && tree.length < kMaxTreeSize; index++) {
    const parent = tree[index];
    assert(parent !== undefined);
    for (const stat of stats) if (stat.parentPid === parent.pid) tree.push(stat);
  }
  assert(tree[0]?.pid === rootPid);
  return tree;
}

export function descendantPids(rootPid: number): number[] {
  return processTree(rootPid).slice(1).map((stat) => stat.pid);
}

/** CPU seconds consumed so far by the trees rooted at rootPids (sum); NaN if all are gone. */
export function treeCpuSeconds(rootPids: readonly number[]): number {
  assert(rootPids.length > 0, 'treeCpuSeconds needs at least one pid');
  let ticks = 0;
  let found = false;
  for (const rootPid of rootPids) {
    for (const stat of processTree(rootPid)) {
      ticks += stat.totalTicks;
      found = true;
    }
  }
  return found ? ticks / clockTicksPerSecond() : Number.NaN;
}
