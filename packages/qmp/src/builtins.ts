import { ArgReader, ShearError } from '@shear/base';
import { withQmpClass } from './errors.js';
import type { CommandRegistry, QmpSessionInfo } from './registry.js';
import type { QmpSession } from './session.js';

/** QEMU's VersionInfo (query-version and the greeting); member order as QEMU writes it. */
export interface QmpVersionInfo {
  qemu: { micro: number; minor: number; major: number };
  package: string;
}

/** Capabilities a client may enable (QMPCapability); Shear offers none of them. */
const KNOWN_CAPABILITIES = ['oob'] as const;

export interface BuiltinHooks {
  version: QmpVersionInfo;
  /** Offered capabilities (the greeting's list). */
  capabilities: readonly string[];
  /** Runs after `quit` has replied. */
  quit(): void;
}

/** Registers qmp_capabilities, query-version, query-commands and quit. */
export function registerBuiltins(registry: CommandRegistry, hooks: BuiltinHooks): void {
  registry.register('qmp_capabilities', (args, ctx) => {
    // Arguments first, then state: QEMU rejects bad arguments even after negotiation.
    const r = new ArgReader(args);
    const enable = r.array('enable', true) ?? [];
    enable.forEach((cap, i) => {
      if (typeof cap !== 'string') {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Invalid parameter type for 'enable[${i}]', expected: string`);
      }
      if (!(KNOWN_CAPABILITIES as readonly string[]).includes(cap)) {
        throw new ShearError('ERR_INVALID_ARGUMENT', `Parameter 'enable[${i}]' does not accept value '${cap}'`);
      }
    });
    r.done();
    const session = sessionOf(ctx.session);
    if (session.negotiated) {
      throw withQmpClass(
        new ShearError('ERR_INVALID_ARGUMENT', 'Capabilities negotiation is already complete, command ignored'),
        'CommandNotFound',
      );
    }
    const unavailable = [...new Set(enable as string[])].filter((cap) => !hooks.capabilities.includes(cap));
    if (unavailable.length > 0) {
      throw new ShearError('ERR_NOT_IMPLEMENTED', `Capability ${unavailable.join(', ')} not available`);
    }
    session.completeNegotiation();
    return {};
  });

  registry.register('query-version', (args) => {
    new ArgReader(args).done();
    const v = hooks.version;
    return { qemu: { micro: v.qemu.micro, minor: v.qemu.minor, major: v.qemu.major }, package: v.package };
  });

  registry.register('query-commands', (args) => {
    new ArgReader(args).done();
    return registry.names().map((name) => ({ name }));
  });

  registry.register('quit', (args, ctx) => {
    new ArgReader(args).done();
    ctx.afterReply(() => hooks.quit());
    return {};
  });
}

function sessionOf(info: QmpSessionInfo): QmpSession {
  return info as QmpSession;
}
