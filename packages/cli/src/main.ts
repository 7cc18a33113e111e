#!/usr/bin/env node
import { runBitmapDemo } from './demo-bitmaps.js';

const USAGE = `usage: shear <command>

commands:
  demo        walk through dirty bitmaps and bitmap sync modes on a simulated disk
  help        this text`;

function main(argv: string[]): number {
  const [command] = argv;
  switch (command) {
    case 'demo':
      runBitmapDemo();
      return 0;
    case undefined:
    case 'help':
    case '--help':
      console.log(USAGE);
      return 0;
    default:
      console.error(`shear: unknown command "${command}"\n\n${USAGE}`);
      return 2;
  }
}

process.exitCode = main(process.argv.slice(2));
