export { addBlockdev, confinePath, peekQcow2Backing, type BlockdevContext } from './add-blockdev.js';
export { qcow2Driver, type Qcow2Node } from './qcow2-node.js';
export { createImage, type CreateImageOptions } from './create-image.js';
export { attachBitmapStorage, bitmapStorageOf, requireBitmapStorage, type BitmapStorage } from './persistent-bitmaps.js';
