//! The datapath's map layout, shared by the kernel programs (`src/main.rs`, feature
//! `ebpf`) and the agent (feature `user`).
//!
//! Byte order and encoding, for every map:
//! - Addresses are 16 bytes in network byte order; an IPv4 address is stored IPv4-mapped
//!   (`::ffff:a.b.c.d`), so an IPv4 prefix of length L is an address prefix of 96 + L.
//! - Ports inside LPM keys are big-endian (network order), so that a port prefix is a
//!   prefix of the key's bits; elsewhere ports are host order `u16`.
//! - Other integers are host order.
//!
//! Every type is `#[repr(C)]` with explicit padding fields (checked by the size asserts
//! below), so the kernel and user space agree byte for byte.
#![no_std]

pub mod layout;
pub use layout::LAYOUT_VERSION;

/// A 16-byte address (see the module doc for the encoding), 8-byte aligned so the
/// kernel programs copy and compare it as two 64-bit words rather than byte by byte.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr(pub [u8; 16]);

/// Maps, by the names they are pinned under (`/sys/fs/bpf/policy-agent/<name>`).
pub mod map_names {
    pub const ENDPOINTS: &str = "PA_ENDPOINTS";
    pub const IFACES: &str = "PA_IFACES";
    pub const PEERS: &str = "PA_PEERS";
    pub const PORTS: &str = "PA_PORTS";
    pub const CONNTRACK: &str = "PA_CONNTRACK";
    pub const PENDING: &str = "PA_PENDING";
    pub const SERVICES: &str = "PA_SERVICES";
    pub const COUNTERS: &str = "PA_COUNTERS";
    /// Not pinned by us: during a migration, the previous maps' `PA_CONNTRACK`.
    pub const CONNTRACK_PREV: &str = "PA_CONNTRACK_PREV";
    /// The flow events ring buffer (`FlowEvent` records).
    pub const FLOWS: &str = "PA_FLOWS";
    /// `FlowStats`, per CPU, at index 0: the events' rate limit and what it suppressed.
    pub const FLOW_STATS: &str = "PA_FLOW_STATS";
}

/// Globals the agent sets at load.
pub mod global_names {
    /// `u8`: 1 while a migration swaps links from programs whose connection tracking map
    /// (`map_names::CONNTRACK_PREV`) the new programs cannot share.
    pub const PREV_CT: &str = "PA_PREV_CT";
    /// `u8`: 1 if denied new flows emit a `FlowEvent` (the default), 0 if not.
    pub const FLOW_DENIED: &str = "PA_FLOW_DENIED";
    /// `u32`: allowed new flows emit a `FlowEvent` never (0, the default), always (1), or
    /// one in N (N, at random).
    pub const FLOW_ALLOWED_EVERY: &str = "PA_FLOW_ALLOWED_EVERY";
    /// `u64`: the events' rate limit, per CPU, as nanoseconds per event (a node rate of R
    /// events/s on C CPUs: `C * 10^9 / R`).
    pub const FLOW_COST_NS: &str = "PA_FLOW_COST_NS";
    /// `u64`: how far (ns) a CPU's rate limit may run ahead of now: a burst of
    /// `FLOW_BURST_NS / FLOW_COST_NS + 1` events passes at once.
    pub const FLOW_BURST_NS: &str = "PA_FLOW_BURST_NS";
}

/// Programs, by function name.
pub mod program_names {
    /// tc egress of a pod's host-side veth: traffic entering the pod (its ingress).
    pub const POD_INGRESS: &str = "pod_ingress";
    /// tc ingress of a pod's host-side veth: traffic leaving the pod (its egress).
    pub const POD_EGRESS: &str = "pod_egress";
    /// tc egress of every other device: post-translation egress checks of Service traffic
    /// that leaves the node.
    pub const NODE_EGRESS: &str = "node_egress";
    /// tc ingress of the same devices: records each arriving packet's addresses before
    /// the node translates them (NodePort, LoadBalancer), so that `pod_ingress` judges the
    /// real client.
    pub const NODE_INGRESS: &str = "node_ingress";
    /// Passes every packet: only the datapath bench's floor attaches it.
    pub const PASS_ALL: &str = "pass_all";
}

/// `ENDPOINTS` key: a local pod's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub addr: Addr,
}

/// `ENDPOINTS` value. Written in one map update, so a packet sees the old or the new
/// revision with its matching flags, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointValue {
    /// Datapath endpoint id (1..); indexes `COUNTERS` and prefixes `PEERS` keys.
    pub id: u32,
    /// Bumped by the agent once a change of the endpoint's tables is complete (and with
    /// an isolation change): connection tracking records the revision each end approved
    /// a flow under, so the next packet after a change is judged again.
    pub revision: u32,
    /// The pod's host-side veth; traffic claiming this address elsewhere is dropped.
    pub ifindex: u32,
    /// `ENDPOINT_*` flags.
    pub flags: u32,
}

pub const ENDPOINT_INGRESS_ISOLATED: u32 = 1;
pub const ENDPOINT_EGRESS_ISOLATED: u32 = 2;
/// Deny everything (tables not (yet) in place, or a failed write): fail closed. On an
/// `IFACES` slot it denies all traffic through that interface, whatever its addresses (a
/// new pod's veth held until the agent knows the pod).
pub const ENDPOINT_FAIL_CLOSED: u32 = 4;
/// Audit mode: the endpoint has an audit table (its verdict with audited policies
/// enforcing) for ingress / egress, in `PEERS` under `DIRECTION_AUDIT_INGRESS` /
/// `DIRECTION_AUDIT_EGRESS`. A new flow its enforced table allows is looked up there too,
/// and reported with `FLOW_VERDICT_AUDIT` if that table denies it. Nothing else reads it.
pub const ENDPOINT_AUDIT_INGRESS: u32 = 8;
pub const ENDPOINT_AUDIT_EGRESS: u32 = 16;

/// `IFACES` value, at index = the pod's host-side ifindex: the hot path's endpoint lookup
/// (an array, which the verifier inlines), by the interface the packet is on. One write
/// flips both address families of a pod. An empty slot (`ifindex` 0) or an ifindex beyond
/// the array falls back to `ENDPOINTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceValue {
    pub id: u32,
    pub revision: u32,
    /// `ENDPOINT_*` flags, plus `IFACE_HAS_V4`/`IFACE_HAS_V6`.
    pub flags: u32,
    /// Equal to the index when the slot is in use.
    pub ifindex: u32,
    pub v4: Addr,
    pub v6: Addr,
}

pub const IFACE_HAS_V4: u32 = 1 << 16;
pub const IFACE_HAS_V6: u32 = 1 << 17;

/// Directions, inside `PeerKey`s and for the `COUNTERS` index.
pub const DIRECTION_INGRESS: u32 = 0;
pub const DIRECTION_EGRESS: u32 = 1;
/// `PeerKey` directions of the audit tables (`ENDPOINT_AUDIT_*`): a direction plus
/// `DIRECTION_AUDIT`. Never a `COUNTERS` index nor a `FlowEvent::direction`.
pub const DIRECTION_AUDIT: u32 = 2;
pub const DIRECTION_AUDIT_INGRESS: u32 = DIRECTION_INGRESS | DIRECTION_AUDIT;
pub const DIRECTION_AUDIT_EGRESS: u32 = DIRECTION_EGRESS | DIRECTION_AUDIT;

/// `PEERS` LPM key data: (endpoint, direction) always match in full, then the address
/// prefix. The key carries no revision: the agent changes a table in place, entry by
/// entry, in an order that gives every address its old or its new answer at every step
/// (see the agent's `datapath::sync`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub endpoint: u32,
    pub direction: u32,
    pub addr: Addr,
}

/// Bits of `PeerKey` before the address.
pub const PEER_KEY_FIXED_BITS: u32 = 64;

/// `PEERS` value: what the matched prefix may do.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerValue {
    /// `PORTS` set id (ignored with `PEER_ALL`; `NO_PORT_SET` allows nothing).
    pub port_set: u32,
    pub flags: u32,
}

/// Every protocol and port (ICMP too).
pub const PEER_ALL: u32 = 1;

/// The prefix is an address of the endpoint's node (ingress tables only). A packet the
/// node's own stack sent (it still carries its socket: kubelet probes, host processes,
/// host-network pods) passes; any other packet from it (forwarded: a client kube-proxy
/// masqueraded to the node's address) gets the entry's port set or `PEER_ALL`, which hold
/// what the policies give the address. The API exempts the node, not whoever the node
/// forwards.
pub const PEER_OWN_NODE: u32 = 2;

/// A port set id that has no `PORTS` entries: an entry with it (and no `PEER_ALL`) allows
/// nothing.
pub const NO_PORT_SET: u32 = 0;

/// `PORTS` LPM key data: (port set, protocol) match in full, then the top
/// `PORT_BLOCK_BITS` bits of the port (big-endian) as the prefix; the value is a bitmap
/// of the `PORT_BLOCK_SIZE` ports of the block (bit `port % 64`). A port range is a
/// handful of prefixes whose bitmaps are full, plus at most two partial blocks; any set
/// of ports costs at most one entry per block (every odd port: 1,024 per protocol).
///
/// Port sets are global and content-addressed: every endpoint and direction whose
/// entries allow the same ports shares one set id, and a set's entries never change while
/// a `PEERS` entry refers to it (a different set gets a new id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub port_set: u32,
    pub protocol: u8,
    pub _pad: u8,
    /// Big-endian; the low `16 - PORT_BLOCK_BITS` bits are zero.
    pub port: [u8; 2],
}

/// Bits of `PortKey` before the port (including the zero pad byte).
pub const PORT_KEY_FIXED_BITS: u32 = 48;
/// Bits of the port inside the key's prefix (the block); the rest index the bitmap.
pub const PORT_BLOCK_BITS: u32 = 10;
/// Ports per block (bits of the `PORTS` value).
pub const PORT_BLOCK_SIZE: u32 = 1 << (16 - PORT_BLOCK_BITS);

/// The `PORTS` value: bit `port % PORT_BLOCK_SIZE` set if the port is allowed.
pub type PortBits = u64;

/// The `PortKey::protocol` slot that stands for every protocol without ports (ICMP,
/// ICMPv6, GRE, ...): a port set allows them iff it has the entry
/// `{port_set, PORT_PROTOCOL_OTHER, port 0}` at full length with bit 0 set. Only tables
/// that a ClusterNetworkPolicy shaped need it (e.g. "deny TCP/80, the rest falls to the
/// default allow"): a NetworkPolicy allows port-less protocols only with `PEER_ALL`.
///
/// 255 is reserved by IANA, and a packet with ports (TCP, UDP, SCTP) never looks it up.
/// The key and value layout are those of layout 3, and either side may lack this entry's
/// meaning: programs that predate it never look the slot up (port-less traffic is denied
/// without `PEER_ALL`, as before), and maps written before it hold no such entry (the
/// same answer). So it is no layout change.
pub const PORT_PROTOCOL_OTHER: u8 = 255;

/// `CONNTRACK` key: the flow's two (address, port) ends in a canonical order (the lower
/// one first), so both directions find the same entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub lo_addr: Addr,
    pub hi_addr: Addr,
    pub lo_port: u16,
    pub hi_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// `CONNTRACK` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_coarse_ns` of the last packet (tick resolution: timeouts are seconds).
    pub last_seen_ns: u64,
    /// The originator's endpoint revision its egress allowed the flow under; 0 not judged
    /// yet, `CT_NOT_LOCAL` not a local endpoint.
    pub src_rev: u32,
    /// The same for the destination's ingress.
    pub dst_rev: u32,
    /// For a flow to a Service address: the backend (after DNAT) the originator's egress
    /// was judged against, so the judgment can be redone when its policy changes.
    pub nat_addr: Addr,
    pub nat_port: u16,
    /// `CT_*` flags.
    pub flags: u16,
    pub _pad: u32,
}

pub const CT_NOT_LOCAL: u32 = u32::MAX;

/// `SERVICES` value: new flows of every protocol to the address wait for DNAT to be
/// judged, against the backend (its endpoints are pods: the backend's hook or the device
/// the flow leaves by judges it). A Service CIDR gets this too.
pub const SERVICE_DEFER_ALL: u32 = 1;
/// `SERVICES` value: only TCP waits for DNAT. Some endpoints are node addresses (the
/// `kubernetes` Service's API servers, host-network pods): when the node is this one, no
/// hook sees the flow after DNAT, and the client's egress is judged at the reply, against
/// the replying socket's own address and port. Other protocols are judged before
/// translation, against the Service address: a datagram would reach the node's stack
/// before any judgment.
pub const SERVICE_DEFER_TCP: u32 = 2;
/// `SERVICES` value: judged before translation, against the Service address, as if the
/// address had no entry: a Service with an endpoint that is neither a pod nor a node (an
/// external address, which a masquerade on the way out would hide from the node's
/// devices), inside a configured Service range (whose own entry defers every protocol).
/// Programs of layouts before 9 defer every protocol for it, as they did for every
/// address of the range.
pub const SERVICE_BEFORE_DNAT: u32 = 3;
/// The originator is the `lo` end of the key.
pub const CT_ORIG_IS_LO: u16 = 1;
/// The destination was a Service address: egress is judged after translation.
pub const CT_VIA_SERVICE: u16 = 2;
/// Both ends sent a FIN (`CT_TCP_FIN_ORIG` and `CT_TCP_FIN_REPLY`): the entry expires
/// soon (`CT_TIMEOUT_TCP_CLOSING_NS`). Layouts before 8 set it at the first FIN.
pub const CT_TCP_CLOSING: u16 = 4;
/// A RST was seen: the entry expires at once (after the other hooks on the path saw it).
pub const CT_TCP_RESET: u16 = 8;
/// The flow's first packet came from the node's own stack (it had a socket) to a local
/// pod: a re-judgment of its ingress keeps the node exemption (`PEER_OWN_NODE`).
pub const CT_FROM_NODE: u16 = 16;
/// An inbound flow the node translated (NodePort, LoadBalancer, externalIPs): `nat_addr`
/// and `nat_port` hold the client's address and port from before translation (recorded
/// by `node_ingress`), by which the destination's ingress is judged.
pub const CT_CLIENT_IN_NAT: u16 = 32;
/// The originator sent a FIN. One FIN closes one direction only: a half-closed flow (the
/// client shut its side; the server still sends) keeps the established timeout, since
/// its packets need not refresh the entry (the hooks of a pod that nothing isolates skip
/// connection tracking for most TCP packets).
pub const CT_TCP_FIN_ORIG: u16 = 64;
/// The other end sent a FIN.
pub const CT_TCP_FIN_REPLY: u16 = 128;
/// No hook sees this entry's replies: `node_egress`'s entry of a Service flow after DNAT,
/// toward a backend off the node (the replies are translated back before `pod_ingress`,
/// which finds the Service address's entry). Its closing timeout starts at the first FIN.
pub const CT_ONE_WAY: u16 = 256;

/// `PENDING` key: the originator of a Service flow whose egress is judged after DNAT.
/// The source address, port and protocol survive DNAT, so the later hook finds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PendingKey {
    pub addr: Addr,
    pub port: u16,
    pub protocol: u8,
    pub _pad: [u8; 5],
}

/// `COUNTERS` value, per CPU, at index `endpoint id * 2 + direction`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allowed_packets: u64,
    pub allowed_bytes: u64,
    pub denied_packets: u64,
    pub denied_bytes: u64,
}

/// A `FLOWS` ring buffer record: one per new flow a table judged (never for packets of
/// tracked flows), written after the verdict, when the event kind is on and the CPU's
/// rate limit allows (`FlowStats`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at the verdict.
    pub time_ns: u64,
    pub src: Addr,
    pub dst: Addr,
    /// The local endpoint whose table judged the flow, and its revision in force.
    pub endpoint: u32,
    pub revision: u32,
    /// The interface the packet was on.
    pub ifindex: u32,
    /// With `FLOW_DECIDED_PORTS` or `FLOW_DECIDED_PORT_DENIED`: the port set of the
    /// `PEERS` entry that matched the remote address; else 0.
    pub port_set: u32,
    /// Host order. ICMP and ICMPv6: `sport` = type << 8 | code, `dport` = the echo
    /// identifier (0 for other messages). Protocols without ports: 0.
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// `DIRECTION_*` of `endpoint`.
    pub direction: u8,
    /// `FLOW_VERDICT_*`.
    pub verdict: u8,
    /// `FLOW_DECIDED_*`: what in the endpoint's table decided.
    pub decided: u8,
}

pub const FLOW_VERDICT_ALLOWED: u8 = 1;
pub const FLOW_VERDICT_DENIED: u8 = 2;
/// Allowed by the enforced table, denied by the endpoint's audit table: the flow passed,
/// and audited policies would have denied it. `decided` and `port_set` are the audit
/// table's. On with denied events (`PA_FLOW_DENIED`).
pub const FLOW_VERDICT_AUDIT: u8 = 3;

/// Allowed: the endpoint is not isolated in that direction.
pub const FLOW_DECIDED_NOT_ISOLATED: u8 = 1;
/// Allowed: the remote address's `PEERS` entry allows every protocol and port.
pub const FLOW_DECIDED_PEER_ALL: u8 = 2;
/// Allowed: the remote address's entry's port set holds the port (or protocol).
pub const FLOW_DECIDED_PORTS: u8 = 3;
/// Denied: isolated, and no entry matches the remote address: nothing allowed.
pub const FLOW_DECIDED_NO_PEER: u8 = 4;
/// Denied: an entry matches the remote address, but its port set lacks the port.
pub const FLOW_DECIDED_PORT_DENIED: u8 = 5;
/// Denied: the endpoint is fail-closed.
pub const FLOW_DECIDED_FAIL_CLOSED: u8 = 6;

/// `FLOW_STATS` value, per CPU: the rate limit's state and the events' counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// The rate limit (GCRA): the theoretical arrival time of the next event, in
    /// `bpf_ktime_get_ns` nanoseconds.
    pub tat_ns: u64,
    /// Events written to the ring buffer.
    pub emitted: u64,
    /// Events the rate limit dropped.
    pub suppressed: u64,
    /// Events dropped because the ring buffer was full (the agent reads too slowly).
    pub ring_full: u64,
}

/// The `FLOWS` ring buffer's size: 16,384 events of 72 bytes (with the record header),
/// 16 s of the default rate.
pub const FLOW_RING_BYTES: u32 = 1 << 20;

/// Idle timeouts of connection-tracking entries.
pub const CT_TIMEOUT_TCP_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_TIMEOUT_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_TIMEOUT_TCP_RESET_NS: u64 = 1_000_000_000;
pub const CT_TIMEOUT_OTHER_NS: u64 = 120 * 1_000_000_000;

/// Default map sizes (the agent may set others at load time). LPM tries allocate per
/// entry, so room costs nothing until used.
///
/// `PEERS`: 250 local pods with 10,000 entries each, plus room for one more table. The
/// compiler bench's cluster (10,000 pods, 2,000 policies) has tables of at most 628
/// entries, so this holds twice its largest table for every possible endpoint id (1,023)
/// with room to spare, and real clusters' tables of thousands of entries for 250 pods.
/// The agent keeps 1/16 of it free for updates in flight.
pub const DEFAULT_MAX_ENDPOINT_ADDRESSES: u32 = 1024;
pub const DEFAULT_MAX_PEER_ENTRIES: u32 = 250 * 10_000 + 10_000;
/// `PORTS`: port sets are shared by every pod and direction that allow the same ports;
/// the bench's cluster needs 9 entries in all (its largest table uses 9), and "every odd
/// port" on TCP, UDP and SCTP 3,072: room for 85 such distinct sets.
pub const DEFAULT_MAX_PORT_ENTRIES: u32 = 262_144;
pub const DEFAULT_MAX_CONNTRACK: u32 = 131_072;
pub const DEFAULT_MAX_PENDING: u32 = 16_384;
pub const DEFAULT_MAX_SERVICES: u32 = 16_384;
/// Endpoint ids are below this (COUNTERS has two slots per id).
pub const DEFAULT_MAX_ENDPOINTS: u32 = 1024;
/// `IFACES` slots: interfaces with a larger ifindex use the `ENDPOINTS` hash instead.
pub const DEFAULT_MAX_IFINDEX: u32 = 65_536;

// No implicit padding: sizes are the sums of the fields.
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 16);
const _: () = assert!(core::mem::size_of::<EndpointValue>() == 16);
const _: () = assert!(core::mem::size_of::<IfaceValue>() == 48);
const _: () = assert!(core::mem::size_of::<PeerKey>() == 24);
const _: () = assert!(core::mem::size_of::<PeerValue>() == 8);
const _: () = assert!(core::mem::size_of::<PortKey>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);
const _: () = assert!(core::mem::size_of::<CtValue>() == 40);
const _: () = assert!(core::mem::size_of::<PendingKey>() == 24);
const _: () = assert!(core::mem::size_of::<Counters>() == 32);
const _: () = assert!(core::mem::size_of::<Addr>() == 16);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 64);
const _: () = assert!(core::mem::size_of::<FlowStats>() == 32);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY (for each impl below): the type is `#[repr(C)]`, `Copy`, has no padding (see
    // the size asserts) and is valid for any bit pattern, as aya::Pod requires.
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for IfaceValue {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for PeerValue {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for PendingKey {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for FlowStats {}
}

/// An address in the maps' encoding.
pub fn addr_from_v4(octets: [u8; 4]) -> Addr {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..].copy_from_slice(&octets);
    Addr(a)
}
