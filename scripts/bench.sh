#!/usr/bin/env bash
# Benchmarks (not tests). Installs what it needs, then:
#   1. the compiler (criterion): full compile, one pod change, one policy change, memory;
#   2. the datapath between two pods on an emulated node: TCP connections/s and UDP
#      request/response/s with no program and with 10, 1,000 and 10,000 rules.
# Figures are printed and written as JSON under target/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p target/bench
cargo bench -p policy-model --bench compile
cargo build --release -p conformance --bin bench
./target/release/bench --seconds "${BENCH_SECONDS:-4}" --rounds "${BENCH_ROUNDS:-3}" --json target/bench/datapath.json
echo "datapath figures: target/bench/datapath.json"
# 3. The agent: time to enforce (policy change, new pod) and memory (see README).
cargo build --release -p policy-agent -p conformance --bin policy-agent --bin bench_agent
./target/release/bench_agent --json target/bench/agent.json
echo "agent figures: target/bench/agent.json"
