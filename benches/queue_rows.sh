#!/usr/bin/env bash
# What a job's row versions cost PostgreSQL, by index set and by jobs per statement: pgbench, one
# client, claiming N due jobs and recording their success (the two statements a drained job costs
# a worker, as keel's queue writes them) from 20,000 waiting jobs that each carry a request id, in
# a copy of keel's own queue_jobs (migrated by `keel migrate`) with some of its indexes left out.
#
#     benches/queue_rows.sh [postgres://user@host:port]   # default: the test kit's, started here
#
# Prints a Markdown section for benches/RESULTS.md. Needs pgbench (Debian's postgresql-client)
# and a release keel (`cargo build --release`).
set -euo pipefail
export PGOPTIONS="-c client_min_messages=warning"
cd "$(dirname "$0")/.."
keel=target/release/keel
[ -x "$keel" ] || { echo "build keel first: cargo build --release" >&2; exit 1; }
if [ $# -ge 1 ]; then
  server=$1
else
  sleep 100000 & keeper=$!
  trap 'kill $keeper' EXIT
  cargo build --quiet -p keel-testkit
  eval "$(target/debug/keel-testkit stores $keeper)"
  server=$KEEL_TEST_POSTGRES_URL
fi
db="queue_rows_$$"
psql -q "$server/postgres" -c "CREATE DATABASE $db"
trap 'psql -q "$server/postgres" -c "DROP DATABASE IF EXISTS $db" >/dev/null; [ -n "${keeper:-}" ] && kill $keeper' EXIT
url="$server/$db"
KEEL_DATABASE_URL=$url "$keel" migrate >/dev/null 2>&1

# 20,000 waiting jobs in qx, all handed to Redis already.
fill="INSERT INTO qx (id, kind, payload, state, attempts, max_attempts, creator, request_id,
  request_hash, run_after, published_at, created_at, updated_at, queued_at)
SELECT 'job-' || lpad(n::text, 8, '0'), 'noop', '{}', 'QUEUED', 0, 8, 'users/ada',
  md5(n::text), md5(n::text), 1000 + n, 5, 1, 1, 1 FROM generate_series(1, 20000) AS n;"

# A copy of queue_jobs with those jobs; then $1 (SQL).
table() {
  psql -q -v ON_ERROR_STOP=1 "$url" <<SQL
DROP TABLE IF EXISTS qx, qready, qleased;
CREATE TABLE qx (LIKE queue_jobs INCLUDING ALL);
$fill
$1
VACUUM ANALYZE qx;
SQL
}

# Claim $1 due jobs, then record the worker's running jobs done: one transaction each.
script() {
  cat <<SQL
WITH due AS MATERIALIZED (SELECT id FROM qx WHERE kind = 'noop' AND state IN ('QUEUED', 'FAILED')
  AND run_after <= 2000000000000 ORDER BY run_after, id LIMIT $1 FOR UPDATE SKIP LOCKED)
UPDATE qx SET state = 'RUNNING', attempts = attempts + 1, locked_by = 'w',
  locked_until = 2000000000000, started_at = 1, updated_at = 1
WHERE id = ANY(ARRAY(SELECT id FROM due));
UPDATE qx SET state = 'SUCCEEDED', locked_by = NULL, locked_until = NULL, finished_at = 2,
  updated_at = 2 WHERE state = 'RUNNING' AND locked_by = 'w';
SQL
}

# The same two writes in one statement: the last claim's successes recorded by the next claim
# (Oban Pro's acks folded into the fetch), one transaction and round trip instead of two.
folded_script() {
  cat <<SQL
WITH done AS (UPDATE qx SET state = 'SUCCEEDED', locked_by = NULL, locked_until = NULL,
  finished_at = 2, updated_at = 2 WHERE state = 'RUNNING' AND locked_by = 'w' RETURNING id),
due AS MATERIALIZED (SELECT id FROM qx WHERE kind = 'noop' AND state IN ('QUEUED', 'FAILED')
  AND run_after <= 2000000000000 ORDER BY run_after, id LIMIT $1 FOR UPDATE SKIP LOCKED)
UPDATE qx SET state = 'RUNNING', attempts = attempts + 1, locked_by = 'w',
  locked_until = 2000000000000, started_at = 1, updated_at = 1
WHERE id = ANY(ARRAY(SELECT id FROM due));
SQL
}

# The same with the waiting and the leased jobs in narrow tables of their own, so that every
# update of the job's row changes no indexed column (a HOT update, in a table kept half empty).
narrow_table() {
  psql -q -v ON_ERROR_STOP=1 "$url" <<SQL
DROP TABLE IF EXISTS qx, qready, qleased;
CREATE TABLE qx (LIKE queue_jobs INCLUDING DEFAULTS) WITH (fillfactor = 50);
ALTER TABLE qx ADD PRIMARY KEY (id);
CREATE INDEX ON qx (creator, id);
CREATE INDEX ON qx (kind, id);
CREATE UNIQUE INDEX ON qx (creator, request_id) WHERE request_id IS NOT NULL;
CREATE TABLE qready (kind text NOT NULL, run_after bigint NOT NULL, id text PRIMARY KEY);
CREATE INDEX ON qready (kind, run_after, id);
CREATE TABLE qleased (id text PRIMARY KEY, kind text NOT NULL, locked_until bigint NOT NULL);
CREATE INDEX ON qleased (kind, locked_until);
$fill
INSERT INTO qready SELECT kind, run_after, id FROM qx;
VACUUM ANALYZE qx; VACUUM ANALYZE qready; VACUUM ANALYZE qleased;
SQL
}

narrow_script() {
  cat <<SQL
WITH due AS MATERIALIZED (SELECT id FROM qready WHERE kind = 'noop' AND run_after <= 2000000000000
  ORDER BY run_after, id LIMIT $1 FOR UPDATE SKIP LOCKED),
gone AS (DELETE FROM qready WHERE id = ANY(ARRAY(SELECT id FROM due)) RETURNING id, kind),
leased AS (INSERT INTO qleased SELECT id, kind, 2000000000000 FROM gone)
UPDATE qx SET state = 'RUNNING', attempts = attempts + 1, locked_by = 'w',
  locked_until = 2000000000000, started_at = 1, updated_at = 1
WHERE id = ANY(ARRAY(SELECT id FROM due));
WITH done AS (DELETE FROM qleased WHERE kind = 'noop' RETURNING id)
UPDATE qx SET state = 'SUCCEEDED', locked_by = NULL, locked_until = NULL, finished_at = 2,
  updated_at = 2 WHERE id = ANY(ARRAY(SELECT id FROM done));
SQL
}

# Jobs/s for batches of $1 with script $2 (18,000 jobs).
rate() {
  local file
  file=$(mktemp)
  $2 "$1" > "$file"
  pgbench -n -f "$file" -t $((18000 / $1)) -c 1 "$url" 2>/dev/null \
    | awk -v n="$1" '/^tps = / { printf "%.0f", $3 * n }'
  rm -f "$file"
}

indexes() {
  psql -Atq "$url" -c "SELECT indexname FROM pg_indexes WHERE tablename = 'queue_jobs'" \
    | grep -c .
}

drop() { for i in "$@"; do printf 'DROP INDEX %s; ' "$i"; done; }

echo "### What a job's row versions cost PostgreSQL (benches/queue_rows.sh, $(date -u '+%Y-%m-%d %H:%M UTC'))"
echo
echo "pgbench, one client, on $(nproc) cores: claim N due jobs of 20,000, then record them done"
echo "(two transactions, as a worker's claim and completion); every job carries a request id."
echo "keel's queue_jobs has $(indexes) indexes."
echo
echo "| table | jobs per statement | jobs/s |"
echo "|---|---:|---:|"
for n in 1 12 20 50; do
  table ""
  echo "| keel's | $n | $(rate "$n" script) |"
done
request="qx_creator_request_id_idx"
others="qx_run_after_idx qx_state_finished_at_idx qx_unique_key_idx qx_creator_idx"
table "$(drop $request)"
echo "| keel's without the request index | 12 | $(rate 12 script) |"
table "CREATE INDEX ON qx (creator, id); CREATE INDEX ON qx (kind, id); $(drop qx_creator_idx)"
echo "| keel's with the listings by creator and by kind in it, as before queue_listing | 12 | $(rate 12 script) |"
table "$(drop $request $others)"
echo "| the key, the ready and the leased indexes alone | 12 | $(rate 12 script) |"
for n in 12 20; do
  table ""
  echo "| keel's, the completion folded into the next claim | $n | $(rate "$n" folded_script) |"
done
narrow_table
echo "| narrow ready and leased tables, HOT updates of the job | 12 | $(rate 12 narrow_script) |"
table ""
echo "| keel's, again | 12 | $(rate 12 script) |"
