/**
 * The benchmark case seam: a case is a named server setup (a file in bench/cases/ exports one
 * case, or a list of cases, as its default) that the harness starts, measures and stops.
 * Cases are discovered by listing the compiled bench/cases/ directory, so adding a case
 * means adding one file; nothing else changes.
 * Threads: harness main thread.
 *
 * Invariants:
 * - A case spawns processes only through `context.spawn`, so the harness owns their PIDs,
 *   logs, CPU accounting and shutdown. Processes spawned with role 'server' are the ones
 *   whose CPU is reported (a mirror's legs are role 'leg').
 * - `unavailableReason` never throws and never spawns; it only checks that the tools or
 *   build outputs exist, so a missing piece becomes a clear row instead of a crash.
 * - Case names are unique, kebab-case, stable (they key results JSON and ratios).
 */
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { assert } from '../../src/core/assert.js';
import type { CounterSnapshot } from './counters.js';
import type { ManagedProcess, ProcessSpec } from './proc.js';
import type { Workload } from './workloads.js';

export interface CaseContext {
  /** Scratch directory for this case: Unix sockets and logs (not tmpfs-critical). */
  runDir: string;
  /** Directory on tmpfs (/dev/shm) for this case's private leg data. */
  dataDir: string;
  /** Export size every case must offer, bytes; fio's --size. */
  sizeBytes: number;
  /** Root of the compiled output the harness runs from (e.g. /work/main/dist). */
  distRoot: string;
  repoRoot: string;
  /** A pre-filled (non-sparse) image of sizeBytes on tmpfs, shared by cases in one run. */
  sharedImage(): string;
  /** Spawn a process owned by the harness; resolves when its socket exists. */
  spawn(spec: Omit<ProcessSpec, 'logPath'>): Promise<ManagedProcess>;
}

export interface CaseSetup {
  /** NBD URI that fio connects to. */
  uri: string;
  /**
   * Reads the server's own counters (enbd: its Prometheus `--metrics` endpoint). The harness
   * calls it just before and just after each fio run and stores the difference with the row
   * (userspace copies per WRITE). Resolves null when the counters cannot be read; never rejects.
   */
  counters?(): Promise<CounterSnapshot | null>;
}

export interface RatioTarget {
  /** Name of the case this one is compared with. */
  versus: string;
  /** Minimum throughput ratio (this / versus) for a workload, undefined = no target. */
  minRatio(workload: Workload): number | undefined;
  /** Where the target comes from (an issue title), printed beside it. */
  source: string;
}

export interface BenchCase {
  name: string;
  description: string;
  /** Sort key: lower runs first within a workload; baselines get low numbers. */
  order: number;
  /** Part of the `--quick` subset. */
  quick: boolean;
  /** Diagnostic variant: runs only when named in `--cases`, never by default. */
  optIn?: boolean;
  /** Earlier names of this case that `--cases` still accepts (results JSON keeps `name`). */
  aliases?: readonly string[];
  /**
   * The workloads this case runs by default (undefined: all). Non-headline workloads (QD1,
   * 1 MiB reads) run only on the reference cases to keep the full run short; `--all-pairs`
   * ignores this.
   */
  runsWorkload?(workload: Workload): boolean;
  /** External programs needed (checked on PATH before starting). */
  tools: readonly string[];
  unavailableReason(context: CaseContext): string | null;
  start(context: CaseContext): Promise<CaseSetup>;
  targets?: readonly RatioTarget[];
}

const kCaseNamePattern = /^[a-z0-9]+(-[a-z0-9]+)*$/;

function isBenchCase(value: unknown): value is BenchCase {
  if (typeof value !== 'object' || value === null) return false;
  const candidate = value as Partial<BenchCase>;
  return typeof candidate.name === 'string' && typeof candidate.start === 'function' &&
    typeof candidate.unavailableReason === 'function' && typeof candidate.order === 'number';
}

/** Imports every `*.js` in casesDir (the compiled bench/cases/) and returns them sorted. */
export async function loadCases(casesDir: string): Promise<BenchCase[]> {
  const files = readdirSync(casesDir).filter((file) => file.endsWith('.js')).sort();
  const cases: BenchCase[] = [];
  for (const file of files) {
    const url = pathToFileURL(join(casesDir, file)).href;
    const module = (await import(url)) as { default?: unknown };
    // A file exports one case, or a list of cases made by one factory.
    const exported = Array.isArray(module.default) ? (module.default as unknown[]) : [module.default];
    for (const benchCase of exported) {
      if (!isBenchCase(benchCase)) throw new Error(`bench case ${file}: default export is not a BenchCase`);
      assert(kCaseNamePattern.test(benchCase.name), `bench case ${file}: bad name ${benchCase.name}`);
      cases.push(benchCase);
    }
  }
  const names = cases.flatMap((benchCase) => [benchCase.name, ...(benchCase.aliases ?? [])]);
  assert(new Set(names).size === names.length, 'bench case names and aliases unique');
  return cases.sort((left, right) =>
    left.order - right.order || left.name.localeCompare(right.name));
}

export function unixUri(socketPath: string, exportName = ''): string {
  assert(socketPath.startsWith('/'), 'socket path must be absolute');
  return `nbd+unix:///${exportName}?socket=${socketPath}`;
}
