#!/usr/bin/env node
// Prints the import edges between the folders of src/ and actors/, read from the sources'
// own import and export-from lines (type-only imports included, marked): the list that
// ARCHITECTURE.md "Layers and imports" is checked against. `node scripts/import-edges.mjs`
// prints folder edges; `--files` prints file edges; both end with any import cycle found (file
// level). Exit status 1 when there is a cycle. Reads text only; runs nothing of the project.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, normalize, relative } from 'node:path';

const roots = ['src', 'actors'];
const byFiles = process.argv.includes('--files');

function sources(dir) {
  const found = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) found.push(...sources(path));
    else if (name.endsWith('.ts') && !name.endsWith('.d.ts')) found.push(path);
  }
  return found;
}

// import ... from '...', import '...', export ... from '...' (one statement may span lines).
const kImport = /(?:^|\n)\s*(import|export)\s+(type\s+)?([^'";]*?\s+from\s+)?['"](\.[^'"]+)['"]/g;

/** file -> [{ target, typeOnly }] for the relative imports of every source file. */
const edges = new Map();
const files = roots.flatMap((root) => sources(root));
for (const file of files) {
  const text = readFileSync(file, 'utf8');
  const list = [];
  for (const match of text.matchAll(kImport)) {
    const [, keyword, typeWord, clause, spec] = match;
    if (keyword === 'export' && clause === undefined) continue; // not a re-export
    const target = normalize(join(dirname(file), spec)).replace(/\.js$/, '.ts');
    list.push({ target, typeOnly: typeWord !== undefined });
  }
  edges.set(file, list);
}

const nodeOf = (file) => (byFiles ? file : dirname(file));
const counted = new Map(); // "a -> b" -> { values, types }
for (const [file, list] of edges) {
  for (const { target, typeOnly } of list) {
    const from = nodeOf(file);
    const to = nodeOf(target);
    if (from === to) continue;
    const key = `${from} -> ${to}`;
    const entry = counted.get(key) ?? { values: 0, types: 0 };
    if (typeOnly) entry.types += 1;
    else entry.values += 1;
    counted.set(key, entry);
  }
}
for (const key of [...counted.keys()].sort()) {
  const { values, types } = counted.get(key);
  const note = values === 0 ? `types only, ${types}` : types === 0 ? `${values}` : `${values} + ${types} type-only`;
  console.log(`${key}  (${note})`);
}

// Cycles between files (type-only edges count: they still tie the modules together).
const state = new Map();
const cycles = [];
function visit(file, path) {
  state.set(file, 'open');
  for (const { target } of edges.get(file) ?? []) {
    if (!edges.has(target)) continue;
    if (state.get(target) === 'open') cycles.push([...path.slice(path.indexOf(target)), target]);
    else if (!state.has(target)) visit(target, [...path, target]);
  }
  state.set(file, 'done');
}
for (const file of files) if (!state.has(file)) visit(file, [file]);
for (const line of new Set(cycles.map((cycle) => `cycle: ${cycle.map((file) => relative('.', file)).join(' -> ')}`))) console.log(line);
if (cycles.length === 0) console.log('no import cycles');
process.exitCode = cycles.length === 0 ? 0 : 1;
