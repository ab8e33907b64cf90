//! Audit mode: policies that are evaluated but enforce nothing.
//!
//! A NetworkPolicy is audited when it, or its Namespace, carries the annotation
//! `policy-agent.io/enforcement: audit`, or when the whole node audits
//! ([`ClusterState::set_audit_all`], `policy-agent run --enforcement audit`: every
//! NetworkPolicy and every ClusterNetworkPolicy).
//!
//! The state is read in one of two [`View`]s:
//! - [`View::Enforced`] (the default): audited policies do not exist. Every table the
//!   datapath enforces, and the evaluator's verdict, are exactly those of the cluster
//!   without them.
//! - [`View::Audit`]: every policy enforces, audited ones included. A local pod whose
//!   tables differ in that view gets them as [`AuditTables`] beside its enforced ones; the
//!   datapath looks them up only for new flows its enforced tables allow, and reports
//!   those they deny with verdict `audit`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::cnp::TierCache;
use crate::error::{FieldError, InvalidObject};
use crate::objects::{ObjectKey, Pod};
use crate::policy::Direction;
use crate::state::ClusterState;
use crate::table::{AuditTable, AuditTables, EndpointTables, PeerTable};

/// The annotation that audits a NetworkPolicy, or every NetworkPolicy of a Namespace.
pub const ENFORCEMENT_ANNOTATION: &str = "policy-agent.io/enforcement";

/// What an object's [`ENFORCEMENT_ANNOTATION`] says.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Enforcement {
    /// No annotation, or `enforce`.
    #[default]
    Enforce,
    /// `audit`: evaluated and reported, never enforced.
    Audit,
    /// Any other value: enforced (fail closed) and reported as an error naming the object
    /// and the annotation.
    Invalid(Arc<str>),
}

impl Enforcement {
    /// The annotation's meaning in an object's `metadata.annotations`.
    pub fn from_annotations(annotations: Option<&BTreeMap<String, String>>) -> Enforcement {
        match annotations.and_then(|a| a.get(ENFORCEMENT_ANNOTATION)).map(String::as_str) {
            None | Some("enforce") => Enforcement::Enforce,
            Some("audit") => Enforcement::Audit,
            Some(other) => Enforcement::Invalid(Arc::from(other)),
        }
    }

    pub fn is_audit(&self) -> bool {
        matches!(self, Enforcement::Audit)
    }

    /// The error to report for an invalid value (`None` for a valid one).
    pub fn error(&self, kind: &'static str, key: &ObjectKey) -> Option<InvalidObject> {
        let Enforcement::Invalid(value) = self else { return None };
        Some(InvalidObject {
            kind,
            key: key.clone(),
            errors: vec![FieldError::new(
                format!("metadata.annotations[{ENFORCEMENT_ANNOTATION}]"),
                format!("Unsupported value: {value:?}: supported values: \"audit\", \"enforce\" (enforced until fixed)"),
            )],
        })
    }
}

impl Serialize for Enforcement {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Enforcement::Enforce => "enforce",
            Enforcement::Audit => "audit",
            Enforcement::Invalid(_) => "invalid (enforced)",
        })
    }
}

/// Which policies take part in evaluation and compilation (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// Audited policies are left out: what the datapath enforces.
    #[default]
    Enforced,
    /// Every policy enforces, audited ones included: what audit events report.
    Audit,
}

/// The audited policies that apply to `pod` in `direction`: audited NetworkPolicies that
/// isolate it and, when the node audits, ClusterNetworkPolicies with rules for it. In key
/// order (ClusterNetworkPolicies, whose namespace is empty, first).
pub fn audited_for(state: &ClusterState, pod: &Pod, direction: Direction) -> Vec<ObjectKey> {
    let mut out: BTreeSet<ObjectKey> = BTreeSet::new();
    // Cheap tests first: this runs for every pod compiled.
    let all = state.audit_all() || state.namespace(&pod.key.namespace).is_some_and(|ns| ns.enforcement.is_audit());
    for p in state.policies_in(&pod.key.namespace) {
        if (all || p.enforcement.is_audit()) && p.rules(direction).is_some() && state.selects(p, pod) {
            out.insert(p.key.clone());
        }
    }
    if state.audit_all() {
        for p in state.cluster_policies() {
            if !p.rules(direction).is_empty() && crate::cnp::eval::selects(state, p, pod) {
                out.insert(p.key());
            }
        }
    }
    out.into_iter().collect()
}

/// Whether any audited policy applies to `pod` (either direction).
pub fn audits(state: &ClusterState, pod: &Pod) -> bool {
    Direction::BOTH.iter().any(|d| !audited_for(state, pod, *d).is_empty())
}

/// The audit tables of `pod`, whose enforced tables are `enforced`: per direction, the
/// table with the audited policies enforcing, where an audited policy applies and that
/// table differs from the enforced one (and can deny at all). Compiles in the audit view
/// whatever view `state` is in.
pub fn compile_audit(
    state: &mut ClusterState,
    pod: &Pod,
    node_addresses: &BTreeSet<IpAddr>,
    enforced: &EndpointTables,
    cache: &mut TierCache,
) -> AuditTables {
    let mut out = AuditTables::default();
    for direction in Direction::BOTH {
        *out.get_mut(direction) = compile_audit_direction(state, pod, direction, node_addresses, enforced.table(direction), cache);
    }
    out
}

/// [`compile_audit`] for one direction, whose enforced table is `enforced`.
pub fn compile_audit_direction(
    state: &mut ClusterState,
    pod: &Pod,
    direction: Direction,
    node_addresses: &BTreeSet<IpAddr>,
    enforced: &PeerTable,
    cache: &mut TierCache,
) -> Option<AuditTable> {
    let audited = audited_for(state, pod, direction);
    if audited.is_empty() {
        return None;
    }
    let table = state.with_view(View::Audit, |s| crate::compile::compile_direction(s, pod, direction, node_addresses, cache));
    if !table.isolated || table.same_datapath(enforced) {
        return None;
    }
    Some(AuditTable { audited, table })
}

/// Both tables of `pod` (see [`crate::compile_pod`]) with its audit tables.
pub fn compile_pod_with_audit(state: &mut ClusterState, pod: &Pod) -> EndpointTables {
    let node_addresses = pod.node.as_deref().map(|n| state.node_addresses(n)).unwrap_or_default();
    let mut tables = state.with_view(View::Enforced, |s| crate::compile::compile_endpoint(s, pod, &node_addresses));
    tables.audit = compile_audit(state, pod, &node_addresses, &tables, &mut TierCache::default());
    tables
}
