/**
 * Client side of `enbd repl`: a node:repl whose eval sends each input to the daemon
 * (repl.eval) and prints the daemon's text; `.legs`, `.bitmap <leg>` and `.slots` call the
 * matching methods. Leaving (.exit, Ctrl-D, end of stdin) closes the control connection only;
 * the daemon keeps running.
 *
 * Thread: the CLI's main thread.
 *
 * Input: on a terminal the REPL reads the terminal itself (line editing, history). From a pipe
 * it is fed one line at a time, the next only once the REPL showed its prompt again: node:repl
 * does not wait for an asynchronous eval before taking the next line, which would reorder
 * answers and break multi-line input.
 */
import { createInterface } from 'node:readline';
import { REPLServer, Recoverable, start as startRepl } from 'node:repl';
import { PassThrough, type Readable, type Writable } from 'node:stream';
import type { ControlClient } from './client.js';
import { formatBitmap, formatLegTable, formatSlots } from './format.js';

const kDrainTimeoutMs = 10_000;
/** The daemon bounds an evaluation to a few seconds (repl-eval.ts); this covers the trip. */
const kEvalCallTimeoutMs = 30_000;

export interface ReplClientOptions {
  client: ControlClient;
  input: Readable;
  output: Writable;
  terminal: boolean;
}

/** Counts calls still unanswered, so leaving waits for them (bounded) before closing. */
class PendingCalls {
  private count = 0;
  private readonly waiters: Array<() => void> = [];

  track<T>(promise: Promise<T>): Promise<T> {
    this.count += 1;
    return promise.finally(() => {
      this.count -= 1;
      if (this.count === 0) for (const wake of this.waiters.splice(0)) wake();
    });
  }

  async drain(timeoutMs: number): Promise<void> {
    if (this.count === 0) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, timeoutMs);
      this.waiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }
}

function errorLine(error: unknown): string {
  return `enbd: error: ${error instanceof Error ? error.message : String(error)}`;
}

/** The REPL whose eval is the daemon's repl.eval (input: the terminal, or the line pump). */
function startRemoteRepl(options: ReplClientOptions, input: Readable, pending: PendingCalls): REPLServer {
  const client = options.client;
  return startRepl({
    prompt: 'enbd> ',
    input,
    output: options.output,
    terminal: options.terminal,
    ignoreUndefined: false,
    preview: false,
    writer: (value: unknown) => (typeof value === 'string' ? value : String(value)),
    eval: (code, _context, _file, callback) => {
      if (code.trim() === '') {
        callback(null, undefined);
        return;
      }
      pending.track(client.call('repl.eval', { code }, kEvalCallTimeoutMs)).then(
        (result) => {
          if (result.incomplete) callback(new Recoverable(new SyntaxError(result.output)), undefined);
          else callback(null, result.output);
        },
        (error: unknown) => callback(null, errorLine(error)),
      );
    },
  });
}

/** .legs, .bitmap <leg>, .slots: one method call each, printed as a table. */
function defineCommands(repl: REPLServer, client: ControlClient, output: Writable, pending: PendingCalls): void {
  const command = (run: (argument: string) => Promise<string[]>): ((argument: string) => void) => {
    return (argument: string) => {
      repl.clearBufferedCommand();
      pending.track(run(argument.trim())).then(
        (lines) => output.write(lines.join('\n') + '\n'),
        (error: unknown) => output.write(errorLine(error) + '\n'),
      ).finally(() => repl.displayPrompt());
    };
  };
  repl.defineCommand('legs', {
    help: 'Table of the legs (state, in-flight, latency, dirty bytes, resync progress)',
    action: command(async () => formatLegTable((await client.call('status')).legs)),
  });
  repl.defineCommand('bitmap', {
    help: 'Dirty map of a leg: .bitmap <leg>',
    action: command(async (argument) => {
      if (!/^\d+$/.test(argument)) return ['usage: .bitmap <leg index>'];
      return formatBitmap(await client.call('leg.bitmap', { leg: Number(argument) }));
    }),
  });
  repl.defineCommand('slots', {
    help: 'Request ring occupancy and the requests in flight',
    action: command(async () => formatSlots(await client.call('ring.slots'))),
  });
}

/** Runs the REPL until the user leaves; resolves then (the connection closed). */
export async function runRepl(options: ReplClientOptions): Promise<void> {
  const { client, output } = options;
  const pending = new PendingCalls();
  const feed = options.terminal ? null : new PassThrough();
  output.write(`enbd repl attached to ${client.path}: mirror, legs, ring, server, stats(), dirtyMap(i), status(); .legs .bitmap <leg> .slots; .exit leaves (the daemon keeps running)\n`);
  const repl = startRemoteRepl(options, feed ?? options.input, pending);
  defineCommands(repl, client, output, pending);
  const ended: { lost: Error | null } = { lost: null };
  client.onClose((error) => {
    if (error === null) return;
    ended.lost = error;
    output.write('\n');
    repl.close();
  });
  const exited = new Promise<void>((resolve) => repl.once('exit', () => resolve()));
  const lines = feed === null ? null : pumpLines(repl, options.input, feed, exited);
  await exited;
  lines?.close();
  await pending.drain(kDrainTimeoutMs);
  client.close();
  if (ended.lost !== null) throw ended.lost;
}

/**
 * Feeds `input` to the REPL line by line: writes one line to `feed`, then waits for the REPL's
 * next prompt (displayPrompt runs once a line was handled: evaluated, a command run, or more
 * input asked for). Ends `feed` at the end of input, so the REPL exits.
 */
function pumpLines(repl: REPLServer, input: Readable, feed: PassThrough, exited: Promise<void>): { close(): void } {
  let prompted: (() => void) | null = null;
  const displayPrompt = repl.displayPrompt.bind(repl);
  repl.displayPrompt = (preserveCursor?: boolean) => {
    displayPrompt(preserveCursor);
    const wake = prompted;
    prompted = null;
    wake?.();
  };
  const lines = createInterface({ input, crlfDelay: Infinity, terminal: false });
  let open = true;
  void (async () => {
    for await (const line of lines) {
      if (!open) break;
      const handled = new Promise<void>((resolve) => {
        prompted = resolve;
      });
      feed.write(line + '\n');
      await Promise.race([handled, exited]);
    }
    feed.end();
  })();
  return {
    close: () => {
      open = false;
      lines.close();
      input.pause();
    },
  };
}
