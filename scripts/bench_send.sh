#!/usr/bin/env bash
# Wall time of `hotline send`, a process of its own (open the home, seal, commit, push,
# exit), as a script or an operator runs it: with no follower running for the home
# (it posts over the one-shot route itself: TLS handshake, signed request) and beside a
# running `hotline sync --follow` of the same home (it hands the push to the follower
# over the home's socket; the follower appends over the stream connection it holds).
# The two are timed in turns, in one run, against one relay process on loopback; every
# message must reach the other party.
#
#   cargo build --release -p hotline
#   scripts/bench_send.sh [HOTLINE_BINARY]     (default target/release/hotline)
#
# HOTLINE_BENCH_SENDS: sends per turn (default 25); HOTLINE_BENCH_TURNS: turns of
# each (default 4).
set -euo pipefail
bin=$(realpath "${1:-target/release/hotline}")
sends=${HOTLINE_BENCH_SENDS:-25}
turns=${HOTLINE_BENCH_TURNS:-4}
dir=$(mktemp -d)
follower=
relay_pid=
cleanup() {
    [ -n "$follower" ] && kill "$follower" 2>/dev/null || true
    [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

at() { HOTLINE_HOME="$dir/$1" "$bin" "${@:2}"; }

"$bin" relay serve --data "$dir/relay" --listen 127.0.0.1:0 >"$dir/relay.out" 2>/dev/null &
relay_pid=$!
for _ in $(seq 200); do [ -s "$dir/relay.out" ] && break; sleep 0.05; done
relay=$(head -1 "$dir/relay.out")
for party in north south; do
    at "$party" init --party "$party" --relay "$relay" >/dev/null
    at "$party" card export --out "$dir/$party.card" >/dev/null
done
fingerprint() { at "$1" id --json | sed -n 's/.*"fingerprint":"\([^"]*\)".*/\1/p'; }
at north card import "$dir/south.card" --fingerprint "$(fingerprint south)" >/dev/null
at south card import "$dir/north.card" --fingerprint "$(fingerprint north)" >/dev/null
at north channel create crisis --with south --relay "$relay" >/dev/null 2>&1
at north sync >/dev/null
at south sync >/dev/null

: >"$dir/alone"
: >"$dir/beside"
# Times `sends` sends into the file named by $1; each must say it went as $2 says.
time_sends() {
    for i in $(seq "$sends"); do
        start=$(date +%s%N)
        at north send crisis "$1 $i" --json >"$dir/last"
        end=$(date +%s%N)
        echo $(((end - start) / 1000)) >>"$dir/$1"
        grep -q "\"by_follower\":$2" "$dir/last" || {
            echo "send did not go as expected: $(cat "$dir/last")" >&2
            exit 1
        }
        grep -q '"relayed":1' "$dir/last" || {
            echo "the relay did not take it: $(cat "$dir/last")" >&2
            exit 1
        }
    done
}
for _ in $(seq "$turns"); do
    time_sends alone false
    HOTLINE_HOME="$dir/north" "$bin" sync --follow >/dev/null 2>&1 &
    follower=$!
    for _ in $(seq 200); do [ -S "$dir/north/follower.sock" ] && break; sleep 0.05; done
    time_sends beside true
    kill "$follower"
    wait "$follower" 2>/dev/null || true
    follower=
done

at south sync >/dev/null
arrived=$(at south log crisis --json | grep -c '"from"')
expected=$((2 * sends * turns))
[ "$arrived" -ge "$expected" ] || {
    echo "south holds $arrived messages, not $expected" >&2
    exit 1
}
report() {
    sort -n "$dir/$1" | awk -v label="$2" '
        { t[NR] = $1 }
        END {
            p99 = int(NR * 0.99); if (p99 < NR * 0.99) p99++
            printf "%s: p50 %.1f ms, p99 %.1f ms (%d sends)\n", label, t[int(NR / 2) + 1] / 1000, t[p99] / 1000, NR
        }'
}
report alone "hotline send, no follower (posts itself, one-shot route)"
report beside "hotline send beside sync --follow (handed to the follower)"
echo "south received all $expected"
