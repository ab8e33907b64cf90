//! ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2, network-policy-api v0.2.0).
//!
//! - [`types`]: the API objects as manifests write them.
//! - [`validate`]: the CRD schema and CEL checks; a refused object is an
//!   [`crate::InvalidObject`] naming the policy and the field path.
//! - [`model`]: the validated form ([`ClusterPolicy`]) the evaluator and compiler share.
//! - [`eval`]: the reference semantics of the tiers around NetworkPolicy; used by
//!   [`crate::verdict`].
//! - `compile`: tiered per-pod tables, used by [`crate::compile_endpoint`].
//!
//! What this model cannot honour fails closed and is reported in
//! [`ClusterPolicy::warnings`]: `domainNames` peers (no DNS here) and peers that set no
//! field this version knows.

mod build;
mod cache;
pub(crate) mod patch;
pub(crate) mod compile;
pub mod eval;
pub mod model;
pub mod types;
pub mod validate;

use k8s_openapi::api::core::v1 as core;

pub use cache::TierCache;
pub(crate) use cache::pod_peer_bits;
pub use eval::{DecidedBy, TierVerdict, decide};
pub use model::{Action, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, ClusterRuleRef, FailClosed, Subject, Tier};
pub use types::ClusterNetworkPolicy;

use crate::labels::Labels;

/// A Node's labels, for `nodes` peers (kept beside [`crate::Node`], see
/// [`crate::ClusterState::set_node_labels`]).
pub fn node_labels_from_k8s(node: &core::Node) -> Labels {
    // Collected rather than cloned: works whatever `Labels` is built from.
    node.metadata.labels.iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Policies sharing a tier and a priority (at least two each), by name: upstream lets an
/// implementation apply any of them to a connection they all match; ours applies them in
/// name order. For warnings and `explain`.
pub fn priority_ties(state: &crate::ClusterState) -> Vec<(Tier, u16, Vec<String>)> {
    let mut by: std::collections::BTreeMap<(Tier, u16), Vec<String>> = std::collections::BTreeMap::new();
    for p in state.cluster_policies() {
        by.entry((p.tier, p.priority)).or_default().push(p.name.clone());
    }
    by.into_iter().filter(|(_, v)| v.len() > 1).map(|((t, p), v)| (t, p, v)).collect()
}

#[cfg(test)]
pub(crate) mod tests;
