/**
 * Where the build puts the worker entry points (actors/), for the layer that starts the
 * engine: the engine is handed the entry (MirrorOptions.actorEntry) instead of finding it by a
 * path relative to its own file. This file and bin/enbd are the only places that know the
 * layout of dist/ (dist/src/cli/ beside dist/actors/).
 *
 * Thread: main thread (a constant).
 */

/** The connection actor's worker entry (actors/connection-actor.ts, compiled). */
export const kConnectionActorEntry: URL = new URL('../../actors/connection-actor.js', import.meta.url);
