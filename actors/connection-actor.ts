/**
 * Worker entry point of a connection actor: wires LegActor (src/engine/leg-actor.ts) to a
 * worker thread. Control plane: comlink over the worker's parentPort. Per-leg copy mode
 * payloads arrive on a dedicated MessagePort (workerData.copyPort) so they never mix with
 * comlink's RPC messages.
 * Thread: one worker per leg.
 */
import { parentPort, workerData, type MessagePort } from 'node:worker_threads';
import * as Comlink from 'comlink';
import { portEndpoint } from '../src/core/comlink-endpoint.js';
import { createLogger } from '../src/core/log.js';
import { LegActor } from '../src/engine/leg-actor.js';
import type { CopyMessage, LegActorInit } from '../src/engine/messages.js';

interface ConnectionActorData extends LegActorInit {
  copyPort: MessagePort;
}

const data = workerData as ConnectionActorData;
const logger = createLogger({ level: data.logLevel, name: `enbd-leg${data.legIndex}`, pretty: false });
const actor = new LegActor(data, logger);
data.copyPort.on('message', (message: CopyMessage) => actor.onCopyMessage(message));
if (parentPort === null) throw new Error('connection-actor must run as a worker');
Comlink.expose(actor, portEndpoint(parentPort));
