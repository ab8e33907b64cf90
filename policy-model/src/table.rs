//! Compiled per-endpoint tables: what the datapath loads, with provenance for operators.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::ip::Prefix;
use crate::objects::ObjectKey;
use crate::ports::{IpProtocol, PortSet};
use crate::verdict::RuleRef;

/// Identifies a local endpoint (pod) in the datapath's maps. Stable for the pod's life on
/// this node; 0 is never used.
pub type EndpointId = u32;

/// Index of a port set within one [`PeerTable`].
pub type PortSetId = u32;

/// What a prefix of a table stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// The endpoint's own address (a pod may always reach itself).
    OwnAddress,
    /// An address of the node the endpoint runs on (ingress from it is always allowed).
    Node { name: String },
    /// A pod selected by a rule's peer.
    Pod { pod: ObjectKey },
    /// An ipBlock's cidr.
    Block { cidr: Prefix },
    /// An ipBlock's except range.
    Except { cidr: Prefix, except: Prefix },
    /// A rule with no peers: every address of the family.
    Everything,
    /// A ClusterNetworkPolicy `networks` CIDR.
    Network { cidr: Prefix },
    /// An address of a Node a ClusterNetworkPolicy `nodes` peer selects.
    SelectedNode { name: String },
    /// Addresses no rule names: the tiers' defaults (NetworkPolicy isolation or default
    /// allow) decide them.
    Remainder,
}

static ORIGINS: crate::intern::Interner<Origin> = crate::intern::Interner::new();

impl Origin {
    /// The shared copy of a provenance list.
    pub fn shared(origins: &[Origin]) -> Arc<[Origin]> {
        ORIGINS.get(origins)
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::OwnAddress => f.write_str("itself"),
            Origin::Node { name } => write!(f, "node {name}"),
            Origin::Pod { pod } => write!(f, "pod {pod}"),
            Origin::Block { cidr } => write!(f, "ipBlock {cidr}"),
            Origin::Except { cidr, except } => write!(f, "except {except} of ipBlock {cidr}"),
            Origin::Everything => f.write_str("any address"),
            Origin::Network { cidr } => write!(f, "network {cidr}"),
            Origin::SelectedNode { name } => write!(f, "selected node {name}"),
            Origin::Remainder => f.write_str("any other address"),
        }
    }
}

/// One LPM entry: addresses whose longest matching prefix in the table is `prefix` get
/// exactly the port set `port_set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerEntry {
    pub prefix: Prefix,
    pub port_set: PortSetId,
    /// What this prefix stands for (pods, ipBlocks, excepts, the node, ...). Shared
    /// ([`Origin::shared`]): every local pod's table names the same peers.
    pub stands_for: Arc<[Origin]>,
    /// The rules whose allowances make up the port set. Shared by the entries of a table
    /// with the same rules (most of them): a table can hold tens of thousands of entries.
    pub rules: Arc<[RuleRef]>,
    /// An address of the endpoint's node (ingress tables only). What the node's own stack
    /// sends from it always passes; `port_set` is what the policies give it otherwise
    /// (a forwarded packet masqueraded to it). See `crate::compile::mark_own_node`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub own_node: bool,
}

/// One direction of one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerTable {
    /// Not isolated: everything passes and the entries are empty.
    pub isolated: bool,
    pub isolated_by: Vec<ObjectKey>,
    /// Sorted by prefix (family, address, length): deterministic, and a pre-order of the
    /// prefix tree.
    pub entries: Vec<PeerEntry>,
    /// Port sets referenced by the entries, in order of first use.
    pub port_sets: Vec<PortSet>,
}

impl PeerTable {
    pub fn not_isolated() -> PeerTable {
        PeerTable { isolated: false, isolated_by: Vec::new(), entries: Vec::new(), port_sets: Vec::new() }
    }

    /// The entry an address gets (longest matching prefix).
    pub fn lookup(&self, addr: IpAddr) -> Option<&PeerEntry> {
        self.entries.iter().filter(|e| e.prefix.contains_addr(addr)).max_by_key(|e| e.prefix.len())
    }

    pub fn port_set(&self, entry: &PeerEntry) -> &PortSet {
        &self.port_sets[entry.port_set as usize]
    }

    /// What the datapath decides for traffic with `remote` on the other side that the
    /// node's stack sent, if `remote` is a node address (what the node sends itself).
    pub fn allows(&self, remote: IpAddr, protocol: IpProtocol, port: u16) -> bool {
        self.allows_from(remote, protocol, port, true)
    }

    /// What the datapath decides for traffic with `remote` on the other side; `node_stack`:
    /// the node's own stack sent it (false: forwarded, e.g. masqueraded to a node
    /// address), which decides whether an [`PeerEntry::own_node`] entry exempts it.
    pub fn allows_from(&self, remote: IpAddr, protocol: IpProtocol, port: u16, node_stack: bool) -> bool {
        !self.isolated || self.lookup(remote).is_some_and(|e| (e.own_node && node_stack) || self.port_set(e).contains(protocol, port))
    }

    /// The id of `set` in this table's port sets, added if missing.
    pub fn port_set_id(&mut self, set: &PortSet) -> PortSetId {
        match self.port_sets.iter().position(|s| s == set) {
            Some(i) => i as PortSetId,
            None => {
                self.port_sets.push(set.clone());
                (self.port_sets.len() - 1) as PortSetId
            }
        }
    }

    /// Equal for the datapath (provenance aside): same isolation and same prefix → ports.
    pub fn same_datapath(&self, other: &PeerTable) -> bool {
        self.isolated == other.isolated
            && self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(&other.entries)
                .all(|(a, b)| a.prefix == b.prefix && a.own_node == b.own_node && self.port_set(a) == other.port_set(b))
    }
}

/// Both tables of one local pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointTables {
    pub pod: ObjectKey,
    /// The addresses the endpoint owns; the datapath finds the endpoint by them.
    pub addresses: Vec<IpAddr>,
    /// Judges traffic entering the pod, by source address.
    pub ingress: PeerTable,
    /// Judges traffic leaving the pod, by destination address.
    pub egress: PeerTable,
    /// The tables with audited policies enforcing, where they differ ([`crate::audit`]).
    #[serde(skip_serializing_if = "AuditTables::is_empty")]
    pub audit: AuditTables,
}

impl EndpointTables {
    /// The tables of a pod before any compile: no address, nothing isolated.
    pub fn empty(pod: ObjectKey) -> EndpointTables {
        EndpointTables {
            pod,
            addresses: Vec::new(),
            ingress: PeerTable::not_isolated(),
            egress: PeerTable::not_isolated(),
            audit: AuditTables::default(),
        }
    }

    pub fn same_datapath(&self, other: &EndpointTables) -> bool {
        self.addresses == other.addresses
            && self.ingress.same_datapath(&other.ingress)
            && self.egress.same_datapath(&other.egress)
            && self.audit.same_datapath(&other.audit)
    }

    /// Total entries in both directions (audit tables included).
    pub fn entry_count(&self) -> usize {
        self.ingress.entries.len() + self.egress.entries.len() + self.audit.entry_count()
    }

    /// The enforced table of one direction.
    pub fn table(&self, direction: crate::policy::Direction) -> &PeerTable {
        match direction {
            crate::policy::Direction::Ingress => &self.ingress,
            crate::policy::Direction::Egress => &self.egress,
        }
    }

    /// The enforced table of one direction, to replace.
    pub fn table_mut(&mut self, direction: crate::policy::Direction) -> &mut PeerTable {
        match direction {
            crate::policy::Direction::Ingress => &mut self.ingress,
            crate::policy::Direction::Egress => &mut self.egress,
        }
    }

    /// The table of one direction with audited policies enforcing: its audit table, or
    /// the enforced one where audited policies change nothing.
    pub fn audit_view(&self, direction: crate::policy::Direction) -> &PeerTable {
        self.audit.get(direction).map_or(self.table(direction), |a| &a.table)
    }
}

/// One direction's table with audited policies enforcing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditTable {
    /// The audited policies that apply to the pod in this direction (what an audit event
    /// names).
    pub audited: Vec<ObjectKey>,
    pub table: PeerTable,
}

/// A pod's audit tables: per direction, present only where an audited policy applies and
/// the table differs from the enforced one (and is isolated: one that allows everything
/// never reports anything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditTables {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress: Option<AuditTable>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<AuditTable>,
}

impl AuditTables {
    pub fn is_empty(&self) -> bool {
        self.ingress.is_none() && self.egress.is_none()
    }

    pub fn get(&self, direction: crate::policy::Direction) -> Option<&AuditTable> {
        match direction {
            crate::policy::Direction::Ingress => self.ingress.as_ref(),
            crate::policy::Direction::Egress => self.egress.as_ref(),
        }
    }

    pub fn get_mut(&mut self, direction: crate::policy::Direction) -> &mut Option<AuditTable> {
        match direction {
            crate::policy::Direction::Ingress => &mut self.ingress,
            crate::policy::Direction::Egress => &mut self.egress,
        }
    }

    pub fn same_datapath(&self, other: &AuditTables) -> bool {
        same_audit_datapath(self.ingress.as_ref(), other.ingress.as_ref())
            && same_audit_datapath(self.egress.as_ref(), other.egress.as_ref())
    }

    pub fn entry_count(&self) -> usize {
        [&self.ingress, &self.egress].iter().filter_map(|t| t.as_ref()).map(|t| t.table.entries.len()).sum()
    }
}

/// Whether two audit tables of one direction (`None`: none) are the same to the datapath.
pub fn same_audit_datapath(a: Option<&AuditTable>, b: Option<&AuditTable>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.table.same_datapath(&b.table),
        _ => false,
    }
}
