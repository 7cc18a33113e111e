export { haveTool, requireTools } from './require-tool.js';
