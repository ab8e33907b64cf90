//! The three classifiers and the maps they share with the agent.
//!
//! - `pod_egress` (tc ingress of a pod's host veth): anti-spoofing, then the pod's egress.
//!   A destination in `SERVICES` is judged after DNAT, by the hook that sees the backend.
//! - `pod_ingress` (tc egress of a pod's host veth): the pod's ingress, and the egress of a
//!   local source whose judgment waited for DNAT.
//! - `node_egress` (tc egress of the node's other devices): the post-DNAT egress judgment
//!   of Service traffic from local pods that leaves the node.
//! - `node_ingress` (tc ingress of the same devices): notes where each arriving packet
//!   that may open a flow came from, before netfilter translates it, so that
//!   `pod_ingress` judges a NodePort or LoadBalancer client by its own address, not the
//!   node's that kube-proxy's masquerade gave it (see `Arrival`).
//!
//! Connection tracking records, per flow, under which revision each local end approved it,
//! so replies pass, established packets skip the tables, and a policy change makes the
//! next packet of an existing flow be judged again. Each CPU also keeps a record of the
//! flows it found there in the current clock tick (`FlowSlot`), so most established
//! packets skip the connection-tracking lookup too.

mod fast;
mod flow;
mod packet;
mod verdict;

use aya_ebpf::Global;
use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray};
use aya_ebpf::programs::TcContext;
use policy_ebpf::*;

use fast::Probe;
use packet::{L4, PROTO_TCP, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ct_key, parse, put, put_words, zero_addr, zero_bytes};
use verdict::{Kept, count, judge, judge_tables};

#[map(name = "PA_ENDPOINTS")]
static ENDPOINTS: HashMap<EndpointKey, EndpointValue> = HashMap::pinned(DEFAULT_MAX_ENDPOINT_ADDRESSES, 0);
#[map(name = "PA_IFACES")]
static IFACES: Array<IfaceValue> = Array::pinned(DEFAULT_MAX_IFINDEX, 0);
#[map(name = "PA_PEERS")]
static PEERS: LpmTrie<PeerKey, PeerValue> = LpmTrie::pinned(DEFAULT_MAX_PEER_ENTRIES, 0);
#[map(name = "PA_PORTS")]
static PORTS: LpmTrie<PortKey, PortBits> = LpmTrie::pinned(DEFAULT_MAX_PORT_ENTRIES, 0);
#[map(name = "PA_CONNTRACK")]
static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(DEFAULT_MAX_CONNTRACK, 0);
/// The connection tracking of the maps a migration leaves (`PA_PREV_CT` set): an agent
/// that cannot share the previous programs' connection tracking (another size) gives its
/// programs that map too while the links are swapped one by one, so a flow that one
/// build's hook starts is known to the other build's hook on the same path. Unused (and
/// never read) otherwise.
#[map(name = "PA_CONNTRACK_PREV")]
static CONNTRACK_PREV: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(1, 0);
/// Set at load (read-only to the programs, so the verifier drops the unused branches):
/// 1 while a migration swaps links from programs with another connection tracking map.
#[unsafe(no_mangle)]
static PA_PREV_CT: Global<u8> = Global::new(0);

#[map(name = "PA_PENDING")]
static PENDING: LruHashMap<PendingKey, CtKey> = LruHashMap::pinned(DEFAULT_MAX_PENDING, 0);
#[map(name = "PA_SERVICES")]
static SERVICES: LpmTrie<Addr, u32> = LpmTrie::pinned(DEFAULT_MAX_SERVICES, 0);
#[map(name = "PA_COUNTERS")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(DEFAULT_MAX_ENDPOINTS * 2, 0);

/// Per-CPU working space: the BPF stack (512 bytes) cannot hold these beside the lookup
/// keys. A program run never nests on one CPU, so one slot per CPU suffices.
#[repr(C)]
pub struct Scratch {
    packet: Packet,
    /// The packet's flow.
    key: CtKey,
    /// An ICMP error's quoted flow; the pre-DNAT flow of a deferred judgment.
    other: CtKey,
    value: CtValue,
    /// Recently confirmed flows of this CPU (see `FlowSlot`).
    flows: [FlowSlot; FLOW_SLOTS],
    /// Judgments made in this tick (see `verdict::JudgmentSlot`).
    judgments: Kept,
    /// Left by `node_ingress` for `pod_ingress` (see `Arrival`).
    arrival: Arrival,
}

/// Where a packet that arrived at the node came from, as `node_ingress` saw it before
/// netfilter's DNAT (NodePort, LoadBalancer, externalIPs) and masquerade. The skb is one
/// object from the node device's tc ingress to the pod veth's tc egress, and that path
/// (receive, PREROUTING, forwarding, POSTROUTING, transmit) runs in one softirq on one
/// CPU, so `pod_ingress` finds this record on its CPU moments later. `node_ingress` tags
/// the skb (`tc_index`, which no qdisc of this kernel uses) with the record's `tag`, so a
/// record is only ever used for the packet it describes: any other packet (another
/// path, or one that came before) carries another tag, or none, and is judged by its
/// own source.
#[repr(C)]
pub struct Arrival {
    src: Addr,
    sport: u16,
    protocol: u8,
    _pad: u8,
    /// The tag written to the skb's `tc_index`: never 0.
    tag: u32,
    /// Counts records, for the next tag.
    seq: u32,
    _pad2: u32,
    /// `now()` when written.
    now: u64,
}

/// How old an `Arrival` may be when `pod_ingress` reads it (the same softirq: far less).
const ARRIVAL_MAX_AGE_NS: u64 = 100_000_000;

/// A flow that a hook of this CPU found in connection tracking during the current clock
/// tick (`bpf_jiffies64`): the entry's approvals as they were then. A later packet of the
/// flow in the same tick, on this CPU, at either end's hook, passes on this record without
/// the connection-tracking lookup if it shows that end's side approved under the end's
/// current revision (read afresh from `IFACES` for every packet: a policy change still
/// cuts the flow at its next packet). That is what the lookup would answer: an approval
/// only ends with a revision change, and an entry confirmed fresh in this tick has at
/// most the rest of the tick left past its timeout (the shortest, after a reset, is a
/// second). What a hit skips is only the lookup and the entry's refresh (which the first
/// packet of each tick does), never a change to the entry: a SYN without ACK always takes
/// the lookup, and so does a FIN or RST that the record does not hold yet (see `cached`);
/// a lookup that finds no usable entry, or an approval denied, clears the record. A
/// change to the entry that this CPU's hooks do not make through `tracked` (another
/// CPU's packet reusing the ports for a new connection, an entry evicted by any CPU's
/// insert, the agent's writes during a migration) is missed by the record for the rest
/// of its tick: for that tick the flow's non-SYN packets pass as the previous entry
/// passed them. Every packet is one program run on one CPU and
/// programs do not nest, so a record is written and read by one run at a time.
///
/// One cache line; `FLOW_SLOTS` of them per CPU, indexed by a hash of the key, so a
/// packet between two pods of this node (both hooks run on one CPU, one right after the
/// other) crosses its second hook on the record its first hook left, and a busy flow
/// looks its entry up once per tick per CPU.
#[repr(C)]
pub struct FlowSlot {
    key: CtKey,
    src_rev: u32,
    dst_rev: u32,
    /// The entry's `CT_*` flags (`CT_ORIG_IS_LO` tells the roles).
    flags: u16,
    _pad: [u8; 6],
    /// The tick it was written in; a past tick: no record.
    tick: u64,
}

/// Records per CPU: a power of two (the index is the top bits of a hash), and the whole
/// `Scratch` must stay within a per-CPU value's 32 KiB.
const FLOW_SLOT_BITS: u32 = 8;
const FLOW_SLOTS: usize = 1 << FLOW_SLOT_BITS;

#[map(name = "PA_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn scratch() -> Result<&'static mut Scratch, ()> {
    let ptr = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: the slot of this CPU; programs do not nest on a CPU, so nothing else holds
    // a reference to it while this run uses it.
    Ok(unsafe { &mut *ptr })
}

/// How stale `last_seen_ns` may get before a packet refreshes it.
const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Marks the branch it is on as rare, so that LLVM lays its blocks out after the common
/// path's: a packet of an established flow then runs through fewer instruction-cache
/// lines, which on real traffic (the kernel's own code evicts ours between two packets)
/// are most of what a run costs.
#[inline(always)]
pub(crate) fn cold() {
    core::hint::cold_path()
}

/// Let the packet go on (and later tc programs, if any, see it).
const PASS: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT as i32;

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program; reading a
    // field of `__sk_buff` through it is what the verifier allows for tc programs.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn endpoint(addr: &Addr) -> Option<EndpointValue> {
    // SAFETY: the value is copied out at once; a concurrent update may at worst give a
    // torn read of a value the agent is replacing, which the revision check then rejects.
    unsafe { ENDPOINTS.get(&EndpointKey { addr: *addr }) }.copied()
}

#[inline(always)]
fn same_key(a: &CtKey, b: &CtKey) -> bool {
    // SAFETY: `CtKey` is 40 bytes with 8-byte alignment (`#[repr(C)]`, padding zeroed by
    // `ct_key`), so it reads as five u64s.
    let (x, y) = unsafe { (&*(a as *const CtKey as *const [u64; 5]), &*(b as *const CtKey as *const [u64; 5])) };
    x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4]
}

/// The index of `key`'s record in `Scratch::flows`: a multiplicative hash of its five
/// words, top bits.
#[inline(always)]
fn slot_index(key: &CtKey) -> usize {
    // SAFETY: as in `same_key`.
    let w = unsafe { &*(key as *const CtKey as *const [u64; 5]) };
    let h = (w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4]).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> (64 - FLOW_SLOT_BITS)) as usize
}

/// The clock tick (`jiffies`), which the verifier inlines as one load: the flow records'
/// clock.
#[inline(always)]
pub(crate) fn tick() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_jiffies64() }
}

/// Whether this CPU's record of the flow `key` (packet `p`, whose source is the key's
/// `lo` end iff `src_is_lo`) shows endpoint `ep`'s side approved under its current
/// revision, in tick `tick` (see `FlowSlot`), for a packet that would change nothing in
/// the entry: never a SYN without ACK (a new flow, or a port reused: `tracked` decides),
/// and a FIN or RST only once the record holds it (the entry has it: the first hook the
/// packet crossed recorded it, and the next hook's lookup would only find it there). So
/// a SYN-ACK, and a FIN or RST at its second hook, pass on the record too.
#[inline(always)]
fn cached(slot: &FlowSlot, key: &CtKey, tcp_flags: u8, ep: &EndpointValue, ep_is_src: bool, src_is_lo: bool, tick: u64) -> bool {
    if slot.tick != tick || tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN || !same_key(&slot.key, key) {
        return false;
    }
    let orig = (slot.flags & CT_ORIG_IS_LO != 0) == src_is_lo;
    let fin = if orig { CT_TCP_FIN_ORIG } else { CT_TCP_FIN_REPLY };
    if (tcp_flags & TCP_FIN != 0 && slot.flags & fin == 0) || (tcp_flags & TCP_RST != 0 && slot.flags & CT_TCP_RESET == 0) {
        return false;
    }
    // `ep` originated the flow iff it sends in the original direction or receives a reply.
    let approved = if ep_is_src == orig { slot.src_rev } else { slot.dst_rev };
    approved == ep.revision
}

/// Records the flow `key`'s entry `c` as confirmed in tick `tick`.
#[inline(always)]
fn remember(slot: &mut FlowSlot, key: &CtKey, c: &CtValue, tick: u64) {
    slot.key = *key;
    slot.src_rev = c.src_rev;
    slot.dst_rev = c.dst_rev;
    slot.flags = c.flags;
    slot.tick = tick;
}

/// Clears the record in `slot` (whichever flow it is of: the next packet of that flow
/// only takes the lookup).
#[inline(always)]
fn forget(slot: &mut FlowSlot, tick: u64) {
    slot.tick = tick.wrapping_sub(1);
}

#[inline(always)]
pub(crate) fn same_addr(a: &Addr, b: &Addr) -> bool {
    // SAFETY: `Addr` is 16 bytes with 8-byte alignment, so it reads as two u64s.
    let (x, y) = unsafe { (*(a as *const Addr as *const [u64; 2]), *(b as *const Addr as *const [u64; 2])) };
    x[0] == y[0] && x[1] == y[1]
}

/// The endpoint whose host-side veth is `ifindex`, if `addr` is one of its addresses
/// (`IFACES`, falling back to `ENDPOINTS`).
#[inline(always)]
fn endpoint_on(ifindex: u32, addr: &Addr) -> Option<EndpointValue> {
    if let Some(v) = IFACES.get(ifindex) {
        if v.ifindex == ifindex && ifindex != 0 {
            // A veth held fail-closed before its pod is known: everything is denied,
            // whatever the addresses.
            if v.flags & ENDPOINT_FAIL_CLOSED != 0 {
                cold();
                return Some(EndpointValue { id: v.id, revision: v.revision, ifindex, flags: ENDPOINT_FAIL_CLOSED });
            }
            let ours = (v.flags & IFACE_HAS_V4 != 0 && same_addr(addr, &v.v4)) || (v.flags & IFACE_HAS_V6 != 0 && same_addr(addr, &v.v6));
            return ours.then_some(EndpointValue { id: v.id, revision: v.revision, ifindex, flags: v.flags & 0xffff });
        }
    }
    cold();
    endpoint(addr).filter(|ep| ep.ifindex == ifindex)
}

/// The tracked flow `key`: ours, or, during a migration from another connection tracking
/// map, the previous programs' (used in place, so both builds see one entry).
#[inline(always)]
pub(crate) fn ct_entry(key: &CtKey) -> Option<*mut CtValue> {
    if let Some(ct) = CONNTRACK.get_ptr_mut(key) {
        return Some(ct);
    }
    if PA_PREV_CT.load() != 0 {
        return CONNTRACK_PREV.get_ptr_mut(key);
    }
    None
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn expired(ct: &CtValue, protocol: u8, now: u64) -> bool {
    let timeout = if protocol == PROTO_TCP {
        if ct.flags & CT_TCP_RESET != 0 {
            CT_TIMEOUT_TCP_RESET_NS
        } else if ct.flags & CT_TCP_CLOSING != 0 {
            CT_TIMEOUT_TCP_CLOSING_NS
        } else {
            CT_TIMEOUT_TCP_NS
        }
    } else {
        CT_TIMEOUT_OTHER_NS
    };
    now.saturating_sub(ct.last_seen_ns) > timeout
}

/// The side of a tracked flow that local endpoint `ep` holds, judged again if the
/// approval on record is not from `ep`'s current revision. `orig`: this packet travels in
/// the flow's original direction; `ep_is_src`: `ep` sent it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn established(
    ctx: &TcContext,
    kept: &mut Kept,
    c: &mut CtValue,
    key: &CtKey,
    p: &Packet,
    ep: &EndpointValue,
    ep_is_src: bool,
    orig: bool,
    now: u64,
    ifindex: u32,
) -> bool {
    // `ep` originated the flow iff it sends in the original direction or receives a reply.
    let ep_is_originator = ep_is_src == orig;
    let ok = if ep_is_originator {
        if c.src_rev == ep.revision || (c.src_rev == 0 && c.flags & CT_VIA_SERVICE != 0 && ep_is_src) {
            true
        } else {
            cold();
            // The originator's egress again, toward the backend it was judged against (or
            // the plain destination).
            // The reply of a Service flow that no hook judged after DNAT: judged here,
            // against the backend if the node's own stack is it (the `kubernetes`
            // Service's API server, a host-network pod: the reply's socket names it), else
            // against the Service address the reply shows.
            let unjudged_service_reply = c.flags & CT_VIA_SERVICE != 0 && c.src_rev == 0 && !orig;
            let node_backend = if unjudged_service_reply { node_socket_local(ctx, &p.src) } else { None };
            let (remote, port) = if c.flags & CT_VIA_SERVICE != 0 && c.src_rev != 0 {
                (c.nat_addr, c.nat_port)
            } else if let Some(backend) = node_backend {
                backend
            } else if orig {
                (p.dst, p.dport)
            } else {
                (p.src, p.sport)
            };
            let j = judge(kept, ep, DIRECTION_EGRESS, &remote, key.protocol, port, p.l4 == L4::Ports, false);
            if c.src_rev == 0 {
                // Its first judgment of the flow (not a revision's re-judgment): an event.
                flow::emit(p, ep, ifindex, DIRECTION_EGRESS, &j, &remote, port, false);
            }
            if unjudged_service_reply {
                // Judged now, whatever the answer: the pending judgment goes (a later flow
                // from the same address and port must not take it over), and a policy
                // change judges the flow against the same remote again.
                let mut pk = pending_key(p);
                pk.addr = p.dst;
                pk.port = p.dport;
                let _ = PENDING.remove(&pk);
                c.nat_addr = remote;
                c.nat_port = port;
            }
            if j.allowed {
                c.src_rev = ep.revision;
            }
            j.allowed
        }
    } else if c.dst_rev == ep.revision {
        true
    } else {
        cold();
        // The destination's ingress from the originator, again: by the client the node
        // translated, if it did; with the node exemption if the node's stack sent it.
        let (mut remote, port) = if orig { (p.src, p.dport) } else { (p.dst, p.sport) };
        if c.flags & CT_CLIENT_IN_NAT != 0 {
            remote = c.nat_addr;
        }
        let node_stack = c.flags & CT_FROM_NODE != 0;
        let j = judge(kept, ep, DIRECTION_INGRESS, &remote, key.protocol, port, p.l4 == L4::Ports, node_stack);
        if c.dst_rev == 0 {
            // The destination's first judgment of a flow its peer's hook started (a local
            // source): a new flow for this endpoint, so an event.
            flow::emit(p, ep, ifindex, DIRECTION_INGRESS, &j, &remote, port, node_stack);
        }
        if j.allowed {
            c.dst_rev = ep.revision;
        }
        j.allowed
    };
    if ok {
        // Write the shared entry only when something changes: every write moves its cache
        // line between the CPUs of the two ends. A second of staleness is far below the
        // shortest timeout.
        if now.wrapping_sub(c.last_seen_ns) > CT_REFRESH_NS {
            c.last_seen_ns = now;
        }
        if p.tcp_flags & TCP_FIN != 0 {
            let fin = if orig { CT_TCP_FIN_ORIG } else { CT_TCP_FIN_REPLY };
            if c.flags & fin == 0 {
                // The closing timeout once both directions are closed: a half-closed flow
                // runs on, and its packets may not refresh the entry (see `untracked`).
                // An entry that never sees the other direction closes at the first FIN.
                let both = CT_TCP_FIN_ORIG | CT_TCP_FIN_REPLY;
                let closing = (c.flags | fin) & both == both || c.flags & CT_ONE_WAY != 0;
                c.flags |= fin | if closing { CT_TCP_CLOSING } else { 0 };
            }
        }
        if p.tcp_flags & TCP_RST != 0 && c.flags & CT_TCP_RESET == 0 {
            // Not deleted here: the other hooks on this packet's path must still find it.
            c.flags |= CT_TCP_RESET;
            c.last_seen_ns = now;
        }
    }
    ok
}

/// What `tracked` found of a packet's flow.
struct Tracked {
    /// The packet's source is the key's `lo` end.
    src_is_lo: bool,
    /// `Some(verdict)` if the flow is tracked and fresh; `None`: a new flow.
    known: Option<bool>,
    /// `now()`, read for a new flow (0 when a flow record answered).
    now: u64,
    /// For a new flow: the entry of the flow's key that it replaces (closed, or timed
    /// out), if any; `track` writes the new flow over it.
    stale: Option<core::ptr::NonNull<CtValue>>,
}

/// Writes the packet's flow key into `s.key` and finds the flow: in this CPU's flow
/// records (see `FlowSlot`), else in connection tracking.
#[inline(always)]
fn tracked(ctx: &TcContext, s: &mut Scratch, ep: &EndpointValue, ep_is_src: bool, ifindex: u32) -> Tracked {
    let p = &s.packet;
    let src_is_lo = ct_key(&mut s.key, &p.src, p.sport, &p.dst, p.dport, p.protocol);
    if ep.flags & ENDPOINT_FAIL_CLOSED != 0 {
        cold();
        let now = now();
        // Nothing passes a fail-closed endpoint, tracked or not. A flow this endpoint has
        // not judged yet (untracked, or tracked by its peer's hook only) is new to it, so
        // it is reported; one it approved before is being cut, as a revision's re-judgment
        // cuts one: no event.
        let judged = match ct_entry(&s.key) {
            Some(ct) => {
                // SAFETY: see below; only read.
                let c = unsafe { &*ct };
                let orig = (c.flags & CT_ORIG_IS_LO != 0) == src_is_lo;
                let side = if ep_is_src == orig { c.src_rev } else { c.dst_rev };
                !expired(c, p.protocol, now) && side != 0
            }
            None => false,
        };
        if !judged {
            fail_closed_event(p, ep, ep_is_src, ifindex);
        }
        return Tracked { src_is_lo, known: Some(false), now, stale: None };
    }
    let tick = tick();
    let slot = &mut s.flows[slot_index(&s.key)];
    if cached(slot, &s.key, p.tcp_flags, ep, ep_is_src, src_is_lo, tick) {
        return Tracked { src_is_lo, known: Some(true), now: 0, stale: None };
    }
    let now = now();
    let Some(ct) = ct_entry(&s.key) else {
        forget(slot, tick);
        return Tracked { src_is_lo, known: None, now, stale: None };
    };
    // SAFETY: `ct` points into a map value, valid for this program run; its fields are
    // plain integers, so a racing writer can only make us judge again.
    let c = unsafe { &mut *ct };
    // A SYN on a flow that was closing is a new connection reusing the ports (its entry
    // can outlive the close: one FIN seen, or the closing timeout), judged afresh; its
    // entry then replaces the old one.
    let reopened = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && c.flags & (CT_TCP_FIN_ORIG | CT_TCP_FIN_REPLY | CT_TCP_RESET) != 0;
    if reopened || expired(c, p.protocol, now) {
        forget(slot, tick);
        return Tracked { src_is_lo, known: None, now, stale: core::ptr::NonNull::new(ct) };
    }
    let orig = (c.flags & CT_ORIG_IS_LO != 0) == src_is_lo;
    let ok = established(ctx, &mut s.judgments, c, &s.key, p, ep, ep_is_src, orig, now, ifindex);
    if ok {
        remember(slot, &s.key, c, tick);
    } else {
        forget(slot, tick);
    }
    Tracked { src_is_lo, known: Some(ok), now, stale: None }
}

/// The flow event of a new flow that fail-closed endpoint `ep` drops: judged as the
/// programs judge a new flow, by the sender's egress or the receiver's ingress.
#[inline(never)]
fn fail_closed_event(p: &Packet, ep: &EndpointValue, ep_is_src: bool, ifindex: u32) {
    if ep_is_src {
        let j = judge_tables(ep, DIRECTION_EGRESS, &p.dst, p.protocol, p.dport, p.l4 == L4::Ports, false);
        flow::emit(p, ep, ifindex, DIRECTION_EGRESS, &j, &p.dst, p.dport, false);
    } else {
        let j = judge_tables(ep, DIRECTION_INGRESS, &p.src, p.protocol, p.dport, p.l4 == L4::Ports, false);
        flow::emit(p, ep, ifindex, DIRECTION_INGRESS, &j, &p.src, p.dport, false);
    }
}

/// Tracks the flow in `s.key`: over `stale`, the key's entry that `tracked` found closed
/// or timed out, if there is one.
#[inline(always)]
fn track(s: &mut Scratch, src_is_lo: bool, src_rev: u32, dst_rev: u32, flags: u16, now: u64, stale: Option<core::ptr::NonNull<CtValue>>) {
    if s.packet.tcp_flags & TCP_RST != 0 {
        // A reset never starts a flow.
        return;
    }
    let v = &mut s.value;
    put(&mut v.last_seen_ns, now);
    put(&mut v.src_rev, src_rev);
    put(&mut v.dst_rev, dst_rev);
    if flags & CT_CLIENT_IN_NAT != 0 {
        v.nat_addr = s.arrival.src;
        put(&mut v.nat_port, s.arrival.sport);
    } else {
        zero_addr(&mut v.nat_addr);
        put(&mut v.nat_port, 0);
    }
    // A FIN that opens an entry (a flow whose entry was lost) closed the original direction.
    let fin = if s.packet.tcp_flags & TCP_FIN != 0 { CT_TCP_FIN_ORIG } else { 0 };
    put(&mut v.flags, flags | fin | if src_is_lo { CT_ORIG_IS_LO } else { 0 });
    put(&mut v._pad, 0);
    if PA_PREV_CT.load() != 0 {
        // The previous programs, still in some links, must know the flow too (and
        // `stale` may be theirs).
        let _ = CONNTRACK.insert(&s.key, &s.value, 0);
        let _ = CONNTRACK_PREV.insert(&s.key, &s.value, 0);
    } else if let Some(c) = stale {
        // A new connection on the ports of a closed one (a busy client reuses its ports
        // within seconds, while their entries still close): written over the old entry in
        // place. An insert would pop a free element (cold memory, and the free list's
        // lock), lock the bucket and free the old element: on real traffic most of a new
        // flow's cost. A reader on another CPU may see the entry half written; every
        // field it could then take from the old connection judged the same key, and the
        // old connection's late packets are what it would pass them for.
        // SAFETY: `c` points into a `CONNTRACK` value found in this program run (`ct_entry`;
        // not `CONNTRACK_PREV`, which is only looked up while `PA_PREV_CT` is set), valid
        // until it ends, 8-byte aligned; `CtValue` is plain integers, 40 bytes.
        unsafe { put_words(c.as_ptr(), &s.value) };
    } else {
        // A full LRU map evicts its oldest entry; a failure here only means the next
        // packet is judged again.
        let _ = CONNTRACK.insert(&s.key, &s.value, 0);
    }
}

#[inline(always)]
fn pending_key(p: &Packet) -> PendingKey {
    let mut k = PendingKey { addr: p.src, port: p.sport, protocol: p.protocol, _pad: [1; 5] };
    zero_bytes(&mut k._pad);
    k
}

/// Whether a new flow to `addr` over `protocol` waits for DNAT to be judged (`SERVICES`).
#[inline(always)]
fn deferred_to_dnat(addr: &Addr, protocol: u8) -> bool {
    match SERVICES.get(aya_ebpf::maps::lpm_trie::Key::new(128, *addr)) {
        Some(v) => *v == SERVICE_DEFER_ALL || (*v == SERVICE_DEFER_TCP && protocol == PROTO_TCP),
        None => false,
    }
}

/// A local source's egress toward the post-DNAT destination, for a flow whose judgment
/// waited for translation (`PENDING`, found by the source's address and port before any
/// masquerade: `from`, `sport`). The revision it was approved under, or `None`.
#[inline(always)]
fn judge_deferred(s: &mut Scratch, src: &EndpointValue, ifindex: u32, from: &Addr, sport: u16) -> Option<u32> {
    let p = &s.packet;
    let j = judge(&mut s.judgments, src, DIRECTION_EGRESS, &p.dst, p.protocol, p.dport, p.l4 == L4::Ports, false);
    flow::emit(p, src, ifindex, DIRECTION_EGRESS, &j, &p.dst, p.dport, false);
    if !j.allowed {
        return None;
    }
    let mut pk = pending_key(p);
    pk.addr = *from;
    pk.port = sport;
    // SAFETY: copied out at once.
    if let Some(pre) = unsafe { PENDING.get(&pk) } {
        // SAFETY: `s.other` is a `CtKey` (40 bytes, 8-byte aligned).
        unsafe { put_words(&mut s.other, pre) };
        if let Some(ct) = ct_entry(&s.other) {
            // SAFETY: see `tracked`.
            let c = unsafe { &mut *ct };
            // Only a flow still waiting for this judgment: never one judged already (a
            // stale record must not approve it).
            if c.flags & CT_VIA_SERVICE != 0 && c.src_rev == 0 {
                c.src_rev = src.revision;
                // SAFETY: a field of the entry `c`: an `Addr`, 16 bytes, 8-byte aligned.
                unsafe { put_words(&raw mut c.nat_addr, &p.dst) };
                c.nat_port = p.dport;
            }
        }
        let _ = PENDING.remove(&pk);
    }
    Some(src.revision)
}

/// Flags of an endpoint whose packets may need connection tracking: isolation in either
/// direction, an audit table, fail-closed.
const NEEDS_TRACKING: u32 =
    ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED | ENDPOINT_FAIL_CLOSED | ENDPOINT_AUDIT_INGRESS | ENDPOINT_AUDIT_EGRESS;

/// Whether packet `p` of endpoint `ep` passes without a connection tracking lookup: a TCP
/// packet that neither opens nor closes its flow (no SYN, FIN or RST), of an endpoint that
/// nothing isolates in either direction (and that has no audit table and is not held
/// fail-closed). Such an endpoint allows all its traffic, and its side of a flow needs
/// nothing from the entry beyond what the flow's first packet wrote: its opening SYN, and
/// its FINs and RST, still take the full path, so the entry exists, records who
/// originated the flow (which is what its replies are judged by if the endpoint becomes
/// isolated later), and ages out as before once the flow closes: the closing timeout
/// starts at the second FIN, not the first, since a half-closed flow runs on without
/// refreshing the entry (`CT_TCP_FIN_ORIG`). An isolated peer on this node reads and
/// refreshes the entry from its own hook (no hand-off is left for it). What is skipped is
/// the lookup on most packets of most pods in a cluster where most pods are not selected
/// by any policy; the cost is that a flow between two such pods is not refreshed in the
/// table while it runs (it is kept `CT_TIMEOUT_TCP_NS` from its start, or from its last
/// FIN, and is the least recently used entry if the table fills).
#[inline(always)]
fn untracked(ep: &EndpointValue, p: &Packet) -> bool {
    ep.flags & NEEDS_TRACKING == 0 && p.l4 == L4::Ports && p.protocol == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
}

/// The start of both pod hooks, at the pod whose host veth is `ifindex` (its egress
/// hook, `egress`, or its ingress hook): the common path (`fast`) first, else a parse from
/// the start. `Ok(ep)`: the packet, parsed into `s.packet`, is to be judged through
/// connection tracking for endpoint `ep`. `Err(action)`: it is answered already (counted
/// where the endpoint is known). The outer `Err`: truncated or malformed.
#[inline(always)]
fn start(ctx: &TcContext, s: &mut Scratch, egress: bool, ifindex: u32) -> Result<Result<EndpointValue, i32>, ()> {
    match fast::probe(ctx, s, egress, ifindex) {
        Probe::Passed => return Ok(Err(PASS)),
        Probe::Judge(ep) => return Ok(Ok(ep)),
        Probe::Other => {}
    }
    // Not the common shape (see `fast`): parsed from the start.
    cold();
    if !parse(ctx, &mut s.packet, &mut s.other)? || s.packet.l4 == L4::Neighbor {
        return Ok(Err(PASS));
    }
    let Some(ep) = endpoint_on(ifindex, if egress { &s.packet.src } else { &s.packet.dst }) else {
        // Egress: anti-spoofing, the source must be this veth's pod. Ingress: not
        // addressed to this veth's pod (broadcast, multicast), the pod decides.
        return Ok(Err(if egress { DROP } else { PASS }));
    };
    if untracked(&ep, &s.packet) || (s.packet.l4 == L4::Error && s.packet.related_tracked) {
        count(&ep, if egress { DIRECTION_EGRESS } else { DIRECTION_INGRESS }, true, ctx.len());
        return Ok(Err(PASS));
    }
    Ok(Ok(ep))
}

#[classifier]
// Inlined into the entry the macro makes: a call to a subprogram costs every run a
// return through the return thunk.
#[inline(always)]
pub fn pod_egress(ctx: TcContext) -> i32 {
    match try_pod_egress(&ctx) {
        Ok(action) => action,
        // Truncated or malformed: a pod has no business sending it.
        Err(()) => DROP,
    }
}

// Inlined: a call to a subprogram costs a return through the return thunk on every run.
#[inline(always)]
fn try_pod_egress(ctx: &TcContext) -> Result<i32, ()> {
    let s = scratch()?;
    let ifindex = ifindex(ctx);
    let ep = match start(ctx, s, true, ifindex)? {
        Ok(ep) => ep,
        Err(action) => return Ok(action),
    };
    let len = ctx.len();
    let Tracked { src_is_lo, known, now, stale } = tracked(ctx, s, &ep, true, ifindex);
    if let Some(ok) = known {
        count(&ep, DIRECTION_EGRESS, ok, len);
        return Ok(if ok { PASS } else { DROP });
    }
    // A new flow: note where it starts, for `pod_ingress` after the node's NAT (a Service
    // that kube-proxy also masquerades: hairpin, masqueradeAll; a NodePort of this node).
    note_arrival(ctx, &mut s.arrival, &s.packet, now);
    let p = &s.packet;
    if p.l4 != L4::Error && deferred_to_dnat(&p.dst, p.protocol) {
        // Judged after DNAT, against the backend; remember where the flow started.
        let pk = pending_key(p);
        track(s, src_is_lo, 0, CT_NOT_LOCAL, CT_VIA_SERVICE, now, stale);
        let _ = PENDING.insert(&pk, &s.key, 0);
        count(&ep, DIRECTION_EGRESS, true, len);
        return Ok(PASS);
    }
    let j = judge(&mut s.judgments, &ep, DIRECTION_EGRESS, &p.dst, p.protocol, p.dport, p.l4 == L4::Ports, false);
    flow::emit(p, &ep, ifindex, DIRECTION_EGRESS, &j, &p.dst, p.dport, false);
    if !j.allowed {
        count(&ep, DIRECTION_EGRESS, false, len);
        return Ok(DROP);
    }
    // The destination's side is judged by its own hook if it is local (0: not yet); if it
    // is not, nothing on this node ever reads it.
    if p.l4 != L4::Echo || p.echo_request {
        track(s, src_is_lo, ep.revision, 0, 0, now, stale);
    }
    count(&ep, DIRECTION_EGRESS, true, len);
    Ok(PASS)
}

#[classifier]
// Inlined into the entry the macro makes: a call to a subprogram costs every run a
// return through the return thunk.
#[inline(always)]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    match try_pod_ingress(&ctx) {
        Ok(action) => action,
        Err(()) => DROP,
    }
}

// Inlined: a call to a subprogram costs a return through the return thunk on every run.
#[inline(always)]
fn try_pod_ingress(ctx: &TcContext) -> Result<i32, ()> {
    let s = scratch()?;
    let ifindex = ifindex(ctx);
    let ep = match start(ctx, s, false, ifindex)? {
        Ok(ep) => ep,
        Err(action) => return Ok(action),
    };
    let len = ctx.len();
    let Tracked { src_is_lo, known, now, stale } = tracked(ctx, s, &ep, false, ifindex);
    if let Some(ok) = known {
        count(&ep, DIRECTION_INGRESS, ok, len);
        return Ok(if ok { PASS } else { DROP });
    }
    // A new flow. Where it came from before the node translated it (see `Arrival`): a
    // NodePort client, or a local pod that kube-proxy masqueraded.
    let mut flags = 0;
    let (mut origin, mut origin_port) = (s.packet.src, s.packet.sport);
    if arrived_here(ctx, &s.arrival, s.packet.protocol, now)
        && !(same_addr(&s.arrival.src, &s.packet.src) && s.arrival.sport == s.packet.sport)
    {
        flags = CT_CLIENT_IN_NAT;
        (origin, origin_port) = (s.arrival.src, s.arrival.sport);
    }
    // A local source that sent it to a Service address had its egress judgment deferred
    // to here, where the backend is known.
    let mut src_rev = CT_NOT_LOCAL;
    if let Some(src) = endpoint(&origin) {
        match judge_deferred(s, &src, ifindex, &origin, origin_port) {
            Some(rev) => src_rev = rev,
            None => {
                count(&src, DIRECTION_EGRESS, false, len);
                return Ok(DROP);
            }
        }
    } else if flags == 0 && from_node_stack(ctx) {
        // The node itself (kubelet, a host process, a host-network pod): its addresses
        // pass (`PEER_OWN_NODE`).
        flags = CT_FROM_NODE;
    }
    let p = &s.packet;
    let remote = if flags & CT_CLIENT_IN_NAT != 0 { &s.arrival.src } else { &p.src };
    let node_stack = flags & CT_FROM_NODE != 0;
    let j = judge(&mut s.judgments, &ep, DIRECTION_INGRESS, remote, p.protocol, p.dport, p.l4 == L4::Ports, node_stack);
    flow::emit(p, &ep, ifindex, DIRECTION_INGRESS, &j, remote, p.dport, node_stack);
    if !j.allowed {
        count(&ep, DIRECTION_INGRESS, false, len);
        return Ok(DROP);
    }
    if p.l4 != L4::Echo || p.echo_request {
        track(s, src_is_lo, src_rev, ep.revision, flags, now, stale);
    }
    count(&ep, DIRECTION_INGRESS, true, len);
    Ok(PASS)
}

/// Whether the node's own stack sent the packet: at a pod veth's tc egress, only a packet
/// of a local socket still holds it (a forwarded packet lost its sender's socket when it
/// entered the node's IP layer). A local pod's packet on a bridge keeps its pod's
/// socket, but its source is a pod address, never one that `PEER_OWN_NODE` marks (its
/// anti-spoofing check saw to that).
#[inline(always)]
fn from_node_stack(ctx: &TcContext) -> bool {
    // SAFETY: reading `sk` of the context's `__sk_buff`, as tc programs may; it is only
    // compared with null, never dereferenced.
    unsafe { !(*ctx.skb.skb).__bindgen_anon_2.sk.is_null() }
}

/// The local address and port of the node's socket that sent this packet (see
/// `from_node_stack`), if it has a specific address: a wildcard-bound datagram socket
/// names none, and the caller then falls back to what the packet shows. `src`: the
/// packet's source, whose family picks the field: an IPv4 flow reads the IPv4 address
/// (a dual-stack listener's request socket has its IPv6 one unset), an IPv6 flow the
/// IPv6 one.
#[inline(always)]
fn node_socket_local(ctx: &TcContext, src: &Addr) -> Option<(Addr, u16)> {
    // SAFETY: reading `sk` of the context's `__sk_buff`, as tc programs may; the verifier
    // types it as a socket or null.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a non-null `sk` of a tc program's context points at a socket's common part,
    // whose family, local address and port (`struct bpf_sock`) tc programs may read.
    let (family, port, v4, v6) = unsafe { ((*sk).family, (*sk).src_port, (*sk).src_ip4, (*sk).src_ip6) };
    let v4 = v4.to_ne_bytes();
    // SAFETY: `Addr` is 16 bytes with 8-byte alignment: two u64s, any bit pattern valid.
    let words = unsafe { &*(src as *const Addr as *const [u64; 2]) };
    // `::ffff:a.b.c.d` (see `packet::mapped_v4`): the first eight bytes zero, then 0, 0,
    // 0xff, 0xff.
    let ipv4 = words[0] == 0 && words[1].to_ne_bytes()[..4] == [0, 0, 0xff, 0xff];
    let addr = if ipv4 && (family == AF_INET || family == AF_INET6) && v4 != [0; 4] && v4 != LOOPBACK4_IPV6 {
        packet::mapped_v4(v4)
    } else if !ipv4 && family == AF_INET6 && (v6[0] | v6[1] | v6[2] | v6[3]) != 0 {
        let w = |i: usize| v6[i].to_ne_bytes();
        let (a, b, c, d) = (w(0), w(1), w(2), w(3));
        Addr([a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]])
    } else {
        return None;
    };
    Some((addr, port as u16))
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// What an IPv6-only socket holds as its IPv4 address (`LOOPBACK4_IPV6`, 127.0.0.6).
const LOOPBACK4_IPV6: [u8; 4] = [127, 0, 0, 6];

/// Whether `a` is `node_ingress`'s record of this very packet (see `Arrival`).
#[inline(always)]
fn arrived_here(ctx: &TcContext, a: &Arrival, protocol: u8, now: u64) -> bool {
    // SAFETY: reading a field of the context's `__sk_buff`, as tc programs may.
    let tag = unsafe { (*ctx.skb.skb).tc_index };
    tag != 0 && tag == a.tag && a.protocol == protocol && now.wrapping_sub(a.now) <= ARRIVAL_MAX_AGE_NS
}

#[classifier]
pub fn node_ingress(ctx: TcContext) -> i32 {
    // It only takes notes: every packet goes on.
    let _ = try_node_ingress(&ctx);
    PASS
}

fn try_node_ingress(ctx: &TcContext) -> Result<(), ()> {
    let s = scratch()?;
    if !parse(ctx, &mut s.packet, &mut s.other)? {
        return Ok(());
    }
    let p = &s.packet;
    // Only a packet that may open a flow: the rest are judged by their flow's entry.
    let opens = match p.l4 {
        L4::Ports => p.protocol != PROTO_TCP || p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        L4::Echo => p.echo_request,
        L4::Other => true,
        L4::Error | L4::Neighbor => false,
    };
    if !opens {
        return Ok(());
    }
    note_arrival(ctx, &mut s.arrival, &s.packet, now());
    Ok(())
}

/// Records where packet `p` (which may open a flow) comes from in `a`, and tags the skb
/// with the record (see `Arrival`).
#[inline(always)]
fn note_arrival(ctx: &TcContext, a: &mut Arrival, p: &Packet, now: u64) {
    a.seq = a.seq.wrapping_add(1);
    let tag = (a.seq & 0x7fff) | 0x8000;
    a.src = p.src;
    a.sport = p.sport;
    a.protocol = p.protocol;
    a.tag = tag;
    a.now = now;
    // SAFETY: tc programs may write `tc_index` of their `__sk_buff`.
    unsafe { (*ctx.skb.skb).tc_index = tag };
}

/// Passes every packet and reads nothing: the datapath bench's floor (`bench --mechanisms
/// floor`), what any tc program on the pods' hooks costs before it does anything. The
/// agent never loads it.
#[classifier]
pub fn pass_all(_ctx: TcContext) -> i32 {
    PASS
}

#[classifier]
pub fn node_egress(ctx: TcContext) -> i32 {
    // Packets this program cannot read are not a pod's: leave them alone.
    try_node_egress(&ctx).unwrap_or(PASS)
}

fn try_node_egress(ctx: &TcContext) -> Result<i32, ()> {
    let s = scratch()?;
    if !parse(ctx, &mut s.packet, &mut s.other)? || matches!(s.packet.l4, L4::Neighbor | L4::Error) {
        return Ok(PASS);
    }
    // Only traffic that still carries a local pod's address (not masqueraded).
    let Some(ep) = endpoint(&s.packet.src) else {
        return Ok(PASS);
    };
    if untracked(&ep, &s.packet) {
        return Ok(PASS);
    }
    let ifindex = ifindex(ctx);
    let Tracked { src_is_lo, known, now, stale } = tracked(ctx, s, &ep, true, ifindex);
    if let Some(ok) = known {
        if !ok {
            count(&ep, DIRECTION_EGRESS, false, ctx.len());
        }
        return Ok(if ok { PASS } else { DROP });
    }
    let (from, sport) = (s.packet.src, s.packet.sport);
    match judge_deferred(s, &ep, ifindex, &from, sport) {
        Some(rev) => {
            if s.packet.l4 != L4::Echo || s.packet.echo_request {
                // Its replies come back translated, to the Service address's entry.
                track(s, src_is_lo, rev, CT_NOT_LOCAL, CT_ONE_WAY, now, stale);
            }
            Ok(PASS)
        }
        None => {
            count(&ep, DIRECTION_EGRESS, false, ctx.len());
            Ok(DROP)
        }
    }
}
