/**
 * Small pure helpers the bench phases share: the median of a round's samples and an error's
 * text for a result row.
 *
 * Thread: the bench's main thread. No I/O.
 */

/** The median of `values` (the mean of the middle two for an even count), null when empty. */
export function median(values: readonly number[]): number | null {
  if (values.length === 0) return null;
  const sorted = [...values].sort((left, right) => left - right);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1
    ? sorted[middle] as number
    : ((sorted[middle - 1] as number) + (sorted[middle] as number)) / 2;
}

/** An error's message (or the thrown value as text), for a row's `error` field or a log line. */
export function describeError(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
