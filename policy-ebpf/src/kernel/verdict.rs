//! The table lookups: at most two per new flow (peer prefix, then port), whatever the
//! number of rules, and none for a judgment this CPU made in the current clock tick
//! (`JudgmentSlot`).

use aya_ebpf::maps::lpm_trie::Key;
use policy_ebpf::*;

use super::{COUNTERS, PEERS, PORTS, same_addr, tick};

/// A judgment this CPU's programs made from an endpoint's tables in the current clock
/// tick (`bpf_jiffies64`), and what it was of. A later judgment in the same tick, on this
/// CPU, of the same endpoint (id, interface and flags) under the same revision, with the
/// same remote, protocol, port and node exemption, takes it instead of the two table
/// lookups: that is what they would answer, since the agent bumps the revision once a
/// change of the tables is complete (while a change runs, the tables themselves give
/// each address its old or its new answer, and this one is the old). The tables are
/// large and a new flow finds them cold on real traffic: the lookups are about a quarter
/// of the programs' time on short connections. The tick bounds how long a judgment is
/// kept whatever happens to the endpoint (an id and revision given to a new pod come
/// with another interface too).
///
/// Kept in `Scratch` (per CPU, not pinned: a new load starts with none, and the pinned
/// maps' layout is untouched).
#[repr(C)]
pub struct JudgmentSlot {
    remote: Addr,
    tick: u64,
    id: u32,
    revision: u32,
    ifindex: u32,
    flags: u32,
    /// Direction, protocol, port and the two booleans, in one word (see `what`).
    what: u64,
    port_set: u32,
    allowed: u8,
    decided: u8,
    _pad: [u8; 2],
}

/// Judgments per CPU: a power of two (the index is the top bits of a hash).
const JUDGMENT_SLOT_BITS: u32 = 6;
pub const JUDGMENT_SLOTS: usize = 1 << JUDGMENT_SLOT_BITS;

/// This CPU's kept judgments (`Scratch::judgments`).
pub type Kept = [JudgmentSlot; JUDGMENT_SLOTS];

/// A table's answer for one new flow, and what in the table gave it (for flow events).
#[derive(Clone, Copy)]
pub struct Judgment {
    pub allowed: bool,
    /// `FLOW_DECIDED_*`.
    pub decided: u8,
    /// The matched `PEERS` entry's port set, with `FLOW_DECIDED_PORTS`/`_PORT_DENIED`.
    pub port_set: u32,
}

#[inline(always)]
fn judgment(allowed: bool, decided: u8, port_set: u32) -> Judgment {
    Judgment { allowed, decided, port_set }
}

/// The judgment that needs no table: a fail-closed endpoint, or a direction that is not
/// isolated.
#[inline(always)]
fn without_tables(ep: &EndpointValue, direction: u32) -> Option<Judgment> {
    if ep.flags & ENDPOINT_FAIL_CLOSED != 0 {
        return Some(judgment(false, FLOW_DECIDED_FAIL_CLOSED, 0));
    }
    // `direction` is a constant at every call: the compiler keeps one branch.
    let isolated = match direction {
        DIRECTION_INGRESS => ENDPOINT_INGRESS_ISOLATED,
        DIRECTION_EGRESS => ENDPOINT_EGRESS_ISOLATED,
        DIRECTION_AUDIT_INGRESS => ENDPOINT_AUDIT_INGRESS,
        _ => ENDPOINT_AUDIT_EGRESS,
    };
    if ep.flags & isolated == 0 {
        return Some(judgment(true, FLOW_DECIDED_NOT_ISOLATED, 0));
    }
    None
}

/// Whether endpoint `ep`'s tables allow traffic with `remote` on the other side, in
/// `direction` (`DIRECTION_AUDIT_*`: its audit table, which a clear `ENDPOINT_AUDIT_*`
/// flag makes allow everything), for `protocol`/`port` (`has_ports` false: a protocol without ports,
/// allowed by "all traffic" entries and by port sets with the `PORT_PROTOCOL_OTHER` slot),
/// and what in the table decided. `node_stack`: the node's own stack sent the packet,
/// which a `PEER_OWN_NODE` entry exempts (false for every egress judgment).
///
/// Takes a judgment kept in `kept` (see `JudgmentSlot`) when one matches, and keeps the one
/// it makes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn judge(
    kept: &mut Kept,
    ep: &EndpointValue,
    direction: u32,
    remote: &Addr,
    protocol: u8,
    port: u16,
    has_ports: bool,
    node_stack: bool,
) -> Judgment {
    if let Some(j) = without_tables(ep, direction) {
        return j;
    }
    let what = (direction as u64) << 32 | (protocol as u64) << 24 | (port as u64) << 8 | (has_ports as u64) << 1 | node_stack as u64;
    // SAFETY: `Addr` is 16 bytes with 8-byte alignment, so it reads as two u64s.
    let a = unsafe { *(remote as *const Addr as *const [u64; 2]) };
    let h = (a[0] ^ a[1] ^ what ^ (ep.id as u64) << 40).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let slot = &mut kept[(h >> (64 - JUDGMENT_SLOT_BITS)) as usize];
    let tick = tick();
    if slot.tick == tick
        && slot.what == what
        && slot.id == ep.id
        && slot.revision == ep.revision
        && slot.ifindex == ep.ifindex
        && slot.flags == ep.flags
        && same_addr(&slot.remote, remote)
    {
        return judgment(slot.allowed != 0, slot.decided, slot.port_set);
    }
    let j = look_up(ep, direction, remote, protocol, port, has_ports, node_stack);
    slot.remote = *remote;
    slot.what = what;
    slot.id = ep.id;
    slot.revision = ep.revision;
    slot.ifindex = ep.ifindex;
    slot.flags = ep.flags;
    slot.port_set = j.port_set;
    slot.allowed = j.allowed as u8;
    slot.decided = j.decided;
    slot.tick = tick;
    j
}

/// `judge` without kept judgments: for the rare judgments (an audit table, a fail-closed
/// endpoint's event) that should not take the slots of the common ones.
#[inline(always)]
pub fn judge_tables(ep: &EndpointValue, direction: u32, remote: &Addr, protocol: u8, port: u16, has_ports: bool, node_stack: bool) -> Judgment {
    match without_tables(ep, direction) {
        Some(j) => j,
        None => look_up(ep, direction, remote, protocol, port, has_ports, node_stack),
    }
}

/// `judge`'s answer from the tables (`PEERS`, then `PORTS`), for an isolated direction of
/// an endpoint that is not fail-closed.
#[inline(always)]
fn look_up(ep: &EndpointValue, direction: u32, remote: &Addr, protocol: u8, port: u16, has_ports: bool, node_stack: bool) -> Judgment {
    let key = Key::new(PEER_KEY_FIXED_BITS + 128, PeerKey { endpoint: ep.id, direction, addr: *remote });
    let (port_set, flags) = match PEERS.get(&key) {
        Some(v) => (v.port_set, v.flags),
        None => return judgment(false, FLOW_DECIDED_NO_PEER, 0),
    };
    if flags & PEER_ALL != 0 || (node_stack && flags & PEER_OWN_NODE != 0) {
        return judgment(true, FLOW_DECIDED_PEER_ALL, 0);
    }
    if port_set == NO_PORT_SET {
        // An entry that allows nothing (an except hole, a node address no rule admits):
        // no rule allows this peer, whatever the port.
        return judgment(false, FLOW_DECIDED_NO_PEER, 0);
    }
    let allowed = if !has_ports {
        // Protocols without ports share one slot of the port set (see
        // `PORT_PROTOCOL_OTHER`): allowed only where a compiled decision says so.
        let key =
            Key::new(PORT_KEY_FIXED_BITS + PORT_BLOCK_BITS, PortKey { port_set, protocol: PORT_PROTOCOL_OTHER, _pad: 0, port: [0, 0] });
        matches!(PORTS.get(&key), Some(bits) if *bits & 1 != 0)
    } else {
        // The port's block (its top bits) is the key; the value is the block's bitmap.
        let block = port & !((PORT_BLOCK_SIZE - 1) as u16);
        let key = Key::new(PORT_KEY_FIXED_BITS + PORT_BLOCK_BITS, PortKey { port_set, protocol, _pad: 0, port: block.to_be_bytes() });
        match PORTS.get(&key) {
            Some(bits) => (*bits >> (port as u32 & (PORT_BLOCK_SIZE - 1))) & 1 != 0,
            None => false,
        }
    };
    judgment(allowed, if allowed { FLOW_DECIDED_PORTS } else { FLOW_DECIDED_PORT_DENIED }, port_set)
}

/// Adds a packet to the endpoint's per-CPU counters.
#[inline(always)]
pub fn count(ep: &EndpointValue, direction: u32, allowed: bool, bytes: u32) {
    let index = ep.id.wrapping_mul(2).wrapping_add(direction);
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot: no other CPU writes it, and this program is not
        // re-entered on this CPU while it runs.
        let c = unsafe { &mut *c };
        if allowed {
            c.allowed_packets += 1;
            c.allowed_bytes += bytes as u64;
        } else {
            c.denied_packets += 1;
            c.denied_bytes += bytes as u64;
        }
    }
}
