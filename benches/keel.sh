# Sourced by the shell benches: start the release keel on embedded stores and give it a user and
# a product. Needs $work (a scratch directory); sets keel_pid, rest, grpc, token and product.

# Starts ${keel:-target/release/keel} (REST rate limits off) with `env "$@"` before it.
start_keel() {
  rm -rf "$work/data" "$work/banner"
  env "$@" "${keel:-target/release/keel}" --data-dir "$work/data" --grpc-addr 127.0.0.1:0 \
    --http-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --rate-limit off --auth-rate-limit off \
    --log warn >"$work/banner" &
  keel_pid=$!
  until rest=$(grep -oE 'REST +http://[0-9.:]+' "$work/banner" | grep -oE 'http://[0-9.:]+'); do
    kill -0 "$keel_pid"
    sleep 0.2
  done
  grpc=http://$(grep -oE 'gRPC +[0-9.:]+' "$work/banner" | grep -oE '[0-9.]+:[0-9]+' | head -1)
}

# Registers a user (the first: an admin) and creates a product as it.
user_and_product() {
  token=$(curl -sf "$rest/v1/auth:register" -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","password":"correct horse battery"}' |
    grep -oE '"accessToken": *"[^"]+"' | cut -d'"' -f4)
  product=$(curl -sf "$rest/v1/products" -H "authorization: Bearer $token" \
    -H 'content-type: application/json' \
    -d '{"title":"A product of ordinary size","price":{"currencyCode":"EUR","units":"1999"},"stock":1000}' |
    grep -oE '"name": *"products/[^"]+"' | cut -d'"' -f4)
}
