import { fileURLToPath } from 'node:url';
import { createAddonNative, loadBinding } from './addon.js';
import { createFallbackNative } from './fallback.js';
import type { NativeIO } from './types.js';

/** Where `npm install` (scripts/install.mjs, node-gyp) puts the addon; same path from src/ and dist/. */
export const ADDON_PATH = fileURLToPath(new URL('../build/Release/shear_native.node', import.meta.url));

/** The environment variable that forces the fallback: SHEAR_NATIVE=0. */
export const NATIVE_ENV_VAR = 'SHEAR_NATIVE';

export interface LoadNativeOptions {
  /** true: the fallback; false: the addon whatever the environment says; unset: SHEAR_NATIVE decides. */
  forceFallback?: boolean;
  /** Another addon file (tests). */
  addonPath?: string;
  env?: NodeJS.ProcessEnv;
}

export function fallbackForcedByEnv(env: NodeJS.ProcessEnv = process.env): boolean {
  return env[NATIVE_ENV_VAR] === '0';
}

/**
 * The addon when it loads, else the fallback with the load error. Never throws. Cheap after the
 * first call (Node caches the loaded addon); callers that want one shared instance use getNative().
 */
export function loadNative(opts: LoadNativeOptions = {}): NativeIO {
  const forced = opts.forceFallback ?? fallbackForcedByEnv(opts.env);
  if (forced) {
    return createFallbackNative(opts.forceFallback ? 'forced by loadNative({ forceFallback: true })' : `forced by ${NATIVE_ENV_VAR}=0`);
  }
  const path = opts.addonPath ?? ADDON_PATH;
  try {
    return createAddonNative(loadBinding(path));
  } catch (err) {
    const loadError = err instanceof Error ? err : new Error(String(err));
    return createFallbackNative(`the addon did not load: ${loadError.message.split('\n')[0]}`, loadError);
  }
}

let shared: NativeIO | undefined;

/** The process's (or worker thread's) NativeIO, chosen once from SHEAR_NATIVE and the addon's presence. */
export function getNative(): NativeIO {
  shared ??= loadNative();
  return shared;
}
