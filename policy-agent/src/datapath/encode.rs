//! Compiled tables → map entries (see `policy-ebpf`'s module doc for the encoding).

use std::net::IpAddr;

use aya::maps::lpm_trie::Key;
use policy_ebpf::{
    Addr, PEER_KEY_FIXED_BITS, PORT_BLOCK_BITS, PORT_BLOCK_SIZE, PORT_KEY_FIXED_BITS, PORT_PROTOCOL_OTHER, PeerKey, PortBits, PortKey,
};
use policy_model::{Family, PeerEntry, PeerTable, PortRange, PortSet, Prefix, Protocol};

/// An address in the maps' 16-byte encoding (IPv4 mapped).
pub fn encode_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(a) => policy_ebpf::addr_from_v4(a.octets()),
        IpAddr::V6(a) => Addr(a.octets()),
    }
}

/// A prefix as (address, length within the 128-bit encoding).
pub fn encode_prefix(p: &Prefix) -> (Addr, u32) {
    let extra = match p.family() {
        Family::Ipv4 => 96,
        Family::Ipv6 => 0,
    };
    (encode_addr(p.addr()), extra + p.len() as u32)
}

/// One `PEERS` entry of a direction's table: an address prefix (its length within the
/// 128-bit encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerSlot {
    pub direction: u32,
    pub addr: Addr,
    pub len: u32,
}

impl PeerSlot {
    pub fn key(&self, endpoint: u32) -> Key<PeerKey> {
        Key::new(PEER_KEY_FIXED_BITS + self.len, PeerKey { endpoint, direction: self.direction, addr: self.addr })
    }

    pub fn from_key(k: &Key<PeerKey>) -> PeerSlot {
        let d = k.data();
        PeerSlot { direction: d.direction, addr: d.addr, len: k.prefix_len().saturating_sub(PEER_KEY_FIXED_BITS) }
    }

    /// Whether `addr` (encoded) is inside this prefix.
    pub fn contains(&self, addr: &Addr) -> bool {
        let (a, b) = (u128::from_be_bytes(self.addr.0), u128::from_be_bytes(addr.0));
        self.len == 0 || (a ^ b) >> (128 - self.len.min(128)) == 0
    }
}

/// What a `PEERS` entry allows, before port sets get their ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Allow {
    /// Every protocol and port.
    All,
    /// Nothing (no port set).
    Nothing,
    /// The port set of this index in the table's `port_sets`.
    Ports(usize),
}

/// `::ffff:0:0/96`, where the encoding puts IPv4.
fn ipv4_mapped_block() -> Prefix {
    Prefix::new(IpAddr::V6(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)), 96).expect("valid prefix")
}

/// `PEERS` entries of one direction's table.
///
/// IPv4 is encoded IPv4-mapped, so an IPv6 prefix is kept from matching IPv4 traffic, as
/// the API means (an ipBlock of one family never matches an address of the other): an
/// IPv6 prefix inside `::ffff:0:0/96` is left out (the IPv6 stack drops packets with
/// IPv4-mapped addresses), and when an IPv6 prefix covers that block (`::/0`, `::/64`..)
/// while no IPv4 `0.0.0.0/0` entry takes it, an entry that allows nothing is put there,
/// so that an IPv4 address no IPv4 entry matches stops at it.
///
/// The third field is [`policy_model::PeerEntry::own_node`] (`PEER_OWN_NODE`).
pub fn peer_entries(t: &PeerTable, direction: u32) -> Vec<(PeerSlot, Allow, bool)> {
    let mut out: Vec<(PeerSlot, Allow, bool)> = t.entries.iter().filter_map(|e| peer_entry(t, e, direction)).collect();
    if let Some(slot) = mapped_block_stop(t, direction) {
        out.push((slot, Allow::Nothing, false));
    }
    out
}

/// One entry of `t` as [`peer_entries`] gives it; `None` for an IPv6 prefix inside the
/// IPv4-mapped block (left out).
pub fn peer_entry(t: &PeerTable, e: &PeerEntry, direction: u32) -> Option<(PeerSlot, Allow, bool)> {
    let slot = peer_slot(&e.prefix, direction)?;
    let set = t.port_set(e);
    let allow = if set.is_all() {
        Allow::All
    } else if set.is_empty() {
        Allow::Nothing
    } else {
        Allow::Ports(e.port_set as usize)
    };
    Some((slot, allow, e.own_node))
}

/// The slot of an entry at `prefix`; `None` for an IPv6 prefix inside the IPv4-mapped
/// block (left out).
pub fn peer_slot(prefix: &Prefix, direction: u32) -> Option<PeerSlot> {
    if prefix.family() == Family::Ipv6 && ipv4_mapped_block().contains(prefix) {
        return None;
    }
    let (addr, len) = encode_prefix(prefix);
    Some(PeerSlot { direction, addr, len })
}

/// The slot of the IPv4-mapped block, where IPv4 is encoded: the same as IPv4
/// `0.0.0.0/0`'s.
pub fn mapped_block_slot(direction: u32) -> PeerSlot {
    let (addr, len) = encode_prefix(&ipv4_mapped_block());
    PeerSlot { direction, addr, len }
}

/// The entry that stops IPv4 at an IPv6 prefix covering the mapped block, when `t` needs
/// one (see [`peer_entries`]): its slot, which allows nothing.
pub fn mapped_block_stop(t: &PeerTable, direction: u32) -> Option<PeerSlot> {
    let mapped = ipv4_mapped_block();
    let v6_covers_v4 =
        t.entries.iter().any(|e| e.prefix.family() == Family::Ipv6 && e.prefix.len() < mapped.len() && e.prefix.contains(&mapped));
    let v4_everything = t.entries.iter().any(|e| e.prefix.family() == Family::Ipv4 && e.prefix.len() == 0);
    (v6_covers_v4 && !v4_everything).then(|| mapped_block_slot(direction))
}

/// One `PORTS` entry of a port set: the ports of `protocol` whose top `len` bits (of
/// `PORT_BLOCK_BITS`) equal `port`'s, with bitmap `bits` in each block they cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortEntry {
    pub protocol: u8,
    /// Host order; the low `16 - PORT_BLOCK_BITS` bits are zero.
    pub port: u16,
    /// 0..=PORT_BLOCK_BITS.
    pub len: u8,
    pub bits: PortBits,
}

impl PortEntry {
    pub fn key(&self, port_set: u32) -> Key<PortKey> {
        Key::new(
            PORT_KEY_FIXED_BITS + self.len as u32,
            PortKey { port_set, protocol: self.protocol, _pad: 0, port: self.port.to_be_bytes() },
        )
    }

    pub fn from_key(k: &Key<PortKey>, bits: PortBits) -> (u32, PortEntry) {
        let d = k.data();
        let len = k.prefix_len().saturating_sub(PORT_KEY_FIXED_BITS) as u8;
        (d.port_set, PortEntry { protocol: d.protocol, port: u16::from_be_bytes(d.port), len, bits })
    }
}

/// The `PORTS` entries of a port set (without its id), in a canonical order: equal sets
/// give equal lists. Blocks a range covers in full become block prefixes with a full
/// bitmap; partly covered blocks one entry each.
pub fn port_set_entries(set: &PortSet) -> Vec<PortEntry> {
    const FULL: PortBits = PortBits::MAX;
    let shift = 16 - PORT_BLOCK_BITS;
    let mut out = Vec::new();
    for proto in Protocol::ALL {
        // Block index -> bitmap, for blocks a range touches.
        let mut blocks: std::collections::BTreeMap<u32, PortBits> = std::collections::BTreeMap::new();
        for r in set.ranges(proto) {
            let (start, end) = (r.start as u32, r.end as u32);
            for b in (start >> shift)..=(end >> shift) {
                let lo = start.max(b << shift) - (b << shift);
                let hi = end.min(((b + 1) << shift) - 1) - (b << shift);
                let width = hi - lo + 1;
                let ones: PortBits = if width >= PORT_BLOCK_SIZE { FULL } else { ((1 as PortBits) << width) - 1 };
                let mask = ones << lo;
                *blocks.entry(b).or_insert(0) |= mask;
            }
        }
        // Runs of full blocks as aligned block prefixes; partial blocks as they are.
        let mut run: Option<(u32, u32)> = None;
        let flush = |run: &mut Option<(u32, u32)>, out: &mut Vec<PortEntry>| {
            if let Some((first, last)) = run.take() {
                let range = PortRange { start: (first << shift) as u16, end: (((last + 1) << shift) - 1) as u16 };
                for (port, len) in range.to_prefixes() {
                    out.push(PortEntry { protocol: proto.number(), port, len, bits: FULL });
                }
            }
        };
        for (&b, &bits) in &blocks {
            if bits == FULL {
                run = match run {
                    Some((first, last)) if last + 1 == b => Some((first, b)),
                    other => {
                        let mut o = other;
                        flush(&mut o, &mut out);
                        Some((b, b))
                    }
                };
            } else {
                flush(&mut run, &mut out);
                out.push(PortEntry { protocol: proto.number(), port: (b << shift) as u16, len: PORT_BLOCK_BITS as u8, bits });
            }
        }
        flush(&mut run, &mut out);
    }
    // Protocols without ports: one slot (see `PORT_PROTOCOL_OTHER`). `is_all` sets never
    // get here (they are `PEER_ALL`); a ClusterNetworkPolicy's default allow around a
    // denied port does.
    if set.allows_other_protocols() && !set.is_all() {
        out.push(other_protocols_entry());
    }
    out.sort();
    out
}

/// The entry that allows every protocol without ports in a port set.
fn other_protocols_entry() -> PortEntry {
    PortEntry { protocol: PORT_PROTOCOL_OTHER, port: 0, len: PORT_BLOCK_BITS as u8, bits: 1 }
}

/// Whether `protocol` carries ports the tables key on (TCP, UDP, SCTP); the kernel looks
/// every other protocol up in the `PORT_PROTOCOL_OTHER` slot.
pub fn has_ports(protocol: u8) -> bool {
    Protocol::ALL.iter().any(|p| p.number() == protocol)
}

/// The kernel's port lookup over a port set's entries (longest matching block prefix,
/// then the port's bit).
pub fn port_entries_allow(entries: &[PortEntry], protocol: u8, port: u16) -> bool {
    if !has_ports(protocol) {
        return entries.contains(&other_protocols_entry());
    }
    let shift = 16 - PORT_BLOCK_BITS;
    entries
        .iter()
        .filter(|e| e.protocol == protocol && (e.len == 0 || ((e.port ^ port) as u32 >> (16 - e.len as u32)) == 0))
        .max_by_key(|e| e.len)
        .is_some_and(|e| (e.bits >> (port as u32 & ((1 << shift) - 1))) & 1 != 0)
}

#[cfg(test)]
mod tests {
    use policy_model::{Flow, IpProtocol};

    use super::*;
    use crate::manifests::Manifests;

    /// The kernel's lookup over one direction's encoded entries: longest matching prefix,
    /// then the port (for a packet the node's stack sent, as the model's `allows`).
    fn encoded_allows(t: &PeerTable, direction: u32, remote: IpAddr, protocol: IpProtocol, port: u16) -> bool {
        let remote = encode_addr(remote);
        let best = peer_entries(t, direction).into_iter().filter(|(slot, _, _)| slot.contains(&remote)).max_by_key(|(slot, _, _)| slot.len);
        match best {
            Some((_, _, true)) | Some((_, Allow::All, _)) => true,
            None | Some((_, Allow::Nothing, _)) => false,
            Some((_, Allow::Ports(i), _)) => port_entries_allow(&port_set_entries(&t.port_sets[i]), protocol.0, port),
        }
    }

    /// The port set encoding answers as the set does, for ranges of every shape.
    #[test]
    fn port_set_entries_hold_exactly_the_set() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..300 {
            let mut set = PortSet::empty();
            for _ in 0..(next() % 6) {
                let proto = Protocol::ALL[(next() % 3) as usize];
                let start = (next() % 65536) as u16;
                let len = if case % 3 == 0 { next() % 70000 } else { next() % 300 } as u32;
                let end = (start as u32 + len).min(65535) as u16;
                set.insert(proto, PortRange { start, end });
            }
            let entries = port_set_entries(&set);
            let probes: Vec<u16> = (0..2000).map(|_| (next() % 65536) as u16).chain([0, 1, 63, 64, 65535]).collect();
            for proto in Protocol::ALL {
                for r in set.ranges(proto) {
                    for p in [r.start, r.end, r.start.saturating_sub(1), r.end.saturating_add(1)] {
                        let want = set.contains(policy_model::IpProtocol::from(proto), p);
                        assert_eq!(port_entries_allow(&entries, proto.number(), p), want, "{set} {proto}/{p}");
                    }
                }
                for &p in &probes {
                    let want = set.contains(policy_model::IpProtocol::from(proto), p);
                    assert_eq!(port_entries_allow(&entries, proto.number(), p), want, "{set} {proto}/{p}");
                }
            }
            assert_eq!(entries, port_set_entries(&set.clone()), "deterministic");
        }
        // Every odd port: one entry per block.
        let mut odd = PortSet::empty();
        for p in (1..=65535u16).step_by(2) {
            odd.insert(Protocol::Tcp, PortRange::single(p));
        }
        assert_eq!(port_set_entries(&odd).len(), 1024);
        assert_eq!(port_set_entries(&PortSet::range(Protocol::Udp, PortRange { start: 30000, end: 32767 })).len(), 5);
        assert_eq!(port_set_entries(&PortSet::protocol(Protocol::Sctp)).len(), 1);
    }

    fn state(egress: &str) -> policy_model::ClusterState {
        pods_and(&format!(
            r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: p, namespace: z}}
spec:
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Egress]
  egress: {egress}
"#
        ))
    }

    /// Pods z/a and z/b (both families), then `more` (YAML documents).
    fn pods_and(more: &str) -> policy_model::ClusterState {
        let mut m = Manifests::default();
        m.add_yaml(
            "t",
            &format!(
                r#"
apiVersion: v1
kind: Pod
metadata: {{name: a, namespace: z, labels: {{pod: a}}}}
spec: {{nodeName: n1, containers: [{{name: c, ports: [{{containerPort: 80}}]}}]}}
status: {{phase: Running, podIPs: [{{ip: 10.244.0.10}}, {{ip: "fd10:244::a"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: b, namespace: z, labels: {{pod: b}}}}
spec: {{nodeName: n1, containers: [{{name: c, ports: [{{containerPort: 80}}]}}]}}
status: {{phase: Running, podIPs: [{{ip: 10.244.0.11}}, {{ip: "fd10:244::b"}}]}}
{more}"#
            ),
        );
        let (state, errors) = m.state();
        assert!(errors.is_empty(), "{errors:?}");
        state
    }

    /// A ClusterNetworkPolicy that denies one port leaves protocols without ports (ICMP) to
    /// the default allow: the port set allows them without being `all`, and the encoding
    /// must carry that to the kernel (`PORT_PROTOCOL_OTHER`), while a NetworkPolicy's port
    /// rule still allows no ICMP.
    #[test]
    fn compiled_decisions_on_protocols_without_ports_reach_the_entries() {
        let cnp: policy_model::cnp::ClusterNetworkPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "deny-80"},
            "spec": {"tier": "Admin", "priority": 5,
                "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}},
                "egress": [{"name": "no-80", "action": "Deny",
                    "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}}],
                    "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]}
        }))
        .unwrap();
        let with_np = r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: z}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress: [{ports: [{port: 81, protocol: UDP}]}]
"#;
        for (more, with_cnp) in [("", true), (with_np, true), (with_np, false)] {
            let mut state = pods_and(more);
            if with_cnp {
                state.upsert_cluster_policy(policy_model::cnp::ClusterPolicy::from_manifest(&cnp).unwrap());
            }
            let a = state.pods().find(|p| &*p.key.name == "a").unwrap();
            let b = state.pods().find(|p| &*p.key.name == "b").unwrap();
            let tables = policy_model::compile_pod(&state, a);
            let mut icmp_allowed = 0;
            for (src, dst) in state.owned_ips(a).zip(state.owned_ips(b)) {
                let icmp = if src.is_ipv4() { IpProtocol::ICMP } else { IpProtocol::ICMPV6 };
                for (protocol, port) in
                    [(IpProtocol::TCP, 80), (IpProtocol::UDP, 81), (IpProtocol::TCP, 81), (icmp, 0), (IpProtocol(47), 0)]
                {
                    let flow = Flow { src, dst, protocol, port };
                    let want = policy_model::verdict(&state, &flow).allowed;
                    let got = encoded_allows(&tables.egress, policy_ebpf::DIRECTION_EGRESS, dst, protocol, port);
                    assert_eq!(got, want, "cnp {with_cnp}, np {}: {src} -> {dst} {}/{port}", !more.is_empty(), protocol.0);
                    icmp_allowed += usize::from(want && protocol == icmp);
                }
            }
            // The case this guards: ICMP allowed through a port set (not `PEER_ALL`).
            assert_eq!(icmp_allowed, if more.is_empty() { 2 } else { 0 }, "np {}", !more.is_empty());
        }
        // The slot itself: present iff the set allows port-less protocols without `all`.
        let mut set = PortSet::other_protocols();
        set.insert(Protocol::Tcp, PortRange::single(80));
        assert!(port_entries_allow(&port_set_entries(&set), 1, 0));
        assert!(port_entries_allow(&port_set_entries(&set), 6, 80));
        assert!(!port_entries_allow(&port_set_entries(&set), 6, 81));
        assert!(!port_entries_allow(&port_set_entries(&PortSet::range(Protocol::Tcp, PortRange::single(80))), 1, 0));
        assert!(!port_set_entries(&PortSet::all()).iter().any(|e| e.protocol == PORT_PROTOCOL_OTHER), "all is PEER_ALL, not a slot");
    }

    /// The encoded entries decide as the reference evaluator does, for both families, with
    /// IPv6 blocks that cover or sit inside the IPv4-mapped block.
    #[test]
    fn an_ipv6_block_never_matches_ipv4_traffic() {
        for egress in [
            r#"[{to: [{ipBlock: {cidr: "::/0"}}]}]"#,
            r#"[{to: [{ipBlock: {cidr: "::/64"}}]}, {to: [{podSelector: {}}], ports: [{port: 80}]}]"#,
            r#"[{to: [{ipBlock: {cidr: "::ffff:0:0/96"}}]}]"#,
            r#"[{to: [{ipBlock: {cidr: "::ffff:10.244.0.0/120"}}]}]"#,
            r#"[{to: [{ipBlock: {cidr: "::/0"}}, {ipBlock: {cidr: "0.0.0.0/0", except: ["10.244.0.11/32"]}}]}]"#,
            r#"[{to: [{ipBlock: {cidr: "::/0"}}, {ipBlock: {cidr: "10.244.0.0/24"}}]}]"#,
        ] {
            let state = state(egress);
            let a = state.pods().find(|p| &*p.key.name == "a").unwrap();
            let b = state.pods().find(|p| &*p.key.name == "b").unwrap();
            let tables = policy_model::compile_pod(&state, a);
            for (src, dst) in state.owned_ips(a).zip(state.owned_ips(b)) {
                for (protocol, port) in [(Protocol::Tcp, 80), (Protocol::Udp, 81)] {
                    let flow = Flow { src, dst, protocol: IpProtocol::from(protocol), port };
                    let want = policy_model::verdict(&state, &flow).allowed;
                    let got = encoded_allows(&tables.egress, policy_ebpf::DIRECTION_EGRESS, dst, IpProtocol::from(protocol), port);
                    assert_eq!(got, want, "{egress}: {src} -> {dst} {protocol}/{port}");
                }
            }
        }
    }
}
