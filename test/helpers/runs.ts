/**
 * Run counts for property tests (fast-check `numRuns`), so a soak can push every property file
 * far past what CI runs without editing it.
 * Threads: test process main thread.
 *
 * Design notes
 *
 * | knob               | effect                                                      |
 * |--------------------|-------------------------------------------------------------|
 * | (none)             | the file's own default                                      |
 * | ENBD_RUNS_SCALE=k  | every default times k (k > 0, rounded, at least 1 run)      |
 * | ENBD_FUZZ_RUNS=n   | exactly n runs everywhere (wins over the scale; the older    |
 * |                    | knob of the fuzz, frame, layout and superblock files)       |
 *
 * The seed is fast-check's own (a new one each run unless the file fixes one); a failure's
 * report names it, so `{ seed, path }` replays it.
 *
 * Invariant: the result is a positive safe integer (a bad knob throws instead of running 0 or
 * NaN runs, which fast-check would treat as "pass").
 */

function positiveNumber(name: string): number | undefined {
  const text = process.env[name];
  if (text === undefined || text === '') return undefined;
  const value = Number(text);
  if (!Number.isFinite(value) || value <= 0) throw new RangeError(`${name} must be a positive number, got '${text}'`);
  return value;
}

/** numRuns for a property whose file default is `defaultRuns` (see the table above). */
export function propertyRuns(defaultRuns: number): number {
  if (!Number.isSafeInteger(defaultRuns) || defaultRuns < 1) throw new RangeError(`defaultRuns must be a positive integer, got ${defaultRuns}`);
  const exact = positiveNumber('ENBD_FUZZ_RUNS');
  if (exact !== undefined) return Math.max(1, Math.round(exact));
  const scale = positiveNumber('ENBD_RUNS_SCALE') ?? 1;
  const runs = Math.max(1, Math.round(defaultRuns * scale));
  if (!Number.isSafeInteger(runs)) throw new RangeError(`ENBD_RUNS_SCALE gives ${runs} runs`);
  return runs;
}
