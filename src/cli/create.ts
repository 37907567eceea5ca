/**
 * `enbd create --leg URI --leg URI ... [--assume-clean] [--name NAME] [--bitmap-chunk BYTES]
 * [--force]`: writes fresh enbd metadata (src/meta) on every leg, with no daemon running.
 * Refusals (a leg with metadata and no --force, legs of different sizes, a leg too small, an
 * unreachable leg) reach main.ts's handler: `enbd: error: MESSAGE`, exit 1; every check runs
 * before the first write, so a refused create changes no leg.
 * Thread: main thread. Output goes to stdout.
 */
import type { Command } from 'commander';
import type { BlockDevice } from '../core/block-device.js';
import { EnbdError, describeError } from '../core/errors.js';
import { formatBytes } from '../control/format.js';
import { createArray, type CreateLeg } from '../meta/create-array.js';
import { checkBitmapChunk } from '../meta/layout.js';
import { LegMeta } from '../meta/leg-meta.js';
import { openLeg, parseLegUri } from '../stubs/open-leg.js';
import { parseBytes, usageError } from './parse.js';

const kConnectTimeoutMs = 10_000;

interface CreateOptions {
  leg: string[];
  assumeClean: boolean;
  name: string;
  bitmapChunk?: string;
  force: boolean;
}

function say(line: string): void {
  process.stdout.write(line + '\n');
}

/** Opens every leg (all or none: the ones opened are closed again on a failure). */
export async function openLegDevices(uris: string[]): Promise<BlockDevice[]> {
  const devices: BlockDevice[] = [];
  try {
    for (const uri of uris) {
      try {
        devices.push(await openLeg(parseLegUri(uri), { connectTimeoutMs: kConnectTimeoutMs }));
      } catch (error) {
        throw new EnbdError('ENBD_ERR_LEG', `cannot open leg ${uri}: ${describeError(error)}`, 0, { cause: error });
      }
    }
  } catch (error) {
    await Promise.allSettled(devices.map((device) => device.close()));
    throw error;
  }
  return devices;
}

export async function runCreate(options: CreateOptions): Promise<void> {
  if (options.leg.length === 0) throw new EnbdError('ENBD_ERR_USAGE', 'enbd create needs at least one --leg URI');
  let bitmapChunkBytes: number | undefined;
  if (options.bitmapChunk !== undefined) {
    bitmapChunkBytes = parseBytes('--bitmap-chunk', options.bitmapChunk);
    try {
      checkBitmapChunk(bitmapChunkBytes);
    } catch {
      throw usageError('--bitmap-chunk', 'a power of two from 4K to 1T', options.bitmapChunk);
    }
  }
  const devices = await openLegDevices(options.leg);
  const legs: CreateLeg[] = devices.map((device, index) => ({ uri: options.leg[index] ?? '', meta: new LegMeta(device) }));
  try {
    const result = await createArray(legs, {
      name: options.name,
      assumeClean: options.assumeClean,
      force: options.force,
      ...(bitmapChunkBytes !== undefined ? { bitmapChunkBytes } : {}),
    });
    const { layout } = result;
    say(`created array "${result.arrayName}" ${result.arrayUuid} on ${result.legs.length} leg(s)`);
    say(`  data size    ${layout.dataSizeBytes} bytes (${formatBytes(layout.dataSizeBytes)}) from offset 0 of each ${layout.legSizeBytes}-byte leg`);
    say(`  metadata     ${formatBytes(layout.metadataBytes)} at offset ${layout.metadataOffsetBytes} (bitmap, then superblock copies at ${layout.superblockOffsets[0]} and ${layout.superblockOffsets[1]})`);
    say(`  bitmap       chunk ${formatBytes(layout.bitmapChunkBytes)}, ${layout.chunkCount} chunks, ${formatBytes(layout.bitmapBytes)} in memory, ${formatBytes(layout.bitmapAreaBytes)} on each leg`);
    for (const leg of result.legs) {
      const overwrote = leg.overwroteArrayUuid === null ? '' : ` (overwrote array ${leg.overwroteArrayUuid})`;
      say(`  leg ${leg.slotIndex}        ${leg.legUuid} ${leg.state.padEnd(15)} ${leg.uri}${overwrote}`);
    }
    if (!options.assumeClean && result.legs.length > 1) say('  initial sync leg 0 is to be copied to the other legs (--assume-clean skips this)');
    say(`next: enbd mirror ${result.legs.map((leg) => `--leg ${leg.uri}`).join(' ')} --socket PATH (it assembles from this metadata)`);
  } finally {
    await Promise.allSettled(legs.map((leg) => leg.meta.close()));
  }
}

export function registerCreateCommand(program: Command): void {
  program
    .command('create')
    .description('write fresh enbd metadata (superblocks, write-intent bitmap) at the end of every leg')
    .option('--leg <uri>', 'a leg: nbd://host:port/export, nbd+unix:///export?socket=PATH, file:///path or a path (repeat; order = slot)', (value: string, previous: string[]) => [...previous, value], [] as string[])
    .option('--assume-clean', 'the legs already hold the same data: mark every leg in sync (no initial copy)', false)
    .option('--name <name>', 'array name recorded in the metadata', 'enbd')
    .option('--bitmap-chunk <bytes>', 'bytes per write-intent bitmap bit (power of two >= 4K; default from the leg size, like mdadm)')
    .option('--force', 'overwrite legs that already carry enbd metadata', false)
    .action(async (options: CreateOptions) => {
      await runCreate(options);
    });
}
