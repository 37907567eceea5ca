/**
 * The mirror's NBD status contexts beyond base:allocation (issue 17): each checkpoint as
 * `qemu:dirty-bitmap:NAME` (bit 0 = changed since the checkpoint, the name and meaning qemu
 * uses, so qemu-img, nbdinfo and backup tools read it as they read qemu's), and each leg's
 * resync dirty map as `enbd:dirty:LEG` (bit 0 = the leg may not hold the latest data there:
 * read-only insight for operators).
 *
 * Thread: main thread (the NBD server asks at negotiation and per BLOCK_STATUS).
 * Invariant: names are computed when asked (checkpoints come and go); a name that no longer
 * resolves gives null (the server then reports the range dirty).
 */
import type { DirtyMap } from '../bitmap/dirty-map.js';
import type { MetaContextSource } from '../nbd/server/meta-contexts.js';
import type { MirrorDevice } from './mirror.js';

export const kCheckpointContextPrefix = 'qemu:dirty-bitmap:';
export const kLegDirtyContextPrefix = 'enbd:dirty:';

export function mirrorStatusContexts(mirror: MirrorDevice): MetaContextSource {
  return {
    names(): string[] {
      const names = mirror.checkpoints.names().map((name) => kCheckpointContextPrefix + name);
      for (const leg of mirror.legStatus()) if (leg.state !== 'removed') names.push(`${kLegDirtyContextPrefix}${leg.index}`);
      return names;
    },
    map(name: string): DirtyMap | null {
      if (name.startsWith(kCheckpointContextPrefix)) return mirror.checkpoints.map(name.slice(kCheckpointContextPrefix.length));
      if (!name.startsWith(kLegDirtyContextPrefix)) return null;
      const index = Number(name.slice(kLegDirtyContextPrefix.length));
      const leg = mirror.legStatus().find((view) => view.index === index && view.state !== 'removed');
      return leg === undefined ? null : mirror.dirtyMap(index);
    },
  };
}
