#!/usr/bin/env bash
# Where a REST call's time goes: a flamegraph of the release `keel` process (embedded stores)
# answering GET /v1/products/{id} (a cache hit) under wrk, sampled by perf.
#
#     benches/flamegraph.sh [out.svg]      (default benches/flamegraph-rest-getproduct.svg)
#
# FOLDED=path also keeps the collapsed stacks (inferno-diff-folded compares two runs).
#
# Needs perf (linux-perf), wrk and inferno (`cargo install inferno`); run as root or with
# kernel.perf_event_paranoid <= 1. Samples at 999 Hz for 10 s with DWARF call graphs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benches/flamegraph-rest-getproduct.svg}
work=$(mktemp -d)
trap 'kill "${keel_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

# Built as the benches build it (the same features, so the same artifacts).
cargo bench --bench scenarios --no-run -j2
# shellcheck source=benches/keel.sh
. benches/keel.sh
start_keel
user_and_product
url="$rest/v1/$product"
curl -sf "$url" >/dev/null

wrk -t1 -c50 -d14s "$url" >"$work/wrk" &
wrk_pid=$!
sleep 2 # warm-up: the first calls fill the cache
perf record -F 999 --call-graph dwarf,16384 -p "$keel_pid" -o "$work/perf.data" -- sleep 10 \
  2>"$work/perf.log"
wait "$wrk_pid"
cat "$work/wrk"
perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf >"$work/folded"
if [ -n "${FOLDED:-}" ]; then cp "$work/folded" "$FOLDED"; fi
inferno-flamegraph --title "keel REST GET /v1/products/{id}, embedded, cache hit (wrk -c50)" \
  --width 1600 <"$work/folded" >"$out"
# The top frames by self time, then by total time (each frame once per stack), for the notes.
awk '{n=$NF; $NF=""; k=split($0,f,";"); self[f[k]]+=n; total+=n}
  END {for (s in self) printf "%5.1f%% self  %s\n", 100*self[s]/total, s}' "$work/folded" |
  sort -rn | head -25
awk '{n=$NF; $NF=""; k=split($0,f,";"); delete seen
  for (i=1;i<=k;i++) if (!(f[i] in seen)) {seen[f[i]]=1; all[f[i]]+=n}; total+=n}
  END {for (s in all) printf "%5.1f%% total %s\n", 100*all[s]/total, s}' "$work/folded" |
  grep -E 'keel|tonic|axum|hyper|prost|tower|serde|moka|tracing|h2::' | sort -rn | head -60
echo "wrote $out"
