import { ShearError } from '@shear/base';

/** A peer sent bytes that break the protocol. Codecs throw nothing else on bad input. */
export function protocolError(message: string): ShearError {
  return new ShearError('ERR_NBD_PROTOCOL', message);
}
