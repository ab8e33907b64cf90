//! The maps in memory, with the kernel's lookups: [`MapSync`](super::MapSync) runs against
//! it in tests (every intermediate state checked) and in the write-count benchmark.

use std::collections::HashMap;
use std::net::IpAddr;

use policy_ebpf::{
    ENDPOINT_FAIL_CLOSED, EndpointValue, IfaceValue, PEER_ALL, PEER_OWN_NODE, PORT_BLOCK_BITS, PORT_PROTOCOL_OTHER, PeerValue, PortBits,
};

use super::encode::{PeerSlot, PortEntry, encode_addr, has_ports};
use super::loader::MapSizes;
use super::sync::{Maps, WriteError};

/// In-memory `ENDPOINTS`, `IFACES`, `PEERS` and `PORTS`, as full as the kernel's would be
/// (`sizes` apply), counting writes.
#[derive(Debug, Clone, Default)]
pub struct ModelMaps {
    pub sizes: MapSizes,
    pub endpoints: HashMap<IpAddr, EndpointValue>,
    pub ifaces: HashMap<u32, IfaceValue>,
    pub peers: HashMap<(u32, PeerSlot), PeerValue>,
    /// (set, protocol, block port, length) → bitmap.
    pub ports: HashMap<(u32, u8, u16, u8), PortBits>,
    /// `PEERS`/`PORTS` writes and deletes, and endpoint writes, since creation.
    pub writes: usize,
    pub deletes: usize,
    pub endpoint_writes: usize,
    /// Writes refused because a map was full.
    pub full_errors: usize,
}

impl ModelMaps {
    pub fn new(sizes: MapSizes) -> ModelMaps {
        ModelMaps { sizes, ..ModelMaps::default() }
    }

    /// The kernel's verdict (`verdict::judge`) for endpoint `ep` in `direction` (an audit
    /// table's for `DIRECTION_AUDIT_*`), for a packet the node's stack sent if `remote` is
    /// a node address.
    pub fn allows(&self, ep: &EndpointValue, direction: u32, remote: IpAddr, protocol: u8, port: u16) -> bool {
        self.allows_from(ep, direction, remote, protocol, port, true)
    }

    /// [`Self::allows`]; `node_stack`: the node's own stack sent the packet (what a
    /// `PEER_OWN_NODE` entry exempts).
    pub fn allows_from(&self, ep: &EndpointValue, direction: u32, remote: IpAddr, protocol: u8, port: u16, node_stack: bool) -> bool {
        if ep.flags & ENDPOINT_FAIL_CLOSED != 0 {
            return false;
        }
        if ep.flags & super::sync::isolation_bit(direction) == 0 {
            return true;
        }
        let remote = encode_addr(remote);
        let best = self
            .peers
            .iter()
            .filter(|((id, slot), _)| *id == ep.id && slot.direction == direction && slot.contains(&remote))
            .max_by_key(|((_, slot), _)| slot.len);
        let Some((_, v)) = best else { return false };
        if v.flags & PEER_ALL != 0 || (node_stack && v.flags & PEER_OWN_NODE != 0) {
            return true;
        }
        if !has_ports(protocol) {
            // The kernel's `PORT_PROTOCOL_OTHER` slot, bit 0.
            return self.ports.get(&(v.port_set, PORT_PROTOCOL_OTHER, 0, PORT_BLOCK_BITS as u8)).is_some_and(|bits| bits & 1 != 0);
        }
        let shift = 16 - PORT_BLOCK_BITS;
        let block = port >> shift << shift;
        (0..=PORT_BLOCK_BITS as u8)
            .rev()
            .find_map(|len| {
                let masked = if len == 0 { 0 } else { block >> (16 - len as u32) << (16 - len as u32) };
                self.ports.get(&(v.port_set, protocol, masked, len))
            })
            .is_some_and(|bits| (bits >> (port & ((1 << shift) - 1))) & 1 != 0)
    }

    /// The endpoint entry of an address.
    pub fn endpoint(&self, addr: IpAddr) -> Option<EndpointValue> {
        self.endpoints.get(&addr).copied()
    }

    fn full(map: &str) -> WriteError {
        WriteError { full: true, message: format!("the map is full ({map})") }
    }
}

impl Maps for ModelMaps {
    fn sizes(&self) -> MapSizes {
        self.sizes
    }
    fn put_peer(&mut self, endpoint: u32, slot: &PeerSlot, value: PeerValue) -> Result<(), WriteError> {
        if !self.peers.contains_key(&(endpoint, *slot)) && self.peers.len() >= self.sizes.peer_entries as usize {
            self.full_errors += 1;
            return Err(ModelMaps::full("PEERS"));
        }
        self.peers.insert((endpoint, *slot), value);
        self.writes += 1;
        Ok(())
    }
    fn del_peer(&mut self, endpoint: u32, slot: &PeerSlot) -> Result<(), WriteError> {
        self.deletes += 1;
        self.peers.remove(&(endpoint, *slot)).map(|_| ()).ok_or(WriteError { full: false, message: "no such entry".into() })
    }
    fn put_port(&mut self, set: u32, e: &PortEntry) -> Result<(), WriteError> {
        let key = (set, e.protocol, e.port, e.len);
        if !self.ports.contains_key(&key) && self.ports.len() >= self.sizes.port_entries as usize {
            self.full_errors += 1;
            return Err(ModelMaps::full("PORTS"));
        }
        self.ports.insert(key, e.bits);
        self.writes += 1;
        Ok(())
    }
    fn del_port(&mut self, set: u32, e: &PortEntry) -> Result<(), WriteError> {
        self.deletes += 1;
        self.ports.remove(&(set, e.protocol, e.port, e.len)).map(|_| ()).ok_or(WriteError { full: false, message: "no such entry".into() })
    }
    fn put_endpoint(&mut self, addr: IpAddr, value: EndpointValue) -> Result<(), WriteError> {
        if !self.endpoints.contains_key(&addr) && self.endpoints.len() >= self.sizes.endpoint_addresses as usize {
            self.full_errors += 1;
            return Err(ModelMaps::full("ENDPOINTS"));
        }
        self.endpoints.insert(addr, value);
        self.endpoint_writes += 1;
        Ok(())
    }
    fn del_endpoint(&mut self, addr: IpAddr) {
        self.endpoints.remove(&addr);
    }
    fn set_iface(&mut self, ifindex: u32, value: IfaceValue) -> Result<(), WriteError> {
        if value.ifindex == 0 {
            self.ifaces.remove(&ifindex);
        } else {
            self.ifaces.insert(ifindex, value);
        }
        Ok(())
    }
    fn read_endpoints(&self) -> Vec<(IpAddr, EndpointValue)> {
        self.endpoints.iter().map(|(a, v)| (*a, *v)).collect()
    }
    fn read_peers(&self) -> Vec<(u32, PeerSlot, PeerValue)> {
        self.peers.iter().map(|((id, s), v)| (*id, *s, *v)).collect()
    }
    fn read_ports(&self) -> Vec<(u32, PortEntry)> {
        self.ports
            .iter()
            .map(|((set, protocol, port, len), bits)| (*set, PortEntry { protocol: *protocol, port: *port, len: *len, bits: *bits }))
            .collect()
    }
    fn read_ifaces(&self) -> Vec<IfaceValue> {
        self.ifaces.values().copied().collect()
    }
}
