#!/bin/bash
# benches/timeshare.sh CPUS JOBS [ROUNDS]: the CPU work of one `compute` job when JOBS of them
# time-share one node of CPUS CPUs (cgroup quota; automatic migration off), as
# makespan x CPUS / JOBS seconds, ROUNDS times (default 2). Needs root (cgroups) and a release
# build with the test images (`cargo build --release && make -C images`). Compare "1 1" with
# "1 3" to see what time-sharing a CPU costs a guest on this machine (BENCHMARKS.md).
set -eu
CPUS=${1:?usage: timeshare.sh CPUS JOBS [ROUNDS]}
JOBS=${2:?usage: timeshare.sh CPUS JOBS [ROUNDS]}
ROUNDS=${3:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
B=$ROOT/target/release/mosvm
PROG=$ROOT/images/out/glibc-static/compute
DIR=$(mktemp -d)
trap 'kill $NODE 2>/dev/null; wait $NODE 2>/dev/null; rm -rf "$DIR"' EXIT
"$B" keygen --dir "$DIR/key" >/dev/null
PORT=$((20000 + RANDOM % 20000))
"$B" node --name "ts$$" --listen 127.0.0.1:$PORT --key-dir "$DIR/key" --socket "$DIR/node.sock" \
  --cpus "$CPUS" --policy off >"$DIR/node.log" 2>&1 &
NODE=$!
for _ in $(seq 50); do [ -S "$DIR/node.sock" ] && break; sleep 0.1; done
for r in $(seq "$ROUNDS"); do
  t0=$(date +%s.%N)
  pids=()
  for _ in $(seq "$JOBS"); do
    MOSVM_SOCKET=$DIR/node.sock "$B" run "$PROG" 2200000000 >/dev/null &
    pids+=($!)
  done
  wait "${pids[@]}"
  t1=$(date +%s.%N)
  python3 -c "m=$t1-$t0; print(f'cpus $CPUS jobs $JOBS round $r: makespan {m:.2f} s, work per job {m*$CPUS/$JOBS:.2f} s')"
done
