// Child process for leak-check.test.ts: run with the leak check loaded (--import), it leaves one
// kind of resource open (argv[2]) and ends; the check must fail it and name the resource.
import { spawn } from 'node:child_process';
import { mkdtempSync, openSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';

const kind = process.argv[2];

async function leak(): Promise<void> {
  switch (kind) {
    case 'none': {
      // Opened and closed properly: nothing to report.
      const dir = mkdtempSync(path.join(os.tmpdir(), 'shear-leakcheck-'));
      const server = net.createServer().listen(0, '127.0.0.1');
      await new Promise((r) => server.once('listening', r));
      const sock = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
      await new Promise((r) => sock.once('connect', r));
      sock.destroy();
      await new Promise((r) => server.close(r));
      clearTimeout(setTimeout(() => {}, 60_000));
      const w = new Worker('setTimeout(() => {}, 10)', { eval: true });
      await new Promise((r) => w.once('exit', r));
      const { rmSync } = await import('node:fs');
      rmSync(dir, { recursive: true });
      return;
    }
    case 'fd': {
      const dir = mkdtempSync(path.join(os.tmpdir(), 'shear-leakcheck-'));
      writeFileSync(path.join(dir, 'disk.raw'), '');
      openSync(path.join(dir, 'disk.raw'), 'r');
      return; // the directory leaks too
    }
    case 'timer':
      setInterval(function pollStatus() {}, 1000).unref();
      return;
    case 'server':
      net.createServer().listen(0, '127.0.0.1').unref();
      return;
    case 'worker':
      new Worker('setInterval(() => {}, 1000)', { eval: true }).unref();
      await new Promise((r) => setTimeout(r, 200));
      return;
    case 'child': {
      const c = spawn('sleep', ['30'], { stdio: 'ignore', detached: true });
      c.unref();
      return;
    }
    default:
      throw new Error(`unknown leak kind ${kind}`);
  }
}

await leak();
