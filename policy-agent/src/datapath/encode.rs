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

/// `PEERS` entries of one direction's table.
pub fn peer_entries(t: &PeerTable, endpoint: u32, revision: u32, direction: u32) -> Vec<(Key<PeerKey>, PeerValue)> {
    let table = table_id(revision, direction);
    t.entries
        .iter()
        .map(|e| {
            let (addr, len) = encode_prefix(&e.prefix);
            let set = t.port_set(e);
            let value = PeerValue { port_set: e.port_set, flags: if set.is_all() { PEER_ALL } else { 0 } };
            (Key::new(PEER_KEY_FIXED_BITS + len, PeerKey { endpoint, table, addr }), value)
        })
        .collect()
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
