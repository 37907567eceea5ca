/**
 * Daemon side of the REPL (src/control/repl-eval.ts): values come back inspected, errors as
 * "Uncaught ..." text, promises awaited, incomplete input flagged, declarations kept across
 * evaluations, endless loops interrupted, output bounded.
 * Threads: main only.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ReplEvaluator, kEvalTimeoutMs, kOutputCharsMax } from '../../../src/control/repl-eval.js';

function evaluator(): ReplEvaluator {
  const legs = [{ index: 0, state: 'in-sync' }, { index: 1, state: 'failed' }];
  return new ReplEvaluator({ legs, stats: () => ({ writeRequests: 3 }), later: async () => 'resolved' });
}

test('expressions come back inspected; the context holds the given objects', async () => {
  const repl = evaluator();
  assert.deepStrictEqual(await repl.evaluate('legs.length'), { output: '2', threw: false, incomplete: false });
  assert.equal((await repl.evaluate('legs[1].state')).output, "'failed'");
  assert.equal((await repl.evaluate('stats()')).output, '{ writeRequests: 3 }');
  assert.equal((await repl.evaluate('{a: 1, b: [1, 2]}')).output, '{ a: 1, b: [ 1, 2 ] }', 'an object literal is an expression');
  assert.equal((await repl.evaluate('typeof process')).output, "'undefined'", 'no daemon globals by accident');
});

test('declarations persist across evaluations of one session', async () => {
  const repl = evaluator();
  assert.equal((await repl.evaluate('let total = 5')).output, 'undefined');
  assert.equal((await repl.evaluate('total * 2')).output, '10');
  assert.equal(repl.evaluationCount, 2);
});

test('a thrown error and a rejected promise come back as text', async () => {
  const repl = evaluator();
  const thrown = await repl.evaluate("throw new Error('boom')");
  assert.equal(thrown.threw, true);
  assert.match(thrown.output, /^Uncaught Error: boom/);
  const rejected = await repl.evaluate("Promise.reject(new TypeError('nope'))");
  assert.match(rejected.output, /^Uncaught TypeError: nope/);
  const notAnError = await repl.evaluate('throw 42');
  assert.equal(notAnError.output, 'Uncaught 42');
});

test('promises are awaited', async () => {
  assert.deepStrictEqual(await evaluator().evaluate('later()'), { output: "'resolved'", threw: false, incomplete: false });
});

test('incomplete input is flagged (the client then asks for more lines)', async () => {
  const repl = evaluator();
  const open = await repl.evaluate('function f() {\n');
  assert.equal(open.incomplete, true);
  assert.equal((await repl.evaluate('function f() {\nreturn 42 }\nf()')).output, '42');
  const wrong = await repl.evaluate('1 +* 2');
  assert.equal(wrong.incomplete, false);
  assert.match(wrong.output, /SyntaxError/);
});

test(`an endless loop is interrupted after ${kEvalTimeoutMs} ms`, async () => {
  const started = Date.now();
  const result = await evaluator().evaluate('while (true) {}');
  assert.equal(result.threw, true);
  assert.match(result.output, /timed out/);
  assert.ok(Date.now() - started < kEvalTimeoutMs + 2000);
});

test('output is bounded', async () => {
  const result = await evaluator().evaluate("'x'.repeat(200000).split('').join('')");
  assert.ok(result.output.length < kOutputCharsMax + 200, `output length ${result.output.length}`);
});
