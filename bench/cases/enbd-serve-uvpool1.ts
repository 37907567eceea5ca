/**
 * Case `enbd-serve-uvpool1` (opt-in diagnostic): `enbd serve` exactly as in enbd-serve but
 * with UV_THREADPOOL_SIZE=1, to measure what libuv thread-pool hand-offs (4 threads by
 * default, contending on 2 vCPUs) cost the file device.
 * Run: --cases nbdkit-file,enbd-serve,enbd-serve-uvpool1
 * Threads: harness main thread (the server is a child process).
 */
import type { BenchCase } from '../lib/case.js';
import serveCases from './enbd-serve.js';

const enbdServe = serveCases[0] as BenchCase;

const enbdServeUvPool1: BenchCase = {
  name: 'enbd-serve-uvpool1',
  description: 'enbd serve with UV_THREADPOOL_SIZE=1 (diagnostic)',
  order: 21,
  quick: false,
  optIn: true,
  tools: enbdServe.tools,
  runsWorkload: (workload) => workload.headline,
  unavailableReason: (context) => enbdServe.unavailableReason(context),
  start: (context) => enbdServe.start({
    ...context,
    spawn: (spec) => context.spawn({
      ...spec,
      label: 'enbd-serve-uvpool1',
      env: { ...(spec.env ?? process.env), UV_THREADPOOL_SIZE: '1' },
    }),
  }),
};

export default enbdServeUvPool1;
