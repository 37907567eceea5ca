/**
 * The enbd version (kept equal to package.json's "version"; test/unit/core/version.test.ts checks).
 * Threads: any.
 */
export const kVersion = '0.1.0';
