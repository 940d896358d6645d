#!/usr/bin/env bash
# The relay against its contract (docs/openapi.yaml), checked by schemathesis
# (PyPI): a live relay process, every route, generated requests unsigned and then
# signed (a fresh device per request, scripts/contract_hooks.py). Exits non-zero on any
# failure (a 5xx, an undocumented status, a body that is not the documented problem
# document, ...).
#
#   scripts/contract.sh [EXAMPLES]      (per route and mode; default 200)
#
# Needs python3 with venv; installs schemathesis and cryptography in target/contract-venv.
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${1:-200}"
venv=target/contract-venv
if [ ! -x "$venv/bin/st" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'schemathesis==4.32.5' 'cryptography>=42'
fi
cargo build -q -p hotline
data=$(mktemp -d)
trap 'kill "$relay" 2>/dev/null || true; wait "$relay" 2>/dev/null || true; rm -rf "$data"' EXIT
target/debug/hotline relay serve --data "$data" --listen 127.0.0.1:0 >"$data/address" 2>"$data/log" &
relay=$!
for _ in $(seq 1 100); do
    [ -s "$data/address" ] && break
    sleep 0.1
done
address=$(head -1 "$data/address")
base="${address%%/#*}"
echo "relay at $base"
status=0
for sign in 0 1; do
    echo "== signed: $sign"
    HOTLINE_SIGN=$sign SCHEMATHESIS_HOOKS=contract_hooks PYTHONPATH=scripts \
        "$venv/bin/st" --config-file scripts/schemathesis.toml run docs/openapi.yaml \
        --url "$base" --tls-verify false \
        --max-examples "$examples" --no-color || status=1
done
exit $status
