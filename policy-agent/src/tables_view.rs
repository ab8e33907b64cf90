//! A node's compiled tables, for people (`compile`, later `dump`) and for tools (JSON).

use std::fmt::Write as _;
use std::net::IpAddr;

use policy_model::{Direction, Endpoint, ObjectKey, Origin, PeerTable, PortSet, Prefix, RuleRef};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct EntryView {
    pub prefix: Prefix,
    /// What addresses matching this prefix may do.
    pub allows: PortSet,
    pub stands_for: std::sync::Arc<[Origin]>,
    pub rules: std::sync::Arc<[RuleRef]>,
    /// An address of the pod's node: what the node itself sends always passes, and
    /// `allows` is for what it only forwards ([`policy_model::PeerEntry::own_node`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub own_node: bool,
}

impl EntryView {
    /// `allows` in words, with the node exemption where it applies.
    pub fn allows_text(&self) -> String {
        if self.own_node {
            format!("all from the node itself; forwarded: {}", self.allows)
        } else {
            self.allows.to_string()
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DirectionView {
    pub isolated: bool,
    pub isolated_by: Vec<ObjectKey>,
    pub entries: Vec<EntryView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    pub pod: ObjectKey,
    pub endpoint_id: u32,
    pub revision: u32,
    pub addresses: Vec<IpAddr>,
    pub ingress: DirectionView,
    pub egress: DirectionView,
    /// Audit tables: per direction where audited policies change the table, the table
    /// with them enforcing (never enforced; new flows it denies are reported as `audit`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<AuditView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditView {
    pub direction: Direction,
    /// The audited policies that apply in this direction.
    pub audited: Vec<ObjectKey>,
    pub table: DirectionView,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub node: String,
    pub endpoints: Vec<EndpointView>,
}

fn direction(t: &PeerTable) -> DirectionView {
    DirectionView {
        isolated: t.isolated,
        isolated_by: t.isolated_by.clone(),
        entries: t
            .entries
            .iter()
            .map(|e| EntryView {
                prefix: e.prefix,
                allows: t.port_set(e).clone(),
                stands_for: e.stands_for.clone(),
                rules: e.rules.clone(),
                own_node: e.own_node,
            })
            .collect(),
    }
}

pub fn endpoint_view(ep: &Endpoint) -> EndpointView {
    EndpointView {
        pod: ep.tables.pod.clone(),
        endpoint_id: ep.id,
        revision: ep.revision,
        addresses: ep.tables.addresses.clone(),
        ingress: direction(&ep.tables.ingress),
        egress: direction(&ep.tables.egress),
        audit: Direction::BOTH
            .iter()
            .filter_map(|d| {
                ep.tables.audit.get(*d).map(|a| AuditView { direction: *d, audited: a.audited.clone(), table: direction(&a.table) })
            })
            .collect(),
    }
}

fn stands_for(origins: &[Origin]) -> String {
    if origins.is_empty() {
        return "(inherits a shorter prefix's value)".into();
    }
    origins.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(", ")
}

/// The rules behind an entry: ClusterNetworkPolicy rules as `tier/priority policy #rule
/// "name" action`, NetworkPolicy rules as `ns/name #rule`.
fn provenance(rules: &[RuleRef]) -> String {
    if rules.is_empty() {
        return "default".into();
    }
    rules
        .iter()
        .map(|r| match &r.cluster {
            Some(c) => {
                let name = if c.name.is_empty() { String::new() } else { format!(" {:?}", c.name) };
                format!("{}/{} {} #{}{} {}", c.tier, c.priority, c.policy, c.rule, name, c.action)
            }
            None => format!("{} #{}", r.policy, r.rule),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn render_direction(out: &mut String, name: &str, d: &DirectionView) {
    if !d.isolated {
        let _ = writeln!(out, "  {name}: not isolated: all traffic passes");
        return;
    }
    let by: Vec<String> = d.isolated_by.iter().map(|k| k.to_string()).collect();
    if by.is_empty() {
        // Only ClusterNetworkPolicies shape it: each entry's RULES say which.
        let _ = writeln!(out, "  {name}: decided by ClusterNetworkPolicy tiers; addresses not listed are blocked");
    } else {
        let _ = writeln!(out, "  {name}: isolated by {}; addresses not listed are blocked", by.join(", "));
    }
    let tiered = d.entries.iter().any(|e| e.rules.iter().any(|r| r.cluster.is_some()));
    let mut header = vec!["PREFIX".to_string(), "ALLOWS".to_string(), "STANDS FOR".to_string()];
    if tiered {
        header.push("DECIDED BY".to_string());
    }
    let mut rows = vec![header];
    rows.extend(d.entries.iter().map(|e| {
        let mut row = vec![e.prefix.to_string(), e.allows_text(), stands_for(&e.stands_for)];
        if tiered {
            row.push(provenance(&e.rules));
        }
        row
    }));
    crate::text::columns(out, "    ", &rows);
}

impl NodeView {
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        if self.endpoints.is_empty() {
            let _ = writeln!(out, "node {}: no pods to enforce", self.node);
        }
        for (i, ep) in self.endpoints.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let addrs: Vec<String> = ep.addresses.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(
                out,
                "{}  endpoint {}  revision {}  addresses {}",
                ep.pod,
                ep.endpoint_id,
                ep.revision,
                if addrs.is_empty() { "(none yet)".into() } else { addrs.join(", ") }
            );
            render_direction(&mut out, "ingress", &ep.ingress);
            render_direction(&mut out, "egress", &ep.egress);
            for a in &ep.audit {
                let names: Vec<String> = a.audited.iter().map(|k| k.to_string()).collect();
                render_direction(
                    &mut out,
                    &format!("{} AUDIT (not enforced; with audited {} enforcing)", a.direction, names.join(", ")),
                    &a.table,
                );
            }
        }
        out
    }
}
