/**
 * Adapts a Node MessagePort or Worker to comlink's Endpoint (addEventListener style), so the
 * control plane between master and actors can use comlink. Handlers see `{ data }` like a
 * browser MessageEvent.
 * Threads: both sides of a worker boundary.
 */
import type { Endpoint } from 'comlink';
import type { MessagePort, Worker } from 'node:worker_threads';

type Handler = Parameters<Endpoint['addEventListener']>[1];
type Transfer = Parameters<Endpoint['postMessage']>[1];
type HandlerEvent = Parameters<Extract<Handler, (...args: never[]) => unknown>>[0];

export function portEndpoint(port: MessagePort | Worker): Endpoint {
  const wrappers = new Map<Handler, (data: unknown) => void>();
  return {
    postMessage(message: unknown, transfer?: Transfer): void {
      port.postMessage(message, transfer as never);
    },
    addEventListener(_type: string, handler: Handler): void {
      const wrapper = (data: unknown): void => {
        const event = { data } as HandlerEvent;
        if (typeof handler === 'function') handler(event);
        else handler.handleEvent(event);
      };
      wrappers.set(handler, wrapper);
      port.on('message', wrapper);
    },
    removeEventListener(_type: string, handler: Handler): void {
      const wrapper = wrappers.get(handler);
      if (wrapper === undefined) return;
      wrappers.delete(handler);
      port.off('message', wrapper);
    },
  };
}
