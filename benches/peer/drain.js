// BullMQ's drain of N no-op jobs, the peer of `agentplane bench drain`
// (scripts/bench-peer.sh runs both against one redis-server and prints the
// ratio). The steps mirror src/cli/bench/drain.rs:
//   1. a warm-up worker processes one job and closes;
//   2. INFO is read, N jobs are added (addBulk, in chunks), then a fresh
//      worker with concurrency S drains them;
//   3. when the N-th job completes, INFO is read again: Redis CPU and
//      commands over add + drain, per job.
// The rate is N over the span from the first job's processedOn to the last
// job's finishedOn (both stamped by BullMQ), so worker start-up is not
// counted; the wall time including it is reported beside.
//
// usage: node drain.js --socket PATH | --port N [--host H]  [--jobs N] [--slots S] [--out FILE]
'use strict';

const fs = require('fs');
const path = require('path');
const { Queue, Worker } = require('bullmq');

function args() {
  const a = { jobs: 5000, slots: 8, host: '127.0.0.1', out: 'target/bench/bullmq-drain.json' };
  const v = process.argv.slice(2);
  for (let i = 0; i < v.length; i += 2) {
    const k = v[i].replace(/^--/, '');
    if (!(k in a) && !['socket', 'port'].includes(k)) throw new Error(`unknown flag ${v[i]}`);
    a[k] = ['jobs', 'slots', 'port'].includes(k) ? Number(v[i + 1]) : v[i + 1];
  }
  if (!a.socket && !a.port) throw new Error('give --socket PATH or --port N');
  return a;
}

function parseInfo(text) {
  let cpu = 0;
  const commands = {};
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    const m = line.match(/^used_cpu_(sys|user):([\d.]+)$/);
    if (m) cpu += Number(m[2]);
    const c = line.match(/^cmdstat_([^:]+):calls=(\d+),usec=(\d+)/);
    if (c) commands[c[1]] = [Number(c[2]), Number(c[3])];
  }
  return { cpu, commands };
}

// The same shape as the Rust report's `per_job` (src/cli/bench/local.rs).
function perJob(before, after, n) {
  const r3 = (x) => Math.round(x * 1000) / 1000;
  const commandstats = {};
  for (const [cmd, [calls, usec]] of Object.entries(after.commands).sort()) {
    const [c0, u0] = before.commands[cmd] || [0, 0];
    const dc = calls - c0;
    const du = usec - u0;
    if (dc <= 0) continue;
    commandstats[cmd] = {
      calls: dc,
      calls_per_job: r3(dc / n),
      usec_per_call: r3(du / dc),
      usec_per_job: r3(du / n),
    };
  }
  return {
    redis_cpu_us_per_job: r3(((after.cpu - before.cpu) * 1e6) / n),
    redis_cpu_s: r3(after.cpu - before.cpu),
    commandstats,
  };
}

async function main() {
  const a = args();
  const connection = a.socket
    ? { path: a.socket, maxRetriesPerRequest: null }
    : { host: a.host, port: a.port, maxRetriesPerRequest: null };
  const name = `peer-${process.pid}-${Date.now()}`;
  const queue = new Queue(name, { connection });
  // A connection of its own for INFO (BullMQ's ioredis, not a second pin).
  const info = (await queue.client).duplicate();
  const stats = async () => parseInfo((await info.info('cpu')) + '\n' + (await info.info('commandstats')));
  const input = { input: 'hello' };
  // The no-op job: hand the input back, as the echo agent does.
  const processor = async (job) => job.data.input;

  // 1. Warm-up.
  const warm = new Worker(name, processor, { connection, concurrency: a.slots });
  await new Promise((resolve, reject) => {
    warm.once('completed', resolve);
    warm.once('failed', (_, e) => reject(e));
    queue.add('job', input).catch(reject);
  });
  await warm.close();

  // 2. Add, then drain with a fresh worker.
  const before = await stats();
  const t0 = Date.now();
  for (let i = 0; i < a.jobs; i += 1000) {
    const chunk = [];
    for (let j = i; j < Math.min(a.jobs, i + 1000); j++) chunk.push({ name: 'job', data: input });
    await queue.addBulk(chunk);
  }
  const submitS = (Date.now() - t0) / 1e3;
  const afterSubmit = await stats();
  let done = 0;
  let failed = 0;
  let firstStart = Infinity;
  let lastFinish = 0;
  const tWorker = Date.now();
  let worker;
  await new Promise((resolve) => {
    const count = (job) => {
      firstStart = Math.min(firstStart, job.processedOn);
      lastFinish = Math.max(lastFinish, job.finishedOn);
      if (++done === a.jobs) resolve();
    };
    worker = new Worker(name, processor, { connection, concurrency: a.slots });
    worker.on('completed', count);
    worker.on('failed', (job) => {
      failed++;
      count(job);
    });
  });
  const wallS = (Date.now() - tWorker) / 1e3;
  const after = await stats();
  await worker.close();

  const drainS = Math.max((lastFinish - firstStart) / 1e3, 1e-3);
  const pkg = require('bullmq/package.json');
  const report = {
    mode: 'drain',
    system: 'bullmq',
    bullmq: pkg.version,
    jobs: a.jobs,
    slots: a.slots,
    succeeded: done - failed,
    failed,
    submit_s: submitS,
    submits_per_s: Math.round(a.jobs / Math.max(submitS, 1e-6)),
    drain_s: drainS,
    jobs_per_s: Math.round(a.jobs / drainS),
    wall_with_worker_start_s: wallS,
    submit: perJob(before, afterSubmit, a.jobs),
    submit_and_drain: perJob(before, after, a.jobs),
  };
  await queue.obliterate({ force: true });
  await queue.close();
  await info.quit();
  const text = JSON.stringify(report, null, 2);
  fs.mkdirSync(path.dirname(a.out), { recursive: true });
  fs.writeFileSync(a.out, text + '\n');
  console.log(text);
  console.error(
    `bullmq drain: ${a.jobs} jobs, concurrency ${a.slots}: ${report.jobs_per_s} jobs/s, ` +
      `Redis CPU ${report.submit_and_drain.redis_cpu_us_per_job} µs/job (add + drain)`
  );
  console.error(`report written to ${a.out}`);
  if (failed > 0) process.exit(1);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
