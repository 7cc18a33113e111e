import { execFileSync } from 'node:child_process';
import os from 'node:os';

export interface MachineFacts {
  cpu: string;
  cores: number;
  availableParallelism: number;
  memoryGiB: number;
  node: string;
  kernel: string;
  filesystem?: string;
}

/** The facts a reader needs to compare results across machines. */
export function machineFacts(dir?: string): MachineFacts {
  const facts: MachineFacts = {
    cpu: os.cpus()[0]?.model ?? 'unknown',
    cores: os.cpus().length,
    availableParallelism: os.availableParallelism(),
    memoryGiB: Math.round(os.totalmem() / 2 ** 30),
    node: process.version,
    kernel: os.release(),
  };
  if (dir) {
    try {
      facts.filesystem = execFileSync('df', ['-T', dir], { encoding: 'utf8' }).trim().split('\n').pop()!.split(/\s+/)[1]!;
    } catch {
      facts.filesystem = 'unknown';
    }
  }
  return facts;
}

export function printMachineFacts(facts: MachineFacts): void {
  const fs = facts.filesystem ? `, filesystem ${facts.filesystem}` : '';
  console.log(`machine: ${facts.cpu}, ${facts.cores} cores (available parallelism ${facts.availableParallelism}), ${facts.memoryGiB} GiB, Node ${facts.node}, Linux ${facts.kernel}${fs}`);
}

/** The first line a tool prints for its version, or 'not found'. */
export function toolVersion(cmd: string, args: string[]): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim().split('\n')[0]!;
  } catch {
    return 'not found';
  }
}
