/**
 * Assembly: from what each leg's metadata says to a plan for this run of the daemon: which legs
 * are trusted as they are, which resync from the write-intent bitmap, which need a full copy,
 * and which combinations are refused. `planAssembly` is pure (no I/O, no clock) so every rule is
 * tested directly; `assembleArray` reads the legs, plans, and writes the claim.
 *
 * Thread: main thread, before the engine starts.
 *
 * Design notes: the rules, in the order they are checked
 * | case                                          | result                                     |
 * |-----------------------------------------------|--------------------------------------------|
 * | no leg has enbd metadata                      | refused: run `enbd create` (or             |
 * |                                               | `--metadata none`)                          |
 * | a leg with enbd magic but no valid copy       | refused: metadata destroyed                |
 * | legs of two arrays                            | refused, naming both arrays                |
 * | two --leg values with the same leg UUID       | refused: the same device given twice       |
 * | data sizes or bitmap chunks differ            | refused                                    |
 * | a leg claimed by a live daemon                | refused (same host: its pid is alive;      |
 * |                                               | other host: heartbeat fresher than stale)  |
 * | a stale claim (crash)                         | taken over, logged; the stop was unclean   |
 * | split brain: two legs each record the other   | refused unless --force-source names the    |
 * | as not in sync, and no given leg in sync went | survivor                                   |
 * | on from both their last generations           |                                            |
 * |                                               |                                            |
 * | (generations: superblock `generations`; a new | a leg whose history holds another's current|
 * | one per assembly and per table change)        | generation holds all that leg holds        |
 * | a member of the array not given (not removed) | refused unless --degraded                  |
 * | a blank leg, or one whose UUID the array does | a new member: full resync                  |
 * | not know for its slot                         |                                            |
 * | freshest (max events), recorded in sync       | in sync (after an unclean stop: only the   |
 * |                                               | first such leg; the rest resync the bitmap)|
 * | older events, or recorded needs-resync        | bitmap resync                              |
 * | recorded needs-full-sync or removed           | full resync                                |
 * The chunks a bitmap resync copies are the union of every given leg's bitmap: each leg's
 * bitmap holds every chunk written since any member left (bits are never cleared while a member
 * is out), so the union covers what any stale leg missed.
 *
 * Invariants:
 * - A plan has at least one `in-sync` leg, and after an unclean stop exactly one (the source).
 * - planAssembly throws nothing but EnbdError('ENBD_ERR_META') for any input.
 */
import { hostname } from 'node:os';
import { randomUUID } from 'node:crypto';
import type { BlockDevice } from '../core/block-device.js';
import { assert } from '../core/assert.js';
import { EnbdError, describeError } from '../core/errors.js';
import { computeLayout, type LegLayout } from './layout.js';
import { LegMeta, type LegMetaRead } from './leg-meta.js';
import { kMembersMax, newGenerationId, nextGenerations, type CheckpointRecord, type MemberRecord, type OwnerRecord, type Superblock } from './superblock.js';

/** A heartbeat older than this marks another host's claim as stale (the owner writes every 5 s). */
export const kClaimStaleMs = 30_000;
export const kHeartbeatMs = 5_000;
/** Pause between writing the claim and reading it back. */
export const kClaimSettleMs = 300;

export type LegRole = 'in-sync' | 'bitmap-resync' | 'full-resync';

export interface FoundLeg {
  uri: string;
  /** What LegMeta.read() found. */
  read: LegMetaRead;
  /** The leg's bitmap (layout.bitmapBytes bytes), null when it has no valid superblock. */
  bitmap: Uint8Array | null;
}

export interface AssemblyOptions {
  /** --force-source: the index (in the --leg list) of the leg every other leg is synced from. */
  forceSource: number | null;
  /** --degraded: run without members that are not given. */
  degraded: boolean;
  nowMs: number;
  host: string;
  pid: number;
  /** True when a process with this pid runs on this host. */
  pidAlive: (pid: number) => boolean;
  newUuid?: () => string;
  /** A new generation id (16 hex digits; default random). */
  newGeneration?: () => string;
  staleClaimMs?: number;
  /**
   * Write-mostly legs (indexes in the --leg list): after an unclean stop they are not chosen as
   * the source while another freshest leg is in sync (with --write-behind a write-mostly leg may
   * lag: its last writes are only in the bitmap, and the fast legs hold them).
   */
  writeMostly?: readonly number[];
  /**
   * Names given on the command line (by position; null: none). A given name is recorded in the
   * leg's member; otherwise the member's recorded name is kept (unless a given name or an
   * earlier leg took it, or the leg is new to the array).
   */
  legNames?: ReadonlyArray<string | null>;
}

export interface PlannedLeg {
  uri: string;
  slotIndex: number;
  legUuid: string;
  role: LegRole;
  /** One line for the log and the banner: why this role. */
  why: string;
  /** True when the leg had no usable metadata of this array (it gets fresh metadata). */
  fresh: boolean;
}

export interface AssemblyPlan {
  arrayUuid: string;
  arrayName: string;
  createdMs: number;
  layout: LegLayout;
  /** events of the freshest leg; the claim is written with events + 1. */
  previousEvents: number;
  events: number;
  /** Member table to write, by slot. */
  members: MemberRecord[];
  /** Generation history to write, newest first: a new generation, then the reference leg's. */
  generations: string[];
  legs: PlannedLeg[];
  /** Union of the given legs' bitmaps: the chunks a bitmap resync copies. */
  bitmap: Uint8Array;
  /** The last run did not stop cleanly (state active, or a stale claim). */
  unclean: boolean;
  /** Checkpoints as the freshest leg recorded them (carried into the claim). */
  checkpoints: CheckpointRecord[];
  /** Stale claims taken over (for the log). */
  takenOver: OwnerRecord[];
  /** Lines for the log: what assembly decided and why. */
  notes: string[];
}

/**
 * The array's layout: the reference leg's, with the recorded data size (a member larger than the
 * others keeps the array's data size; its metadata still sits at its own end).
 */
function arrayLayout(sb: Superblock): LegLayout {
  const own = computeLayout(sb.legSizeBytes, sb.bitmapChunkBytes);
  if (own.dataSizeBytes < sb.dataSizeBytes) refuse(`leg ${sb.legUuid} records a ${sb.dataSizeBytes}-byte data area that its own layout cannot hold`);
  const chunkCount = sb.dataSizeBytes / sb.bitmapChunkBytes;
  return { ...own, dataSizeBytes: sb.dataSizeBytes, chunkCount, bitmapBytes: Math.ceil(chunkCount / 8) };
}

function refuse(message: string): never {
  throw new EnbdError('ENBD_ERR_META', message);
}

function claimIsLive(owner: OwnerRecord, options: AssemblyOptions): boolean {
  if (owner.host === options.host) return owner.pid !== options.pid && options.pidAlive(owner.pid);
  return options.nowMs - owner.heartbeatMs < (options.staleClaimMs ?? kClaimStaleMs);
}

/** Did `a` run without `b`: does it record b's slot as not in sync, or not know b there? */
function recordsStale(a: Superblock, b: Superblock): boolean {
  // The slot counts, not the UUID: a member replaced on a's side (a new UUID in b's slot while
  // a ran without b) does not hide that b ran alone too.
  // And a that does not know b at all (another UUID in b's slot, or no such slot) ran without b.
  const record = a.members[b.slotIndex];
  return record === undefined || record.legUuid !== b.legUuid || record.state !== 'in-sync';
}

/** Does the leg record itself as in sync (it ran as a source, not as a resync target)? */
function selfInSync(sb: Superblock): boolean {
  return sb.members[sb.slotIndex]?.state === 'in-sync';
}

/**
 * Does `a` hold everything `b` holds? True when `a` records itself in sync and its generation
 * history holds b's current generation: `b` took its writes in that generation (or before it,
 * on the same line), and `a` went on from it as a member in sync, or resynced from one that did.
 * What `b` got of that generation's last writes and `a` did not (a crash, a write in flight when
 * b left) is under bits of the write-intent bitmap that every leg admitted then holds, and bits
 * are never cleared while a member is out. False without generations (older metadata).
 */
function descendsFrom(a: Superblock, b: Superblock): boolean {
  const current = b.generations?.[0];
  return current !== undefined && selfInSync(a) && (a.generations ?? []).includes(current);
}

/** Plans an assembly from what every given leg holds; throws EnbdError('ENBD_ERR_META') when refused. */
export function planAssembly(found: FoundLeg[], options: AssemblyOptions): AssemblyPlan {
  const newUuid = options.newUuid ?? randomUUID;
  if (found.length === 0) refuse('no legs given');
  for (const [index, leg] of found.entries()) {
    if (leg.read.hasMetadata && leg.read.superblock === null) {
      const reasons = leg.read.copies.map((copy) => `copy ${copy.copyIndex}: ${copy.reason ?? 'valid'}`).join('; ');
      refuse(`leg ${index} (${leg.uri}) has damaged enbd metadata (${reasons}); inspect it with 'enbd examine ${leg.uri}', then recreate it with 'enbd create --force' or replace the leg`);
    }
  }
  const valid = found.map((leg, index) => ({ index, leg, sb: leg.read.superblock })).filter((entry): entry is { index: number; leg: FoundLeg; sb: Superblock } => entry.sb !== null);
  if (valid.length === 0) {
    refuse(`no leg carries enbd metadata; create an array first: enbd create ${found.map((leg) => `--leg ${leg.uri}`).join(' ')} (or run with --metadata none, unprotected against crashes and stale legs)`);
  }
  const arrays = new Map<string, string[]>();
  for (const { index, leg, sb } of valid) arrays.set(sb.arrayUuid, [...(arrays.get(sb.arrayUuid) ?? []), `leg ${index} (${leg.uri})`]);
  if (arrays.size > 1) {
    const list = [...arrays.entries()].map(([uuid, legs]) => `array ${uuid}: ${legs.join(', ')}`).join('; ');
    refuse(`the legs belong to different arrays (${list}); give the legs of one array, or recreate one with 'enbd create --force'`);
  }
  const seenUuid = new Map<string, number>();
  for (const { index, sb } of valid) {
    const other = seenUuid.get(sb.legUuid);
    if (other !== undefined) refuse(`legs ${other} and ${index} carry the same leg UUID ${sb.legUuid}: the same device is given twice`);
    seenUuid.set(sb.legUuid, index);
  }
  const first = valid[0] as { index: number; leg: FoundLeg; sb: Superblock };
  for (const { index, leg, sb } of valid) {
    if (sb.dataSizeBytes !== first.sb.dataSizeBytes || sb.bitmapChunkBytes !== first.sb.bitmapChunkBytes) {
      refuse(`leg ${index} (${leg.uri}) has a ${sb.dataSizeBytes}-byte data area with ${sb.bitmapChunkBytes}-byte chunks, leg ${first.index} has ${first.sb.dataSizeBytes} with ${first.sb.bitmapChunkBytes}; the legs' data sizes differ`);
    }
  }
  const takenOver: OwnerRecord[] = [];
  for (const { index, leg, sb } of valid) {
    const owner = sb.owner;
    if (owner === null) continue;
    if (claimIsLive(owner, options)) {
      const ageSeconds = Math.max(0, Math.round((options.nowMs - owner.heartbeatMs) / 1000));
      refuse(`leg ${index} (${leg.uri}) is in use by enbd pid ${owner.pid} on ${owner.host} (heartbeat ${ageSeconds} s ago); stop that daemon first (a claim is stale ${Math.round((options.staleClaimMs ?? kClaimStaleMs) / 1000)} s after its last heartbeat)`);
    }
    if (!takenOver.some((seen) => seen.host === owner.host && seen.pid === owner.pid)) takenOver.push(owner);
  }
  const notes: string[] = [];
  for (const owner of takenOver) notes.push(`taking over the stale claim of pid ${owner.pid} on ${owner.host} (it did not stop cleanly)`);

  // Split brain: two legs each record the other as not in sync.
  let forced = options.forceSource;
  if (forced !== null) {
    if (!Number.isInteger(forced) || forced < 0 || forced >= found.length) refuse(`--force-source ${forced}: there is no leg ${forced} (legs are 0..${found.length - 1})`);
    if (found[forced]?.read.superblock === null) refuse(`--force-source ${forced}: leg ${forced} (${found[forced]?.uri}) has no enbd metadata to trust`);
  }
  for (const a of valid) {
    for (const b of valid) {
      // One table (a generation written to both while both resynced) records both stale and each
      // itself stale too: no divergence. A split brain has at least one leg that ran as in-sync.
      if (a.index >= b.index || !recordsStale(a.sb, b.sb) || !recordsStale(b.sb, a.sb) || (!selfInSync(a.sb) && !selfInSync(b.sb))) continue;
      // A given leg (one of the two, or a third) went on from both legs' last generations: it
      // holds what each holds, so neither's writes are lost (the others resync from the bitmap).
      const holder = valid.find((c) => (c === a || descendsFrom(c.sb, a.sb)) && (c === b || descendsFrom(c.sb, b.sb)));
      if (holder !== undefined) {
        notes.push(`legs ${a.index} and ${b.index} each record the other out of sync, but leg ${holder.index} went on from the last generation of ${holder === a || holder === b ? `leg ${holder === a ? b.index : a.index}` : 'both'}: no split brain, the stale leg resyncs`);
        continue;
      }
      if (forced === null) {
        refuse(`split brain: leg ${a.index} (${a.leg.uri}, events ${a.sb.events}) and leg ${b.index} (${b.leg.uri}, events ${b.sb.events}) each ran without the other and may each hold writes the other lacks; pick the survivor with --force-source LEG (the other legs are resynced from it; their differing writes are lost)`);
      }
      notes.push(`split brain between legs ${a.index} and ${b.index}: --force-source ${forced} decides`);
    }
  }

  const maxEvents = Math.max(...valid.map((entry) => entry.sb.events));
  const freshest = valid.find((entry) => entry.sb.events === maxEvents) as { index: number; leg: FoundLeg; sb: Superblock };
  const reference = forced !== null ? (valid.find((entry) => entry.index === forced) as typeof freshest) : freshest;
  const table = reference.sb.members.map((member) => ({ ...member }));
  const unclean = valid.some((entry) => entry.sb.state === 'active' || entry.sb.owner !== null);
  const layout = arrayLayout(reference.sb);

  // Which slot each given leg takes.
  const slotOf = new Array<number>(found.length).fill(-1);
  const given = new Set<number>();
  for (const { index, sb } of valid) {
    const record = table[sb.slotIndex];
    if (record !== undefined && record.legUuid === sb.legUuid && record.state !== 'removed' && !given.has(sb.slotIndex)) {
      slotOf[index] = sb.slotIndex;
      given.add(sb.slotIndex);
    }
  }
  const legUuidOf = new Array<string>(found.length).fill('');
  for (const [index, leg] of found.entries()) {
    if (slotOf[index] !== -1) {
      legUuidOf[index] = table[slotOf[index] as number]?.legUuid ?? '';
      continue;
    }
    // A new member: a blank leg, or one the array does not know in its slot. A leg of this array
    // that records itself in sync but whose slot the freshest legs gave to another leg (a blank
    // leg took it while this one was away) may have run alone and hold writes they lack: refused
    // unless --force-source names the survivor.
    const own = leg.read.superblock;
    // Unless a given leg went on from its last generation (then it holds nothing they lack).
    const heldElsewhere = own !== null && valid.some((c) => c.sb !== own && descendsFrom(c.sb, own));
    if (own !== null && own.arrayUuid === reference.sb.arrayUuid && selfInSync(own) && forced === null && !heldElsewhere) {
      refuse(`leg ${index} (${leg.uri}) is a member of this array (leg UUID ${own.legUuid}, slot ${own.slotIndex}, events ${own.events}) that the freshest legs no longer know in its slot, yet it records itself in sync: it may hold writes the others lack (a split brain); pick the survivor with --force-source LEG, or wipe this leg's metadata (enbd create --force on it alone) to add it as a new leg`);
    }
    const dataSize = (() => {
      try {
        return computeLayout(leg.read.legSizeBytes, layout.bitmapChunkBytes).dataSizeBytes;
      } catch (error) {
        refuse(`leg ${index} (${leg.uri}) cannot hold this array's metadata: ${describeError(error)}`);
      }
    })();
    if (dataSize < layout.dataSizeBytes) {
      refuse(`leg ${index} (${leg.uri}) is a new leg of ${leg.read.legSizeBytes} bytes, too small for the array's ${layout.dataSizeBytes}-byte data area plus metadata; it needs at least ${layout.legSizeBytes} bytes`);
    }
    // It takes the slot of a member that is not given (the leg it replaces), else a new slot.
    let slot = table.findIndex((_record, at) => !given.has(at));
    if (slot < 0) {
      if (table.length >= kMembersMax) refuse(`the array already has ${kMembersMax} members`);
      slot = table.length;
      table.push({ legUuid: '', state: 'removed', events: 0, recoveryOffsetBytes: 0 });
    }
    const legUuid = newUuid();
    const replaced = table[slot] as MemberRecord;
    notes.push(`leg ${index} (${leg.uri}) ${leg.read.superblock === null ? 'has no enbd metadata' : `carries leg UUID ${leg.read.superblock.legUuid}, unknown to the array in its slot`}: a new member in slot ${slot}${replaced.legUuid !== '' && replaced.state !== 'removed' ? ` (replacing ${replaced.legUuid})` : ''}, full resync`);
    table[slot] = { legUuid, state: 'needs-full-sync', events: 0, recoveryOffsetBytes: 0 };
    slotOf[index] = slot;
    legUuidOf[index] = legUuid;
    given.add(slot);
  }

  // Members that are not given.
  for (const [slot, record] of table.entries()) {
    if (given.has(slot) || record.state === 'removed') continue;
    if (!options.degraded) {
      refuse(`member ${slot} of the array (leg UUID ${record.legUuid}, ${record.state}) is not given; add its --leg, or pass --degraded to run without it (it then needs a resync when it returns)`);
    }
    if (record.state === 'in-sync') record.state = 'needs-resync';
    notes.push(`member ${slot} (${record.legUuid}) is not given (--degraded): recorded ${record.state}`);
  }

  // Roles.
  const legs: PlannedLeg[] = [];
  let source = -1;
  for (const [index, leg] of found.entries()) {
    const slotIndex = slotOf[index] as number;
    const record = table[slotIndex] as MemberRecord;
    const sb = leg.read.superblock;
    const known = sb !== null && sb.arrayUuid === reference.sb.arrayUuid && sb.legUuid === record.legUuid;
    let role: LegRole;
    let why: string;
    if (!known || record.state === 'needs-full-sync' || sb.members[sb.slotIndex]?.state === 'needs-full-sync') {
      role = 'full-resync';
      why = known ? 'recorded as needing a full sync' : 'a new member';
    } else if (forced !== null) {
      role = index === forced ? 'in-sync' : 'bitmap-resync';
      why = index === forced ? 'named by --force-source' : `synced from leg ${forced} (--force-source)`;
    } else if (sb.events === maxEvents && record.state === 'in-sync') {
      role = 'in-sync';
      why = 'freshest';
    } else {
      role = 'bitmap-resync';
      why = sb.events < maxEvents ? `stale (events ${sb.events} < ${maxEvents})` : `recorded ${record.state}`;
    }
    if (role === 'in-sync') {
      if (source < 0) source = index;
      else if (unclean) {
        role = 'bitmap-resync';
        why = `unclean stop: the chunks the bitmap marks are copied from leg ${source}`;
      }
    }
    legs.push({ uri: leg.uri, slotIndex, legUuid: legUuidOf[index] as string, role, why, fresh: !known });
  }
  const writeMostly = options.writeMostly ?? [];
  if (unclean && source >= 0 && writeMostly.includes(source)) {
    const better = legs.findIndex((planned, index) => !writeMostly.includes(index) && planned.why.startsWith('unclean stop: '));
    if (better >= 0) {
      const previous = source;
      source = better;
      for (const [index, planned] of legs.entries()) {
        if (index === source) {
          planned.role = 'in-sync';
          planned.why = 'freshest';
        } else if (index === previous || planned.why.startsWith('unclean stop: ')) {
          planned.role = 'bitmap-resync';
          planned.why = `unclean stop: the chunks the bitmap marks are copied from leg ${source}${index === previous ? ' (this leg is write-mostly and may have lagged)' : ''}`;
        }
      }
    }
  }
  if (source < 0) {
    refuse(`no leg is known to be up to date (${legs.map((leg, index) => `leg ${index}: ${leg.why}`).join('; ')}); name the leg to trust with --force-source LEG`);
  }
  const events = maxEvents + 1;
  const generations = nextGenerations(reference.sb.generations ?? [], (options.newGeneration ?? newGenerationId)());
  for (const planned of legs) {
    const record = table[planned.slotIndex] as MemberRecord;
    record.legUuid = planned.legUuid;
    if (planned.role === 'in-sync') {
      record.state = 'in-sync';
      record.events = events;
    } else if (planned.role === 'bitmap-resync') record.state = 'needs-resync';
    else record.state = 'needs-full-sync';
  }
  applyLegNames(table, legs, options.legNames ?? []);
  const bitmap = new Uint8Array(layout.bitmapBytes);
  for (const { leg, sb } of valid) {
    if (sb.arrayUuid !== reference.sb.arrayUuid || leg.bitmap === null) continue;
    for (let at = 0; at < bitmap.length; at += 1) bitmap[at] = (bitmap[at] as number) | (leg.bitmap[at] ?? 0);
  }
  return {
    arrayUuid: reference.sb.arrayUuid,
    arrayName: reference.sb.arrayName,
    createdMs: reference.sb.createdMs,
    layout,
    previousEvents: maxEvents,
    events,
    members: table,
    generations,
    legs,
    bitmap,
    unclean,
    checkpoints: reference.sb.checkpoints ?? [],
    takenOver,
    notes,
  };
}

/** Given names win; a recorded name is kept when free (a new leg does not inherit its slot's old name). */
function applyLegNames(table: MemberRecord[], legs: readonly PlannedLeg[], given: ReadonlyArray<string | null>): void {
  const taken = new Set(given.filter((name): name is string => name !== null));
  for (const [index, planned] of legs.entries()) {
    const record = table[planned.slotIndex] as MemberRecord;
    const name = given[index] ?? null;
    if (name !== null) {
      record.name = name;
      continue;
    }
    const recorded = planned.fresh ? undefined : record.name;
    if (recorded !== undefined && !taken.has(recorded)) taken.add(recorded);
    else delete record.name;
  }
}

/** A leg as the engine gets it after assembly: its slot, UUID and where its superblock writes go. */
export interface AssembledLeg extends PlannedLeg {
  legSizeBytes: number;
  /** The superblock copy last written and its sequence (the next write goes to the other). */
  lastCopy: number;
  lastSequence: number;
}

export interface AssembledArray {
  plan: AssemblyPlan;
  legs: AssembledLeg[];
  owner: OwnerRecord;
}

/**
 * The superblock a leg gets for a member table and state: the array's data size, the bitmap
 * where this leg's own layout puts it (`legLayout`: a larger leg keeps its metadata at its end).
 */
export function superblockFor(plan: Pick<AssemblyPlan, 'arrayUuid' | 'arrayName' | 'createdMs' | 'layout'>, legLayout: LegLayout, leg: { slotIndex: number; legUuid: string }, members: MemberRecord[], events: number, state: Superblock['state'], owner: OwnerRecord | null, nowMs: number, checkpoints: CheckpointRecord[] = [], generations: readonly string[] = []): Superblock {
  assert(legLayout.dataSizeBytes >= plan.layout.dataSizeBytes && legLayout.bitmapChunkBytes === plan.layout.bitmapChunkBytes, 'the leg holds the array');
  return {
    arrayUuid: plan.arrayUuid,
    arrayName: plan.arrayName,
    legUuid: leg.legUuid,
    slotIndex: leg.slotIndex,
    members: members.map((member) => ({ ...member })),
    legSizeBytes: legLayout.legSizeBytes,
    dataSizeBytes: plan.layout.dataSizeBytes,
    bitmapChunkBytes: plan.layout.bitmapChunkBytes,
    bitmapOffsetBytes: legLayout.bitmapOffsetBytes,
    bitmapAreaBytes: legLayout.bitmapAreaBytes,
    events,
    state,
    owner,
    createdMs: plan.createdMs,
    updatedMs: nowMs,
    ...(checkpoints.length > 0 ? { checkpoints } : {}),
    ...(generations.length > 0 ? { generations: [...generations] } : {}),
  };
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Reads every leg's metadata, plans (planAssembly), and claims the legs: writes the union bitmap
 * and a superblock with the new member table, state active, events + 1 and this daemon as owner
 * on every leg, then reads the claims back (another daemon claiming at the same moment loses
 * one of them and is refused). The devices are closed on return; the engine opens its own.
 */
export async function assembleArray(uris: string[], devices: BlockDevice[], options: Omit<AssemblyOptions, 'nowMs' | 'host' | 'pid' | 'pidAlive'> & Partial<AssemblyOptions>): Promise<AssembledArray> {
  const full: AssemblyOptions = { host: hostname(), pid: process.pid, pidAlive, nowMs: Date.now(), ...options };
  const metas = devices.map((device) => new LegMeta(device));
  try {
    const found: FoundLeg[] = [];
    for (const [index, meta] of metas.entries()) {
      const read = await meta.read();
      let bitmap: Uint8Array | null = null;
      if (read.superblock !== null) {
        const layout = computeLayout(read.superblock.legSizeBytes, read.superblock.bitmapChunkBytes);
        bitmap = (await meta.readBitmap(layout)).slice();
      }
      found.push({ uri: uris[index] ?? '', read, bitmap });
    }
    const plan = planAssembly(found, full);
    const owner: OwnerRecord = { host: full.host, pid: full.pid, heartbeatMs: full.nowMs };
    const legs: AssembledLeg[] = [];
    for (const [index, meta] of metas.entries()) {
      const planned = plan.legs[index] as PlannedLeg;
      const layout = computeLayout(meta.sizeBytes, plan.layout.bitmapChunkBytes);
      // The bitmap first, then the superblock that points at it.
      await meta.writeBitmapPages(layout, plan.bitmap.length === layout.bitmapBytes ? plan.bitmap : resized(plan.bitmap, layout.bitmapBytes), 0, layout.bitmapAreaBytes / 4096);
      const sb = superblockFor(plan, layout, planned, plan.members, plan.events, 'active', owner, full.nowMs, plan.checkpoints, plan.generations);
      const written = await meta.writeSuperblock(sb);
      legs.push({ ...planned, legSizeBytes: meta.sizeBytes, lastCopy: written.copyIndex, lastSequence: written.sequence });
    }
    // Read the claims back after a pause: a second daemon that read the legs before our claim
    // landed writes its own claim within it, and one of the two then sees the other's.
    await new Promise((resolve) => setTimeout(resolve, kClaimSettleMs));
    for (const [index, meta] of metas.entries()) {
      const back = await meta.read();
      const claim = back.superblock?.owner;
      if (claim === undefined || claim === null || claim.pid !== owner.pid || claim.host !== owner.host || claim.heartbeatMs !== owner.heartbeatMs) {
        refuse(`leg ${index} (${uris[index]}) was claimed by another daemon while this one assembled (${claim === null || claim === undefined ? 'no claim' : `pid ${claim.pid} on ${claim.host}`}); only one enbd may run on a set of legs`);
      }
    }
    return { plan, legs, owner };
  } finally {
    await Promise.allSettled(devices.map((device) => device.close()));
  }
}

function resized(bitmap: Uint8Array, bytes: number): Uint8Array {
  const out = new Uint8Array(bytes);
  out.set(bitmap.subarray(0, Math.min(bytes, bitmap.length)));
  return out;
}
