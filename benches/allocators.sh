#!/usr/bin/env bash
# Which allocator keel should link, by measurement: the release `keel` (embedded stores, REST
# rate limit off) as shipped, jemalloc linked (the `jemalloc` feature), and built without it,
# on the system's allocator: glibc malloc, glibc with two arenas, and jemalloc and mimalloc
# preloaded from Debian's libjemalloc2 and libmimalloc2.0 (a preloaded allocator replaces the
# system's, not a linked one). Each is driven the same way — h2load on gRPC GetUser (token) and
# GetProduct, wrk on REST GetProduct and ListTodos (20, token) — with calls/s and RSS after each
# row, and RSS at idle; the linked binaries are measured twice, first and last.
#
#     benches/allocators.sh            (SECONDS_PER_ROW=5 by default)
#
# Needs h2load (nghttp2-client), wrk, libjemalloc2 and libmimalloc2.0.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${SECONDS_PER_ROW:-5}
lib=/usr/lib/x86_64-linux-gnu
work=$(mktemp -d)
trap 'kill "${keel_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
# keel on the system's allocator, then as the benches build it (the same features, so the same
# artifacts as theirs): two copies, since both builds write target/release/keel.
cargo build --release --bin keel --no-default-features --features dev-certs -j2 >&2
cp target/release/keel "$work/keel-system"
cargo bench --bench scenarios --no-run -j2 >&2
cp target/release/keel "$work/keel-jemalloc"

# shellcheck source=benches/keel.sh
. benches/keel.sh

rss() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

# One allocator: name, then the environment keel runs with.
measure() {
  local name=$1
  shift
  start_keel "$@"
  local idle
  idle=$(rss "$keel_pid")
  user_and_product
  for i in $(seq 20); do
    curl -sf "$rest/v1/users/me/todos" -H "authorization: Bearer $token" -H 'content-type: application/json' \
      -d "{\"title\":\"Todo number $i\"}" >/dev/null
  done
  # gRPC frames: GetUser{name: "users/me"}, GetProduct{name: product}.
  python3 - "$work" "$product" <<'PY'
import sys
work, product = sys.argv[1], sys.argv[2].encode()
def frame(name):
    message = b"\x0a" + bytes([len(name)]) + name
    return b"\x00" + len(message).to_bytes(4, "big") + message
open(f"{work}/get-user", "wb").write(frame(b"users/me"))
open(f"{work}/get-product", "wb").write(frame(product))
PY
  local grpc_headers=(-H 'content-type: application/grpc' -H 'te: trailers')
  local row
  h2() { h2load -t1 -c2 -m25 --warm-up-time=1 -D "$seconds" "$@" | awk '/finished in/ {print $4}'; }
  wrk1() {
    wrk -t1 -c50 -d1s "$@" >/dev/null
    wrk -t1 -c50 -d"${seconds}s" "$@" | awk '/Requests\/sec/ {print $2}'
  }
  row="| $name | $idle"
  row+=" | $(h2 -d "$work/get-user" "${grpc_headers[@]}" -H "authorization: Bearer $token" \
    "$grpc/keel.identity.v1.IdentityService/GetUser") / $(rss "$keel_pid")"
  row+=" | $(h2 -d "$work/get-product" "${grpc_headers[@]}" \
    "$grpc/keel.catalog.v1.CatalogService/GetProduct") / $(rss "$keel_pid")"
  row+=" | $(wrk1 "$rest/v1/$product") / $(rss "$keel_pid")"
  row+=" | $(wrk1 -H "authorization: Bearer $token" "$rest/v1/users/me/todos") / $(rss "$keel_pid") |"
  echo "$row"
  kill "$keel_pid"
  wait "$keel_pid" 2>/dev/null || true
}

echo "| allocator | idle RSS MiB | gRPC GetUser calls/s / RSS | gRPC GetProduct / RSS | REST GetProduct / RSS | REST ListTodos (20) / RSS |"
echo "|---|---:|---:|---:|---:|---:|"
keel="$work/keel-jemalloc" measure "jemalloc (linked: keel as built)"
keel="$work/keel-system" measure "glibc malloc"
keel="$work/keel-system" measure "glibc, MALLOC_ARENA_MAX=2" MALLOC_ARENA_MAX=2
keel="$work/keel-system" measure "jemalloc 5.3 (preloaded)" LD_PRELOAD="$lib/libjemalloc.so.2"
keel="$work/keel-system" measure "mimalloc 2.0 (preloaded)" LD_PRELOAD="$lib/libmimalloc.so.2"
keel="$work/keel-jemalloc" measure "jemalloc (linked: keel as built), again"
