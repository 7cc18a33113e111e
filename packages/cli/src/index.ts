export { runBitmapDemo } from './demo-bitmaps.js';
