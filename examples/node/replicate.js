#!/usr/bin/env node
// sqlite-replica from Node (better-sqlite3): a primary serving its log over HTTP in one process,
// a replica following it in another, a write forwarded from the replica with repl_exec,
// repl_wait, and equal checksums. Last line: "ok".
//
//     make build
//     cd examples/node && npm install --build-from-source --nodedir=/usr   # `make deps` does it
//     node replicate.js
//
// Load first, then open: the extension is loaded through a throw-away ":memory:" database,
// which registers the "replica" VFS as the process default and an auto-extension; every
// Database opened afterwards goes through the VFS and has the repl_* functions.
// db.loadExtension(path) passes no entry point, so SQLite derives sqlite3_replica_init from
// the file name libreplica.so (and appends ".so" itself).
//
// better-sqlite3 binds JavaScript numbers as REAL (3 becomes 3.0); the repl_* functions accept
// them, so plain Numbers work and BigInt is not needed.
//
// The script runs itself twice: without arguments it is the replica and starts
// `replicate.js primary DIR`, which prints "url <url>" and then answers "state" with
// "state <lsn> <checksum>" until its standard input says "quit" or closes.

'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');
const Database = require('better-sqlite3');

const EXT = path.resolve(process.env.REPLICA_EXT || path.join(__dirname, '..', '..', 'build', 'libreplica'));

function loadReplica() {
  const boot = new Database(':memory:');
  boot.loadExtension(EXT);
  boot.close(); // the extension stays loaded: its init asks SQLite to keep it
}

function primary(dir) {
  loadReplica();
  const db = new Database(path.join(dir, 'primary.db'));
  db.prepare("SELECT repl_primary('127.0.0.1:0')").pluck().get();
  db.prepare("SELECT repl_config('exec', 1)").pluck().get(); // accept forwarded writes (off by default)
  const url = JSON.parse(db.prepare('SELECT repl_status()').pluck().get()).server.url;
  db.exec(`CREATE TABLE notes(id INTEGER PRIMARY KEY, text TEXT NOT NULL);
           INSERT INTO notes(text) VALUES ('written on the primary');`);
  process.stdout.write(`url ${url}\n`);
  const state = db.prepare('SELECT repl_lsn() AS lsn, repl_checksum() AS sum');
  const input = readline.createInterface({ input: process.stdin });
  input.on('line', (line) => {
    if (line === 'state') {
      const { lsn, sum } = state.get();
      process.stdout.write(`state ${lsn} ${sum}\n`);
    } else if (line === 'quit') {
      input.close();
    } else {
      throw new Error(`primary: unknown command ${JSON.stringify(line)}`);
    }
  });
  input.on('close', () => db.close()); // "quit" or EOF: the parent is gone
}

// The primary process seen from the parent: commands on its stdin, its stdout as lines.
class Child {
  constructor(dir) {
    this.proc = spawn(process.execPath, [__filename, 'primary', dir], { stdio: ['pipe', 'pipe', 'inherit'] });
    this.lines = [];
    this.waiter = null;
    this.exited = new Promise((resolve) => this.proc.on('exit', (code, signal) => resolve({ code, signal })));
    this.ended = false;
    const out = readline.createInterface({ input: this.proc.stdout });
    out.on('line', (line) => { this.lines.push(line); this.wake(); });
    out.on('close', () => { this.ended = true; this.wake(); });
  }

  wake() {
    if (this.waiter) { const w = this.waiter; this.waiter = null; w(); }
  }

  send(command) {
    this.proc.stdin.write(`${command}\n`);
  }

  // The next line, which must start with prefix, within ms milliseconds.
  async expect(prefix, ms) {
    const deadline = Date.now() + ms;
    while (this.lines.length === 0) {
      if (this.ended) throw new Error(`the primary exited before printing '${prefix}' (see its stderr above)`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`the primary printed no '${prefix}' line within ${ms} ms`);
      let timer;
      await new Promise((resolve) => { this.waiter = resolve; timer = setTimeout(resolve, left); });
      clearTimeout(timer);
    }
    const words = this.lines.shift().split(' ');
    if (words[0] !== prefix) throw new Error(`the primary printed '${words.join(' ')}', expected '${prefix}'`);
    return words.slice(1);
  }

  // Ask it to quit; kill it if it has not exited within the deadline.
  async stop() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.stdin.end('quit\n');
    }
    let timer;
    const timeout = new Promise((resolve) => { timer = setTimeout(() => resolve(null), 10000); });
    const result = await Promise.race([this.exited, timeout]);
    clearTimeout(timer);
    if (result === null) {
      this.proc.kill('SIGKILL');
      await this.exited;
      throw new Error('the primary did not exit within 10 s of quit; killed it');
    }
    if (result.code !== 0) throw new Error(`the primary process exited with ${result.code ?? result.signal}`);
  }
}

async function replica(dir) {
  loadReplica(); // first, before any database is opened in this process
  const child = new Child(dir);
  process.on('exit', () => child.proc.kill('SIGKILL')); // the child never outlives us
  let stopped = false;
  try {
    const [url] = await child.expect('url', 30000);
    const db = new Database(path.join(dir, 'replica.db'));
    const one = (sql, ...args) => db.prepare(sql).pluck().get(...args);
    let lsn = one('SELECT repl_follow(?)', url);
    console.log(`replica bootstrapped from ${url} at LSN ${lsn}`);

    // A write through the replica runs on the primary; repl_exec returns once it is here too.
    lsn = one("SELECT repl_exec('INSERT INTO notes(text) VALUES (?)', ?)", JSON.stringify(['written through the replica']));
    const notes = db.prepare('SELECT text FROM notes ORDER BY id').pluck().all();
    console.log(`after repl_exec (LSN ${lsn}) the replica reads ${JSON.stringify(notes)}`);

    // Equal checksums at the primary's LSN: plain Numbers as arguments.
    child.send('state');
    const [pLsn, pSum] = await child.expect('state', 10000);
    lsn = one('SELECT repl_wait(?, ?)', Number(pLsn), 5000);
    const rSum = one('SELECT repl_checksum()');
    console.log(`primary LSN ${pLsn} checksum ${pSum}; replica LSN ${lsn} checksum ${rSum}`);
    if (rSum !== pSum || notes.length !== 2) throw new Error('the replica does not equal the primary');

    // A local write on the replica is refused: writes go through repl_exec.
    try {
      db.prepare("INSERT INTO notes(text) VALUES ('local')").run();
      throw new Error('a local write on the replica was accepted');
    } catch (e) {
      if (e.code !== 'SQLITE_READONLY') throw e;
      console.log(`a local write on the replica: ${e.message}`);
    }
    one('SELECT repl_follow(NULL)');
    db.close();
    stopped = true;
    await child.stop();
  } finally {
    if (!stopped) await child.stop().catch(() => {});
  }
  console.log('ok');
}

if (process.argv.length === 4 && process.argv[2] === 'primary') {
  primary(process.argv[3]);
} else if (process.argv.length === 2) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'node-replica-'));
  replica(dir)
    .catch((e) => { console.error(`error: ${e.message}`); process.exitCode = 1; })
    .finally(() => fs.rmSync(dir, { recursive: true, force: true }));
} else {
  console.error('usage: node replicate.js  (runs both roles)  |  node replicate.js primary DIR');
  process.exitCode = 2;
}
