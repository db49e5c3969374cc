// BullMQ running a no-op job, measured as benches/queue.rs measures keel's queue: `jobs` jobs
// added first, then `workers` worker processes of `concurrency` each drain them; the rate is taken
// between 10% and 90% done (start-up and the tail left out). Prints one line of JSON.
//
//     node noop.js <redis-url> <prefix> <jobs> <workers> <concurrency>

const { fork } = require("node:child_process");
const { Queue, Worker } = require("bullmq");

const [url, prefix, jobs, workers, concurrency] = process.argv.slice(2);
const { hostname, port, pathname } = new URL(url);
const connection = {
  host: hostname,
  port: Number(port || 6379),
  db: Number(pathname.slice(1) || 0),
  maxRetriesPerRequest: null,
};

async function work() {
  const worker = new Worker("noop", async () => {}, {
    connection,
    prefix,
    concurrency: Number(concurrency),
  });
  process.on("message", async () => {
    await worker.close();
    process.exit(0);
  });
}

async function drive() {
  const total = Number(jobs);
  const queue = new Queue("noop", { connection, prefix });
  await queue.obliterate({ force: true });
  for (let added = 0; added < total; added += 1000) {
    const n = Math.min(1000, total - added);
    await queue.addBulk(Array.from({ length: n }, () => ({ name: "noop", data: {} })));
  }
  const children = Array.from({ length: Number(workers) }, () =>
    fork(__filename, [url, prefix, jobs, workers, concurrency], { env: { ...process.env, ROLE: "worker" } }),
  );
  let from, to;
  for (;;) {
    const { completed } = await queue.getJobCounts("completed");
    const now = process.hrtime.bigint();
    if (from === undefined && completed >= total * 0.1) from = { now, completed };
    if (completed >= total * 0.9) {
      to = { now, completed };
      break;
    }
    await new Promise((r) => setTimeout(r, 100)); // as benches/load/jobs.rs's POLL
  }
  const seconds = Number(to.now - from.now) / 1e9;
  console.log(JSON.stringify({ jobs: to.completed - from.completed, seconds, per_second: (to.completed - from.completed) / seconds }));
  for (const child of children) child.send("stop");
  await queue.obliterate({ force: true });
  await queue.close();
  process.exit(0);
}

(process.env.ROLE === "worker" ? work : drive)().catch((e) => {
  console.error(e);
  process.exit(1);
});
