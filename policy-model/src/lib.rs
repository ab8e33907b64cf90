//! policy-model: the Kubernetes NetworkPolicy v1 semantics, with no I/O.
//!
//! - [`ClusterState`] holds namespaces, pods, nodes, validated [`Policy`]s and
//!   ClusterNetworkPolicies ([`cnp`]).
//! - [`verdict`] is the reference evaluator: one flow, judged from the API text, with
//!   provenance.
//! - [`compile_endpoint`] turns one pod's policies into LPM-exact [`PeerTable`]s, and
//!   [`NodeCompiler`] keeps every local pod's tables current as the cluster changes.
#![forbid(unsafe_code)]

pub mod audit;
pub mod cnp;
pub mod compile;
pub mod error;
pub mod incremental;
pub mod intern;
pub mod ip;
pub mod labels;
pub mod objects;
pub mod policy;
pub mod ports;
pub mod state;
pub mod table;
pub mod verdict;
#[cfg(feature = "workload")]
pub mod workload;

#[cfg(test)]
mod tests;

pub use audit::{ENFORCEMENT_ANNOTATION, Enforcement, View};
pub use cnp::{ClusterNetworkPolicy, ClusterPolicy, TierCache, TierVerdict};
pub use compile::{compile_endpoint, compile_endpoint_with, compile_pod};
pub use error::{FieldError, InvalidObject};
pub use incremental::{Change, ChangeReport, Endpoint, NodeCompiler};
pub use ip::{Family, Prefix};
pub use labels::{Labels, Selector};
pub use objects::{NAMESPACE_NAME_LABEL, NamedPort, Namespace, Node, ObjectKey, Pod};
pub use policy::{Direction, Policy};
pub use ports::{IpProtocol, PortRange, PortSet, Protocol};
pub use state::{AddressOwner, ClusterState};
pub use table::{AuditTable, AuditTables, EndpointId, EndpointTables, Origin, PeerEntry, PeerTable};
pub use verdict::{Decision, Flow, RuleMatch, RuleRef, Verdict, rule_matches_for, verdict, verdict_forwarded};
