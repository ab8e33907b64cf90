#!/usr/bin/env bash
# The agent's main job, offline: the example cluster (examples/cluster) with the example
# policies (deploy/examples), judged by the model and compiled for the node.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build -q --release -p policy-agent
agent=target/release/policy-agent
m=(--manifests examples/cluster --manifests deploy/examples)

section() { printf '\n=== %s\n\n' "$*"; }
section "policy-agent matrix ${m[*]} --port 8080/TCP --port 5432/TCP --port 9090/TCP --port 53/UDP"
"$agent" matrix "${m[@]}" --port 8080/TCP --port 5432/TCP --port 9090/TCP --port 53/UDP
section "policy-agent explain ${m[*]} --from monitoring/prometheus --to shop/db --port 9090"
"$agent" explain "${m[@]}" --from monitoring/prometheus --to shop/db --port 9090
section "policy-agent compile ${m[*]} --node demo-node   (shop/backend)"
"$agent" compile "${m[@]}" --node demo-node | awk '/^shop\/backend/{p=1} /^shop\/db/{p=0} p'
