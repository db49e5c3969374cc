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

cargo build --release -j2 --bin keel
target/release/keel --data-dir "$work/data" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
  --admin-addr 127.0.0.1:0 --rate-limit off --log warn >"$work/banner" &
keel_pid=$!
until rest=$(grep -oE 'REST +http://[0-9.:]+' "$work/banner" | grep -oE 'http://[0-9.:]+'); do
  kill -0 "$keel_pid"
  sleep 0.2
done

token=$(curl -sf "$rest/v1/auth:register" -H 'content-type: application/json' \
  -d '{"email":"flame@example.com","password":"correct horse battery"}' |
  grep -oE '"accessToken": *"[^"]+"' | cut -d'"' -f4)
product=$(curl -sf "$rest/v1/products" -H "authorization: Bearer $token" \
  -H 'content-type: application/json' \
  -d '{"title":"A product of ordinary size","price":{"currencyCode":"EUR","units":"1999"},"stock":1000}' |
  grep -oE '"name": *"products/[^"]+"' | cut -d'"' -f4)
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
