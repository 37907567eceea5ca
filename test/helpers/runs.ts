/**
 * Run counts and the seed of property tests (fast-check), so a soak can push every property file
 * far past what CI runs without editing it, and CI runs the same cases every time.
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
 * Seed (set once, when a property file imports this module, as fast-check's global default;
 * a file's own `seed` option still wins):
 *
 * | knob               | seed                                                        |
 * |--------------------|-------------------------------------------------------------|
 * | ENBD_FUZZ_SEED=s   | s everywhere (replays a failure a soak reported)            |
 * | CI=true (or 1)     | kCiSeed: a green CI says the same cases pass each time, so a |
 * |                    | rare case a soak has not met cannot fail one landing only   |
 * | (neither)          | a new seed each run (developers' runs keep exploring)        |
 *
 * A failure's report names its seed and path; `ENBD_FUZZ_SEED=<seed>` reruns the same cases.
 *
 * Sizes: importing this module also makes an explicit `maxLength` (arrays, strings, commands)
 * the real bound of what is drawn (fast-check's `defaultSizeToMaxWhenMaxSpecified`). Without it
 * fast-check 4 draws at most about 10 items whatever maxLength says, and a property written for
 * 400 steps (a ring that wraps, a pool that runs dry) only ever saw 10.
 * The mirror model, keeper and assemble files keep their own seed knobs (same kCiSeed rule).
 *
 * Invariant: the result is a positive safe integer (a bad knob throws instead of running 0 or
 * NaN runs, which fast-check would treat as "pass").
 */

import fc from 'fast-check';

/** The seed of every property under CI (the model, keeper and assemble files use it too). */
export const kCiSeed = 20261201;

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

function chosenSeed(): number | undefined {
  const text = process.env['ENBD_FUZZ_SEED'];
  if (text !== undefined && text !== '') {
    const seed = Number(text);
    if (!Number.isSafeInteger(seed)) throw new RangeError(`ENBD_FUZZ_SEED must be an integer, got '${text}'`);
    return seed;
  }
  const ci = process.env['CI'];
  return ci === 'true' || ci === '1' ? kCiSeed : undefined;
}

/** The seed every property of this process starts from, or undefined for a new one each run. */
export const propertySeed: number | undefined = chosenSeed();
fc.configureGlobal({
  ...fc.readConfigureGlobal(),
  // An explicit maxLength means what it says: fast-check 4 otherwise sizes arrays and strings
  // 'small' (at most 2 x minLength + 10 items), so `{ maxLength: 400 }` never drew more than 10.
  defaultSizeToMaxWhenMaxSpecified: true,
  ...(propertySeed !== undefined ? { seed: propertySeed } : {}),
});
