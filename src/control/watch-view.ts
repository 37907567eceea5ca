/**
 * `enbd status --watch` on a terminal: the live block (header, one entry per leg, a progress bar
 * under a resyncing leg) drawn within the terminal's width, and the repaint that keeps event
 * lines above it.
 *
 * Thread: the CLI's main thread.
 *
 * Design notes:
 * - `renderWatch(status, columns)` is pure: every line is at most `columns` characters. The
 *   header is word-wrapped onto more lines rather than cut; a leg's URI is the only text
 *   that is shortened (with "..." in its middle) when it cannot fit on its own line.
 * - The live block is redrawn in place: cursor up over the lines drawn last time, erase to the
 *   end of the screen, write the new block. An event line is written in the erased place first,
 *   so it scrolls up with the terminal and never lands inside the block.
 * - The width is re-read on every paint (and a 'resize' repaints at once, after clearing the
 *   screen: the terminal may have rewrapped the old block).
 *
 * Invariants: each live leg appears in exactly one entry; the block has no line longer than the
 * width it was drawn for.
 */
import { formatBytes, formatCeiling, formatDuration, formatExportLine, formatLatency, formatRate, formatVerify, resyncFraction, verifyFraction } from './format.js';
import type { LegView, StatusResult } from './protocol.js';

export const kWatchColumnsMin = 40;

/** Word-wraps `text` onto lines of at most `columns`, continuation lines indented (a word longer than a line is cut). */
function wrapWords(text: string, columns: number, indent = '  '): string[] {
  const lines: string[] = [];
  let line = '';
  for (const word of text.split(' ')) {
    const next = line === '' ? word : `${line} ${word}`;
    if (next.length <= columns || line.trim() === '') line = next;
    else {
      lines.push(line);
      line = indent + word;
    }
  }
  if (line !== '') lines.push(line);
  return lines.map((wrapped) => cut(wrapped, columns));
}

function cut(text: string, columns: number): string {
  return text.length <= columns ? text : text.slice(0, Math.max(0, columns - 3)) + '...';
}

/** Shortens in the middle, keeping the start (scheme) and the end (socket or file name). */
function shortenMiddle(text: string, columns: number): string {
  if (text.length <= columns) return text;
  if (columns < 9) return cut(text, columns);
  const keep = columns - 3;
  const head = Math.ceil(keep / 2);
  return text.slice(0, head) + '...' + text.slice(text.length - (keep - head));
}

function legEntry(leg: LegView, nameWidth: number, columns: number): string[] {
  const parts = [
    `${leg.name.padEnd(nameWidth)}  ${leg.state.padEnd(11)}`,
    `in-flight ${String(leg.inFlight).padEnd(3)}`,
    `latency ${formatLatency(leg.latencyMeanMs).padEnd(8)}`,
    `dirty ${formatBytes(leg.dirtyBytes)}`,
  ];
  const lines: string[] = [];
  let line = '';
  for (const part of parts) {
    const next = line === '' ? part : `${line}  ${part}`;
    if (next.length <= columns || line === '') line = next;
    else {
      lines.push(cut(line, columns));
      line = '    ' + part;
    }
  }
  lines.push(cut(line, columns));
  lines.push(shortenMiddle(`    ${leg.uri} (${leg.kind})`, columns));
  if (leg.resync !== null) {
    const resync = leg.resync;
    const percent = `${(resyncFraction(resync) * 100).toFixed(1).padStart(5)}%`;
    const tail = ` ${percent} ${formatRate(resync.bytesPerSecond)} ETA ${formatDuration(resync.etaSeconds)}${resync.paused ? ' paused' : ''}`;
    const barWidth = Math.max(10, Math.min(50, columns - 4 - 2 - tail.length));
    const filled = Math.round(resyncFraction(resync) * barWidth);
    const bar = `    [${'#'.repeat(filled)}${'-'.repeat(barWidth - filled)}]`;
    if (bar.length + tail.length <= columns) lines.push(bar + tail);
    else lines.push(bar.slice(0, columns), cut('    ' + tail.trimStart(), columns));
  }
  if (leg.failureReason !== null && leg.state !== 'in-sync') lines.push(cut(`    reason: ${leg.failureReason}`, columns));
  return lines;
}

/** The live block for one status, every line at most `columns` wide. */
export function renderWatch(status: StatusResult, columnsGiven: number): string[] {
  const columns = Math.max(kWatchColumnsMin, Math.floor(columnsGiven));
  const resync = status.resync;
  const copying = status.legs.some((leg) => leg.resync !== null);
  const resyncWord = !copying ? (resync.paused ? 'idle (paused)' : 'idle') : resync.paused ? 'paused' : 'running';
  const lines = [
    ...wrapWords(formatExportLine(status), columns),
    ...wrapWords(`resync: ${resyncWord}, floor ${formatRate(resync.minBytesPerSecond)}, ceiling ${formatCeiling(resync.maxBytesPerSecond)}`, columns),
  ];
  const legs = status.legs.filter((leg) => leg.state !== 'removed');
  const nameWidth = Math.max(3, ...legs.map((leg) => leg.name.length));
  for (const leg of legs) lines.push(...legEntry(leg, nameWidth, columns));
  if (status.verify !== undefined) {
    // The verify: its summary line (wrapped), and a bar under it while it runs.
    lines.push(...wrapWords(formatVerify(status.verify), columns));
    const current = status.verify.current;
    if (current !== null && current.running) {
      const barWidth = Math.max(10, Math.min(50, columns - 4 - 2));
      const filled = Math.round(verifyFraction(current) * barWidth);
      lines.push(`    [${'#'.repeat(filled)}${'-'.repeat(barWidth - filled)}]`);
    }
  }
  return lines.map((line) => line.trimEnd());
}

/** Where the view writes: a TTY stream (process.stdout), or a fake in tests. */
export interface WatchTerminal {
  columns?: number | undefined;
  write(text: string): boolean;
  on(event: 'resize', listener: () => void): unknown;
  off(event: 'resize', listener: () => void): unknown;
}

/** Draws the live block in place and event lines above it. */
export class TerminalStatusView {
  private drawn = 0;
  private last: StatusResult | null = null;
  private readonly onResize = (): void => {
    this.out.write('\x1b[H\x1b[2J');
    this.drawn = 0;
    this.paint('');
  };

  constructor(private readonly out: WatchTerminal) {
    out.write('\x1b[?25l'); // hide the cursor while the block is live
    out.on('resize', this.onResize);
  }

  private get columns(): number {
    return this.out.columns ?? 80;
  }

  render(status: StatusResult): void {
    this.last = status;
    this.paint('');
  }

  /** An event line: printed above the live block, which is drawn again under it. */
  log(line: string): void {
    this.paint(cut(line, Math.max(kWatchColumnsMin, this.columns)) + '\n');
  }

  private paint(before: string): void {
    const block = this.last === null ? ['connecting...'] : renderWatch(this.last, this.columns);
    const up = this.drawn > 0 ? `\x1b[${this.drawn}A` : '';
    this.out.write(`${up}\r\x1b[J${before}${block.join('\n')}\n`);
    this.drawn = block.length;
  }

  stop(): void {
    this.out.off('resize', this.onResize);
    this.out.write('\x1b[?25h');
  }
}
