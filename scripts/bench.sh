#!/usr/bin/env bash
# Benchmarks (not tests). Installs what it needs (scripts/setup.sh: iptables, nftables, the
# eBPF toolchain), then:
#   1. the compiler (criterion): full compile, one pod change, one policy change, memory;
#      and a pod coming and going under cluster policies, compiled and written into
#      in-memory maps (both skipped with BENCH_SKIP_COMPILE=1);
#   2. the datapath between two pods on an emulated node, for no enforcement, policy-agent,
#      kube-router-style iptables and nftables with sets, at 10, 1,000 and 10,000 rules:
#      TCP connections/s, UDP request/response/s, bulk TCP, connect latency p50/p99.
#   3. the agent: time to enforce a policy change and a new pod, memory (RSS).
# Arguments go to the datapath bench (`--help` lists them). Figures are printed and written
# as JSON to <target dir>/bench/{datapath,agent}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target/bench"
if [ "${BENCH_SKIP_COMPILE:-0}" != 1 ]; then
  cargo bench -p policy-model --bench compile
  cargo bench -p policy-agent --bench sync
fi
cargo build --release -p conformance --bin bench
"$target/release/bench" --seconds "${BENCH_SECONDS:-3}" --rounds "${BENCH_ROUNDS:-3}" --json "$target/bench/datapath.json" "$@"
echo "datapath figures: $target/bench/datapath.json"
# 3. The agent: time to enforce (policy change, new pod) and memory (see README).
cargo build --release -p policy-agent -p conformance --bin policy-agent --bin bench_agent
"$target/release/bench_agent" --json "$target/bench/agent.json"
echo "agent figures: $target/bench/agent.json"
