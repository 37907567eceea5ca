/**
 * How the enbd cases start enbd: which build (`<distRoot>/src/cli/main.js`, where distRoot is
 * the compiled tree the harness itself runs from, or ENBD_BENCH_MAIN) and which extra Node
 * options (ENBD_BENCH_NODE_ARGS, split on spaces: e.g. `--cpu-prof --cpu-prof-dir=/tmp/prof`
 * to profile every enbd server of a run; the profile is written when the harness stops it).
 * Threads: harness main thread.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { CaseContext } from './case.js';

export function enbdMain(context: CaseContext): string {
  return process.env['ENBD_BENCH_MAIN'] ?? join(context.distRoot, 'src/cli/main.js');
}

/** Node options placed before main.js (empty unless ENBD_BENCH_NODE_ARGS is set). */
export function enbdNodeArgs(): string[] {
  return (process.env['ENBD_BENCH_NODE_ARGS'] ?? '').split(' ').filter((arg) => arg !== '');
}

/** The argv of `node [ENBD_BENCH_NODE_ARGS] main.js ...rest`. */
export function enbdArgs(context: CaseContext, rest: readonly string[]): string[] {
  return [...enbdNodeArgs(), enbdMain(context), ...rest];
}

/** null when the enbd build exists, else why the case cannot run. */
export function enbdUnavailable(context: CaseContext): string | null {
  const main = enbdMain(context);
  return existsSync(main) ? null : `enbd not built (${main} missing)`;
}
