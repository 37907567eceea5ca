/**
 * Control methods for checkpoints (changed-block tracking, issue 17): create, list, remove,
 * freeze (one engine step for `enbd backup --new-checkpoint`) and runs (the changed extents,
 * paged, for `enbd backup`).
 *
 * Thread: the daemon's main thread. Each method is one MirrorOperations.checkpointOperations
 * call (the engine's narrow face); create, remove and freeze then wait for one superblock write (the checkpoint list is durable on the legs
 * before the answer), except with --metadata none (memory only: `persistent: false`).
 *
 * Design notes
 * | method             | params                 | engine call                               |
 * |--------------------|------------------------|-------------------------------------------|
 * | checkpoint.create  | name                   | checkpoints.create (seeded with writes in |
 * |                    |                        | flight), persistCheckpoints               |
 * | checkpoint.list    |                        | checkpoints.list                          |
 * | checkpoint.remove  | name                   | checkpoints.remove, persistCheckpoints    |
 * | checkpoint.freeze  | since, next            | checkpoints.freeze, persistCheckpoints    |
 * | checkpoint.runs    | name, offset?, length? | changed runs (at most kCheckpointRunsMax) |
 */
import type { CheckpointOperations, MirrorOperations } from '../engine/view.js';
import { kCheckpointRunsMax, type CheckpointActionResult, type CheckpointFreezeResult, type CheckpointListResult, type CheckpointMethod, type CheckpointRunsResult } from './protocol.js';
import type { MethodHandler } from './server.js';
import { ControlRequestError } from './server.js';
import { kControlErrorCodes } from './protocol.js';

function stringParam(params: Record<string, unknown>, key: string): string {
  const value = params[key];
  if (typeof value !== 'string') throw new ControlRequestError(kControlErrorCodes.badParams, `params.${key} must be a checkpoint name`);
  return value;
}

function countParam(params: Record<string, unknown>, key: string, fallback: number): number {
  const value = params[key];
  if (value === undefined || value === null) return fallback;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new ControlRequestError(kControlErrorCodes.badParams, `params.${key} must be a non-negative integer`);
  }
  return value;
}

export function checkpointHandlers(mirror: MirrorOperations): Array<[CheckpointMethod, MethodHandler]> {
  const operations = (): CheckpointOperations => mirror.checkpointOperations();
  const create = async (params: Record<string, unknown>): Promise<CheckpointActionResult> => {
    const ops = operations();
    return { checkpoint: await ops.create(stringParam(params, 'name')), persistent: ops.persistent };
  };
  const list = (): CheckpointListResult => {
    const ops = operations();
    return { granularityBytes: ops.granularityBytes, persistent: ops.persistent, checkpoints: ops.list() };
  };
  const remove = async (params: Record<string, unknown>): Promise<CheckpointActionResult> => {
    const ops = operations();
    return { checkpoint: await ops.remove(stringParam(params, 'name')), persistent: ops.persistent };
  };
  const freeze = async (params: Record<string, unknown>): Promise<CheckpointFreezeResult> => {
    const ops = operations();
    const { frozen, created } = await ops.freeze(stringParam(params, 'since'), stringParam(params, 'next'));
    return { frozen, created, persistent: ops.persistent, sizeBytes: mirror.sizeBytes };
  };
  const runs = (params: Record<string, unknown>): CheckpointRunsResult => {
    const name = stringParam(params, 'name');
    const offsetBytes = countParam(params, 'offset', 0);
    const sizeBytes = mirror.sizeBytes;
    const lengthBytes = countParam(params, 'length', Math.max(0, sizeBytes - offsetBytes));
    const endBytes = Math.min(sizeBytes, offsetBytes + lengthBytes);
    const found = offsetBytes >= endBytes ? [] : operations().runs(name, offsetBytes, endBytes - offsetBytes, kCheckpointRunsMax);
    const last = found[found.length - 1];
    const full = found.length >= kCheckpointRunsMax && last !== undefined && last.offsetBytes + last.lengthBytes < endBytes;
    return { name, sizeBytes, runs: found, nextOffsetBytes: full && last !== undefined ? last.offsetBytes + last.lengthBytes : null };
  };
  return [
    ['checkpoint.create', create],
    ['checkpoint.list', list],
    ['checkpoint.remove', remove],
    ['checkpoint.freeze', freeze],
    ['checkpoint.runs', runs],
  ];
}
