/**
 * Daemon side of `enbd repl`: evaluates a client's code with node:vm in a context that holds
 * the live objects (mirror, legs, ring, dirtyMap(i): the engine's debugHandles(); server,
 * stats(), status()), awaits a returned promise, and answers util.inspect text.
 *
 * Thread: the daemon's main thread. The evaluation blocks it (and every client's I/O) while it
 * runs, hence the bounds below.
 *
 * Bounds:
 * - synchronous run time kEvalTimeoutMs (vm `timeout`: an endless loop is interrupted);
 * - a returned promise is awaited at most kAwaitTimeoutMs;
 * - the answer is at most kOutputCharsMax characters (inspect depth 2, arrays 100 entries).
 *
 * This is arbitrary code execution as the daemon's user, by design (a debugging aid): the
 * control socket's mode 0600 is what keeps other users out. The vm context is a convenience
 * namespace, not a sandbox (the objects in it lead back to the daemon's realm).
 */
import { inspect, types } from 'node:util';
import { Script, createContext, type Context } from 'node:vm';
import { assert } from '../core/assert.js';
import type { ReplEvalResult } from './protocol.js';

export const kEvalTimeoutMs = 2000;
export const kAwaitTimeoutMs = 5000;
export const kOutputCharsMax = 64 * 1024;
export const kCodeCharsMax = 64 * 1024;
const kFilename = 'enbd-repl';

const kInspectOptions = { depth: 2, maxArrayLength: 100, maxStringLength: 4096, breakLength: 100, colors: false } as const;

function bounded(text: string): string {
  if (text.length <= kOutputCharsMax) return text;
  return `${text.slice(0, kOutputCharsMax)}\n... (truncated: ${text.length - kOutputCharsMax} more characters)`;
}

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return value !== null && (typeof value === 'object' || typeof value === 'function') && typeof (value as { then?: unknown }).then === 'function';
}

/** An error's text as the Node REPL would show it, with frames of other files dropped. */
function describeThrown(thrown: unknown): string {
  if (!types.isNativeError(thrown)) return `Uncaught ${inspect(thrown, kInspectOptions)}`;
  const stack = typeof thrown.stack === 'string' ? thrown.stack.split('\n') : [];
  const head = `${thrown.name}: ${thrown.message}`;
  const frames = stack.filter((line) => /^\s+at /.test(line) && line.includes(kFilename));
  return ['Uncaught ' + head, ...frames].join('\n');
}

function isIncomplete(thrown: unknown): boolean {
  if (!types.isNativeError(thrown) || thrown.name !== 'SyntaxError') return false;
  return /^(Unexpected end of input|Unterminated template literal|missing \) after argument list)/.test(thrown.message);
}

/** One REPL session's evaluation context (declarations persist across evaluations). */
export class ReplEvaluator {
  private readonly context: Context;
  private evaluations = 0;

  constructor(globals: Record<string, unknown>) {
    assert(Object.keys(globals).length > 0, 'a REPL context holds something');
    this.context = createContext({ ...globals }, { name: 'enbd repl', codeGeneration: { strings: true, wasm: false } });
  }

  /** Compiles `code` (an object literal like `{a: 1}` is an expression, as in the Node REPL). */
  private compile(code: string): Script {
    const options = { filename: kFilename };
    if (/^\s*\{/.test(code) && !/;\s*$/.test(code)) {
      try {
        return new Script(`(${code}\n)`, options);
      } catch {
        // not an expression: a block statement after all
      }
    }
    return new Script(code, options);
  }

  async evaluate(code: string): Promise<ReplEvalResult> {
    assert(typeof code === 'string', 'code is a string');
    if (code.length > kCodeCharsMax) return { output: `Uncaught RangeError: code longer than ${kCodeCharsMax} characters`, threw: true, incomplete: false };
    this.evaluations += 1;
    let value: unknown;
    try {
      value = this.compile(code).runInContext(this.context, { timeout: kEvalTimeoutMs, displayErrors: false, breakOnSigint: false });
    } catch (thrown) {
      return { output: bounded(describeThrown(thrown)), threw: true, incomplete: isIncomplete(thrown) };
    }
    if (isThenable(value)) {
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<{ timedOut: true }>((resolve) => {
        timer = setTimeout(() => resolve({ timedOut: true }), kAwaitTimeoutMs);
      });
      try {
        const settled = await Promise.race([Promise.resolve(value).then((result) => ({ timedOut: false as const, result })), timeout]);
        if (settled.timedOut) return { output: `Promise still pending after ${kAwaitTimeoutMs} ms`, threw: true, incomplete: false };
        value = settled.result;
      } catch (thrown) {
        return { output: bounded(describeThrown(thrown)), threw: true, incomplete: false };
      } finally {
        clearTimeout(timer);
      }
    }
    return { output: bounded(inspect(value, kInspectOptions)), threw: false, incomplete: false };
  }

  get evaluationCount(): number {
    return this.evaluations;
  }
}
