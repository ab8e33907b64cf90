//! ClusterNetworkPolicy tests: validation, one unit test per semantic rule (written from
//! the upstream API text), and property tests against the reference evaluator.

mod incremental;
pub(crate) mod props;
mod semantics;
mod validation;

use serde_json::{Value, json};

use crate::cnp::{ClusterNetworkPolicy, ClusterPolicy};
use crate::error::InvalidObject;

/// A ClusterNetworkPolicy from its spec, written as the API's JSON.
pub fn mk_cnp(name: &str, spec: Value) -> ClusterNetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("test ClusterNetworkPolicy must deserialize")
}

pub fn validate(name: &str, spec: Value) -> Result<ClusterPolicy, InvalidObject> {
    ClusterPolicy::from_manifest(&mk_cnp(name, spec))
}

pub fn valid_cnp(name: &str, spec: Value) -> ClusterPolicy {
    validate(name, spec).unwrap_or_else(|e| panic!("{e}"))
}
