//! Compiled tables → map entries (see `policy-ebpf`'s module doc for the encoding).

use std::net::IpAddr;

use aya::maps::lpm_trie::Key;
use policy_ebpf::{
    Addr, DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, PEER_ALL, PEER_KEY_FIXED_BITS,
    PORT_KEY_FIXED_BITS, PeerKey, PeerValue, PortKey, table_id,
};
use policy_model::{EndpointTables, Family, PeerTable, Prefix, Protocol};

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

fn protocol_number(p: Protocol) -> u8 {
    p.number()
}

/// A `PORTS` set id no key is written for (ids written are indexes into the table's
/// port sets): a `PEERS` entry with it and no `PEER_ALL` allows nothing.
const NO_PORTS: u32 = u32::MAX;

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
pub fn peer_entries(t: &PeerTable, endpoint: u32, revision: u32, direction: u32) -> Vec<(Key<PeerKey>, PeerValue)> {
    let table = table_id(revision, direction);
    let mapped = ipv4_mapped_block();
    let v6 = |p: &Prefix| p.family() == Family::Ipv6;
    let mut out: Vec<(Key<PeerKey>, PeerValue)> = t
        .entries
        .iter()
        .filter(|e| !(v6(&e.prefix) && mapped.contains(&e.prefix)))
        .map(|e| {
            let (addr, len) = encode_prefix(&e.prefix);
            let set = t.port_set(e);
            let value = PeerValue { port_set: e.port_set, flags: if set.is_all() { PEER_ALL } else { 0 } };
            (Key::new(PEER_KEY_FIXED_BITS + len, PeerKey { endpoint, table, addr }), value)
        })
        .collect();
    let v6_covers_v4 = t.entries.iter().any(|e| v6(&e.prefix) && e.prefix.len() < mapped.len() && e.prefix.contains(&mapped));
    let v4_everything = t.entries.iter().any(|e| e.prefix.family() == Family::Ipv4 && e.prefix.len() == 0);
    if v6_covers_v4 && !v4_everything {
        let (addr, len) = encode_prefix(&mapped);
        out.push((Key::new(PEER_KEY_FIXED_BITS + len, PeerKey { endpoint, table, addr }), PeerValue { port_set: NO_PORTS, flags: 0 }));
    }
    out
}

/// `PORTS` entries of one direction's port sets: each range as port prefixes.
pub fn port_entries(t: &PeerTable, endpoint: u32, revision: u32, direction: u32) -> Vec<Key<PortKey>> {
    let table = table_id(revision, direction);
    let mut out = Vec::new();
    for (id, set) in t.port_sets.iter().enumerate() {
        if set.is_all() {
            continue;
        }
        for proto in Protocol::ALL {
            for range in set.ranges(proto) {
                for (port, len) in range.to_prefixes() {
                    out.push(Key::new(
                        PORT_KEY_FIXED_BITS + len as u32,
                        PortKey {
                            endpoint,
                            table,
                            port_set: id as u32,
                            protocol: protocol_number(proto),
                            _pad: 0,
                            port: port.to_be_bytes(),
                        },
                    ));
                }
            }
        }
    }
    out
}

/// Everything one revision of an endpoint writes.
pub struct EncodedTables {
    pub flags: u32,
    pub peers: Vec<(Key<PeerKey>, PeerValue)>,
    pub ports: Vec<Key<PortKey>>,
}

impl EncodedTables {
    pub fn new(t: &EndpointTables, endpoint: u32, revision: u32) -> EncodedTables {
        let mut flags = 0;
        let mut peers = Vec::new();
        let mut ports = Vec::new();
        for (table, dir, bit) in
            [(&t.ingress, DIRECTION_INGRESS, ENDPOINT_INGRESS_ISOLATED), (&t.egress, DIRECTION_EGRESS, ENDPOINT_EGRESS_ISOLATED)]
        {
            if table.isolated {
                flags |= bit;
                peers.extend(peer_entries(table, endpoint, revision, dir));
                ports.extend(port_entries(table, endpoint, revision, dir));
            }
        }
        EncodedTables { flags, peers, ports }
    }
}

#[cfg(test)]
mod tests {
    use policy_model::{Flow, IpProtocol};

    use super::*;
    use crate::manifests::Manifests;

    /// The kernel's lookup over encoded entries: longest matching prefix, then the port.
    fn encoded_allows(enc: &EncodedTables, direction: u32, remote: IpAddr, protocol: Protocol, port: u16) -> bool {
        let bits = |a: &Addr| u128::from_be_bytes(a.0);
        let remote = bits(&encode_addr(remote));
        let best = enc
            .peers
            .iter()
            .filter(|(k, _)| k.data().table & 1 == direction)
            .filter(|(k, _)| {
                let len = k.prefix_len() - PEER_KEY_FIXED_BITS;
                len == 0 || (bits(&k.data().addr) ^ remote) >> (128 - len) == 0
            })
            .max_by_key(|(k, _)| k.prefix_len());
        let Some((_, v)) = best else { return false };
        v.flags & PEER_ALL != 0
            || enc.ports.iter().any(|k| {
                let d = k.data();
                let len = k.prefix_len() - PORT_KEY_FIXED_BITS;
                d.table & 1 == direction
                    && d.port_set == v.port_set
                    && d.protocol == protocol.number()
                    && (len == 0 || (u16::from_be_bytes(d.port) ^ port) >> (16 - len) == 0)
            })
    }

    fn state(egress: &str) -> policy_model::ClusterState {
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
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: p, namespace: z}}
spec:
  podSelector: {{matchLabels: {{pod: a}}}}
  policyTypes: [Egress]
  egress: {egress}
"#
            ),
        );
        let (state, errors) = m.state();
        assert!(errors.is_empty(), "{errors:?}");
        state
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
            let enc = EncodedTables::new(&policy_model::compile_pod(&state, a), 1, 1);
            for (src, dst) in state.owned_ips(a).zip(state.owned_ips(b)) {
                for (protocol, port) in [(Protocol::Tcp, 80), (Protocol::Udp, 81)] {
                    let flow = Flow { src, dst, protocol: IpProtocol::from(protocol), port };
                    let want = policy_model::verdict(&state, &flow).allowed;
                    let got = encoded_allows(&enc, DIRECTION_EGRESS, dst, protocol, port);
                    assert_eq!(got, want, "{egress}: {src} -> {dst} {protocol}/{port}");
                }
            }
        }
    }
}
