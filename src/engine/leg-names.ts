/**
 * Leg names: the stable handle an operator uses for a leg (`enbd leg fail b`), shown by
 * `enbd status` and used as the `leg` label of the metrics.
 *
 * Thread: any (pure functions).
 *
 * Design notes:
 * - A name is [a-zA-Z0-9_-]{1,32} and not all digits (digits alone read as a leg index).
 * - `--leg NAME=URI` names a leg; the prefix is a name only when the text before the first '='
 *   holds no ':' or '/' (so `nbd://h/x?a=b` and `/tmp/a=b.img` are plain URIs). A relative path
 *   with '=' and no '/' needs a leading `./`.
 * - Automatic names are a, b, ..., z, aa, ab, ... (md's and drbd's users count legs in letters):
 *   the first one no leg of the running set holds and no leg held before in this run
 *   (`retired`), so a name never silently moves to another leg; an operator can give a removed
 *   leg's name again with `enbd leg add NAME=URI`.
 * - A reference (`enbd leg fail REF`) is, in this order: a live leg's name, a leg index (digits),
 *   or a live leg's URI.
 */
import { EnbdError } from '../core/errors.js';

export const kLegNameCharsMax = 32;
const kLegNamePattern = /^[a-zA-Z0-9_-]+$/;

/** Why `name` is not a leg name, or null when it is one. */
export function legNameProblem(name: string): string | null {
  if (name.length === 0 || name.length > kLegNameCharsMax || !kLegNamePattern.test(name)) {
    return `must be 1 to ${kLegNameCharsMax} letters, digits, _ or -`;
  }
  if (/^\d+$/.test(name)) return 'must not be all digits (that reads as a leg index)';
  return null;
}

const kSpecForm = `[NAME=]URI with a NAME of 1 to ${kLegNameCharsMax} letters, digits, _ or - (not all digits) and a URI after "="`;

export interface LegSpec {
  name: string | null;
  uri: string;
}

/**
 * Splits `[NAME=]URI`. `what` names the source for errors ("--leg", "legs in mirror.yaml").
 * Throws EnbdError('ENBD_ERR_USAGE') for a bad name or an empty URI ("--leg must be ...").
 */
export function splitLegSpec(text: string, what: string): LegSpec {
  const at = text.indexOf('=');
  const prefix = at < 0 ? '' : text.slice(0, at);
  if (at <= 0 || prefix.includes(':') || prefix.includes('/')) return { name: null, uri: text };
  const problem = legNameProblem(prefix);
  const uri = text.slice(at + 1);
  if (problem !== null || uri === '') throw new EnbdError('ENBD_ERR_USAGE', `${what} must be ${kSpecForm}, got ${JSON.stringify(text)}`);
  return { name: prefix, uri };
}

/** The n-th automatic name: 0 -> a, 25 -> z, 26 -> aa, 27 -> ab, ... */
export function autoLegName(n: number): string {
  let name = '';
  let rest = n;
  do {
    name = String.fromCharCode(97 + (rest % 26)) + name;
    rest = Math.floor(rest / 26) - 1;
  } while (rest >= 0);
  return name;
}

/** The first automatic name in neither set. */
export function nextAutoLegName(live: ReadonlySet<string>, retired: ReadonlySet<string>): string {
  for (let n = 0; ; n += 1) {
    const name = autoLegName(n);
    if (!live.has(name) && !retired.has(name)) return name;
  }
}

/**
 * Names for the legs given at start: the given ones, then automatic ones for the rest (in
 * order, skipping given names). Throws for a name given twice, naming the source as `what`
 * ("--leg", "legs in mirror.yaml").
 */
export function assignLegNames(given: ReadonlyArray<string | null | undefined>, what = '--leg'): string[] {
  const taken = new Set<string>();
  for (const name of given) {
    if (name === null || name === undefined) continue;
    if (taken.has(name)) throw new EnbdError('ENBD_ERR_USAGE', `${what} must give each leg name once, got ${name} twice`);
    taken.add(name);
  }
  const none = new Set<string>();
  return given.map((name) => {
    if (name !== null && name !== undefined) return name;
    const next = nextAutoLegName(taken, none);
    taken.add(next);
    return next;
  });
}

export interface NamedLeg {
  index: number;
  name: string;
  uri: string;
  live: boolean;
}

/** Resolves a leg reference (name, index or URI) to an index; throws naming the choices. */
export function resolveLegRef(ref: string | number, legs: readonly NamedLeg[]): number {
  if (typeof ref === 'number') return ref;
  const live = legs.filter((leg) => leg.live);
  const byName = live.find((leg) => leg.name === ref);
  if (byName !== undefined) return byName.index;
  if (/^\d+$/.test(ref)) return Number(ref);
  const byUri = live.find((leg) => leg.uri === ref);
  if (byUri !== undefined) return byUri.index;
  const choices = live.map((leg) => leg.name).join(', ');
  throw new EnbdError('ENBD_ERR_CONFIG', `no leg "${ref}" (legs: ${choices === '' ? 'none' : choices}; a name, an index or a leg's URI)`);
}
