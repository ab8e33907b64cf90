#!/usr/bin/env bash
# The agent's main job on an emulated node, no cluster needed (root): pods in network
# namespaces, the example policies, `policy-agent run` enforcing them, the observed
# reachability, then `policy-agent dump`. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build -q --release -p policy-agent -p conformance --bin policy-agent --bin demo
exec ./target/release/demo
