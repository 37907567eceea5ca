/**
 * Machine description stored with every result file: CPUs, memory, kernel, Node version and
 * the versions of the external tools the cases use. Also PATH lookups for tools.
 * Threads: harness main thread (synchronous, run once per harness run).
 */
import { spawnSync } from 'node:child_process';
import { cpus, hostname, release, totalmem } from 'node:os';

export interface MachineInfo {
  hostname: string;
  cpuCount: number;
  cpuModel: string;
  memoryBytes: number;
  kernel: string;
  node: string;
  tools: Record<string, string>;
}

const kVersionCommands: ReadonlyArray<readonly [string, readonly string[]]> = [
  ['fio', ['--version']],
  ['nbdkit', ['--version']],
  ['qemu-nbd', ['--version']],
  ['nbdinfo', ['--version']],
];

export function hasTool(name: string): boolean {
  return spawnSync('sh', ['-c', 'command -v "$1"', 'sh', name], { stdio: 'ignore' }).status === 0;
}

function firstLine(command: string, args: readonly string[]): string {
  const result = spawnSync(command, [...args], { encoding: 'utf8' });
  if (result.status !== 0) return 'missing';
  return (result.stdout || result.stderr).split('\n')[0]?.trim() ?? 'unknown';
}

export interface SourceInfo {
  /** git HEAD of the tree the harness runs from, or 'unknown'. */
  commit: string;
  /** True when tracked files differ from HEAD (the build may not match the commit). */
  dirty: boolean;
}

/** Read-only git queries: which source produced these numbers. */
export function sourceInfo(repoRoot: string): SourceInfo {
  const head = spawnSync('git', ['-C', repoRoot, 'rev-parse', 'HEAD'], { encoding: 'utf8' });
  if (head.status !== 0) return { commit: 'unknown', dirty: false };
  const status = spawnSync('git', ['-C', repoRoot, 'status', '--porcelain', '--untracked-files=no'],
    { encoding: 'utf8' });
  return { commit: head.stdout.trim(), dirty: status.stdout.trim() !== '' };
}

export function machineInfo(): MachineInfo {
  const cpuList = cpus();
  const tools: Record<string, string> = {};
  for (const [tool, args] of kVersionCommands) tools[tool] = firstLine(tool, args);
  return {
    hostname: hostname(),
    cpuCount: cpuList.length,
    cpuModel: cpuList[0]?.model ?? 'unknown',
    memoryBytes: totalmem(),
    kernel: release(),
    node: process.version,
    tools,
  };
}
