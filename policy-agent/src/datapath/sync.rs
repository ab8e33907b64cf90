//! Keeping the maps equal to the compiler's tables, writing only what changed.
//!
//! # The order of writes
//!
//! An endpoint's table is changed in place (`PEERS` keys hold no revision), and every
//! intermediate state gives every address either its old or its new answer. Per address
//! the answer is the value of the longest prefix present that contains it, so:
//!
//! 1. port sets the new entries use are written first (sets are content-addressed and
//!    immutable: a different set of ports is a different set id; see below);
//! 2. added prefixes and changed values are written, **longest prefix first**;
//! 3. the endpoint's flags (isolation) are written if they change, with a new revision;
//! 4. removed prefixes are deleted, **shortest prefix first**;
//! 5. the endpoint's revision is bumped (one write per address and the interface slot)
//!    once the table is final;
//! 6. port sets that no entry refers to any more are deleted.
//!
//! Why each step is safe, for an address `x` whose longest old prefix is `o` and longest
//! new prefix `n`. During step 2 every old prefix is still present; if the longest
//! present prefix containing `x` was written already, it is `n` (a longer new prefix
//! would be present: either written before it, or unchanged and so old), with its new
//! value; if not, it is `o` with its old value. During step 4 every new prefix is
//! present with its new value; if the longest present prefix containing `x` is new, it
//! is `n`; if it is a removed one, it is `o` (a longer removed prefix containing `x`
//! would not have been deleted yet, and `o`, were it longer, is either kept or a removed
//! prefix longer than one still present), with its old value. Equal-length prefixes are
//! disjoint, so their order does not matter. Since the `PEERS` value names its port set
//! and a set's entries never change while referenced, an address's answer (peer and
//! port) is its old or its new one. Isolation: a direction that is not isolated ignores
//! its table, so a direction becoming isolated gets its entries first and the flag after;
//! one becoming open gets the flag first and its entries deleted after. A fail-closed
//! endpoint ignores its tables too.
//!
//! Connection tracking keeps, per flow, the revision each end approved it under; a
//! packet of a flow approved under another revision is judged again. The revision is
//! bumped after the last step that changes an answer (5), and also with a flag change
//! (3), so a flow judged while the table was half-way is judged again once it is final.
//!
//! Every intermediate state being safe, an update can stop between any two writes and go
//! on later ([`MapSync::run`] takes a deadline); a newer target simply plans from the
//! state the maps are in, which the agent mirrors exactly.
//!
//! # Space
//!
//! `PEERS` holds the union of old and new entries while an update runs (its removed
//! entries go last), and `PORTS` the new sets before the old ones go. An update is only
//! started if that peak fits; one that grows the maps must also leave a margin free
//! (`capacity / 16`), so that later updates (which may briefly need their removed
//! entries' room) still fit. An endpoint whose update does not fit is made fail-closed
//! alone (flag first, then its entries are deleted, which frees room) and reported as
//! [`SyncErrorKind::TooBig`] with the policies that contribute its entries; it is retried
//! once there is room. Updates that free room run before updates that need it. The one
//! case without a safe order of single writes: an update that shrinks the table but
//! whose removed entries, kept until the end, would not fit beside its new ones. That
//! endpoint alone is made fail-closed for the time of its rewrite.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

// The endpoints' `PEERS` entries are hashed by the hundreds of thousands per change: SipHash's
// resistance to chosen keys buys nothing for keys the agent makes itself.
use foldhash::{HashMap, HashMapExt};

use aya::maps::MapError;
use aya::maps::lpm_trie::Key;
use policy_ebpf::{
    Addr, DIRECTION_AUDIT_EGRESS, DIRECTION_AUDIT_INGRESS, DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_AUDIT_EGRESS,
    ENDPOINT_AUDIT_INGRESS, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_FAIL_CLOSED, ENDPOINT_INGRESS_ISOLATED, EndpointKey, EndpointValue,
    IFACE_HAS_V4, IFACE_HAS_V6, IfaceValue, NO_PORT_SET, PEER_ALL, PEER_OWN_NODE, PeerKey, PeerValue, PortBits, PortKey,
    SERVICE_BEFORE_DNAT, SERVICE_DEFER_ALL, SERVICE_DEFER_TCP,
};
use policy_model::{EndpointTables, Family, ObjectKey, PeerEntry, PeerTable, Prefix};

use super::encode::{
    Allow, PeerSlot, PortEntry, encode_addr, encode_prefix, mapped_block_slot, mapped_block_stop, peer_entries, peer_entry, peer_slot,
    port_set_entries,
};
use super::loader::{Datapath, MapSizes};

/// How an endpoint stands in the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointStatus {
    Enforced,
    /// Its tables could not be written: everything to and from it is denied.
    FailClosed {
        error: String,
    },
}

/// Why a pod's tables are not in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pod {pod}: {kind}")]
pub struct SyncError {
    pub pod: ObjectKey,
    pub kind: SyncErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncErrorKind {
    /// The pod's tables do not fit in the map beside the other pods' (the map is full
    /// for it): the pod is fail-closed until they do.
    #[error(
        "its tables need {needed_entries} {map} entries, more than the map has room for ({available} of {capacity} free for it); \
         the pod is fail-closed (all its traffic is denied) until they fit; policies contributing entries, largest first: {}",
        names(policies)
    )]
    TooBig {
        needed_entries: usize,
        /// `PEERS` or `PORTS`.
        map: &'static str,
        capacity: usize,
        available: usize,
        /// The policies contributing entries to the pod's table, largest contribution first.
        policies: Vec<ObjectKey>,
    },
    #[error("no free endpoint id (at most {max} endpoints)")]
    NoEndpointId { max: u32 },
    /// A map write failed for another reason: the pod is fail-closed.
    #[error("writing a {map} entry: {message}; the pod is fail-closed (all its traffic is denied)")]
    MapWrite { map: &'static str, message: String },
    #[error("attaching its programs: {message}")]
    Attach { message: String },
}

impl SyncErrorKind {
    pub fn is_too_big(&self) -> bool {
        matches!(self, SyncErrorKind::TooBig { .. })
    }
}

fn names(policies: &[ObjectKey]) -> String {
    if policies.is_empty() {
        return "none".into();
    }
    policies.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
}

/// What one sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// `PEERS` and `PORTS` entries written (new or changed) and deleted.
    pub written_entries: usize,
    pub deleted_entries: usize,
    /// Endpoint (`ENDPOINTS`/`IFACES`) writes: flag changes and revision bumps.
    pub endpoint_writes: usize,
    /// Endpoints whose update was completed.
    pub endpoints_updated: usize,
    pub errors: Vec<SyncError>,
    /// Errors of the datapath as a whole (a failed migration), not of one pod.
    pub datapath_errors: Vec<String>,
    /// The deadline stopped the sync with work left: call again (the maps are in a safe
    /// intermediate state meanwhile).
    pub more_work: bool,
}

/// A map write that failed.
#[derive(Debug, Clone)]
pub struct WriteError {
    /// The map is full.
    pub full: bool,
    pub message: String,
}

/// The maps [`MapSync`] writes: the pinned kernel maps ([`Datapath`]), or a model of them
/// in tests and benchmarks.
pub trait Maps {
    fn sizes(&self) -> MapSizes;
    fn put_peer(&mut self, endpoint: u32, slot: &PeerSlot, value: PeerValue) -> Result<(), WriteError>;
    fn del_peer(&mut self, endpoint: u32, slot: &PeerSlot) -> Result<(), WriteError>;
    fn put_port(&mut self, set: u32, entry: &PortEntry) -> Result<(), WriteError>;
    fn del_port(&mut self, set: u32, entry: &PortEntry) -> Result<(), WriteError>;
    fn put_endpoint(&mut self, addr: IpAddr, value: EndpointValue) -> Result<(), WriteError>;
    fn del_endpoint(&mut self, addr: IpAddr);
    /// `ifindex` is below `sizes().max_ifindex`.
    fn set_iface(&mut self, ifindex: u32, value: IfaceValue) -> Result<(), WriteError>;
    /// What is in the maps (a restarted agent adopts it).
    fn read_endpoints(&self) -> Vec<(IpAddr, EndpointValue)>;
    fn read_peers(&self) -> Vec<(u32, PeerSlot, PeerValue)>;
    fn read_ports(&self) -> Vec<(u32, PortEntry)>;
    fn read_ifaces(&self) -> Vec<IfaceValue>;
}

fn write_error(e: &MapError) -> WriteError {
    match e {
        // Hash maps say E2BIG when full, LPM tries ENOSPC.
        MapError::SyscallError(s) if matches!(s.io_error.raw_os_error(), Some(7 | 28)) => {
            WriteError { full: true, message: format!("the map is full ({})", s.io_error) }
        }
        MapError::SyscallError(s) => WriteError { full: false, message: format!("{}: {}", s.call, s.io_error) },
        other => WriteError { full: false, message: other.to_string() },
    }
}

impl Maps for Datapath {
    fn sizes(&self) -> MapSizes {
        self.sizes
    }
    fn put_peer(&mut self, endpoint: u32, slot: &PeerSlot, value: PeerValue) -> Result<(), WriteError> {
        self.peers.insert(&slot.key(endpoint), value, 0).map_err(|e| write_error(&e))
    }
    fn del_peer(&mut self, endpoint: u32, slot: &PeerSlot) -> Result<(), WriteError> {
        self.peers.remove(&slot.key(endpoint)).map_err(|e| write_error(&e))
    }
    fn put_port(&mut self, set: u32, entry: &PortEntry) -> Result<(), WriteError> {
        self.ports.insert(&entry.key(set), entry.bits, 0).map_err(|e| write_error(&e))
    }
    fn del_port(&mut self, set: u32, entry: &PortEntry) -> Result<(), WriteError> {
        self.ports.remove(&entry.key(set)).map_err(|e| write_error(&e))
    }
    fn put_endpoint(&mut self, addr: IpAddr, value: EndpointValue) -> Result<(), WriteError> {
        self.endpoints.insert(keyed(addr), value, 0).map_err(|e| write_error(&e))
    }
    fn del_endpoint(&mut self, addr: IpAddr) {
        let _ = self.endpoints.remove(&keyed(addr));
    }
    fn set_iface(&mut self, ifindex: u32, value: IfaceValue) -> Result<(), WriteError> {
        self.ifaces.set(ifindex, value, 0).map_err(|e| write_error(&e))
    }
    fn read_endpoints(&self) -> Vec<(IpAddr, EndpointValue)> {
        self.endpoints.iter().flatten().map(|(k, v)| (decode_addr(&k.addr), v)).collect()
    }
    fn read_peers(&self) -> Vec<(u32, PeerSlot, PeerValue)> {
        self.peers.iter().flatten().map(|(k, v): (Key<PeerKey>, PeerValue)| (k.data().endpoint, PeerSlot::from_key(&k), v)).collect()
    }
    fn read_ports(&self) -> Vec<(u32, PortEntry)> {
        self.ports.iter().flatten().map(|(k, v): (Key<PortKey>, PortBits)| PortEntry::from_key(&k, v)).collect()
    }
    fn read_ifaces(&self) -> Vec<IfaceValue> {
        self.ifaces.iter().flatten().filter(|v| v.ifindex != 0).collect()
    }
}

/// One step of an endpoint's update.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// Write the port set's entries (if not all there yet).
    EnsureSet(u32),
    Put(PeerSlot, PeerValue),
    Del(PeerSlot),
    /// Write the endpoint's `ENDPOINTS` entries and interface slot with these flags and a
    /// new revision (and its wanted addresses and interface).
    Endpoint {
        flags: u32,
    },
    /// Remove the endpoint's `ENDPOINTS` entries and interface slot (the pod left).
    Unlist,
}

/// A port set in `PORTS`: its entries (written in order, deleted in reverse) and the
/// number of `PEERS` entries (present or planned) that refer to it.
struct SetState {
    entries: Arc<[PortEntry]>,
    written: usize,
    refs: usize,
}

#[derive(Default)]
struct PortSets {
    by_content: HashMap<Arc<[PortEntry]>, u32>,
    by_id: HashMap<u32, SetState>,
    next_id: u32,
    /// Entries in `PORTS`.
    written: usize,
    /// Sets nothing refers to: deleted by `collect`.
    garbage: BTreeSet<u32>,
}

impl PortSets {
    /// The id of the set with these entries (a new, unwritten set if there is none).
    fn intern(&mut self, entries: Vec<PortEntry>) -> u32 {
        if let Some(id) = self.by_content.get(entries.as_slice()) {
            return *id;
        }
        let mut id = self.next_id.max(1);
        while id == NO_PORT_SET || self.by_id.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        let entries: Arc<[PortEntry]> = entries.into();
        self.by_content.insert(entries.clone(), id);
        self.by_id.insert(id, SetState { entries, written: 0, refs: 0 });
        self.garbage.insert(id);
        id
    }

    fn add_ref(&mut self, id: u32) {
        if let Some(s) = self.by_id.get_mut(&id) {
            s.refs += 1;
            self.garbage.remove(&id);
        }
    }

    fn release(&mut self, id: u32) {
        if let Some(s) = self.by_id.get_mut(&id) {
            s.refs = s.refs.saturating_sub(1);
            if s.refs == 0 {
                self.garbage.insert(id);
            }
        }
    }

    /// Entries still to write for these sets.
    fn missing(&self, ids: &BTreeSet<u32>) -> usize {
        ids.iter().filter_map(|id| self.by_id.get(id)).map(|s| s.entries.len() - s.written).sum()
    }

    /// Writes the set's missing entries. `Ok(false)`: the deadline came first.
    fn ensure(&mut self, maps: &mut dyn Maps, id: u32, budget: &mut Budget, report: &mut SyncReport) -> Result<bool, WriteError> {
        let Some(s) = self.by_id.get_mut(&id) else { return Ok(true) };
        while s.written < s.entries.len() {
            if budget.spent() {
                return Ok(false);
            }
            maps.put_port(id, &s.entries[s.written])?;
            s.written += 1;
            self.written += 1;
            report.written_entries += 1;
        }
        Ok(true)
    }

    /// Deletes sets nothing refers to. `false`: the deadline came first.
    fn collect(&mut self, maps: &mut dyn Maps, budget: &mut Budget, report: &mut SyncReport) -> bool {
        while let Some(&id) = self.garbage.iter().next() {
            let Some(s) = self.by_id.get_mut(&id) else {
                self.garbage.remove(&id);
                continue;
            };
            if s.refs > 0 {
                self.garbage.remove(&id);
                continue;
            }
            while s.written > 0 {
                if budget.spent() {
                    return false;
                }
                s.written -= 1;
                let _ = maps.del_port(id, &s.entries[s.written]);
                self.written -= 1;
                report.deleted_entries += 1;
            }
            let entries = s.entries.clone();
            self.by_id.remove(&id);
            self.by_content.remove(&*entries);
            self.garbage.remove(&id);
        }
        true
    }
}

/// When a sync must stop: a deadline, or (in tests) a number of map writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Budget {
    pub deadline: Option<Instant>,
    pub writes: Option<usize>,
}

impl Budget {
    pub fn until(deadline: Option<Instant>) -> Budget {
        Budget { deadline, writes: None }
    }

    /// Whether the budget is spent; otherwise counts one write against it.
    fn spent(&mut self) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return true;
        }
        match &mut self.writes {
            Some(0) => true,
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        }
    }
}

/// A `PEERS` value; `set_id`: the id of the table's port set of this index.
fn peer_value(allow: Allow, own_node: bool, set_id: impl FnOnce(usize) -> u32) -> PeerValue {
    let node = if own_node { PEER_OWN_NODE } else { 0 };
    match allow {
        Allow::All => PeerValue { port_set: NO_PORT_SET, flags: PEER_ALL | node },
        Allow::Nothing => PeerValue { port_set: NO_PORT_SET, flags: node },
        Allow::Ports(i) => PeerValue { port_set: set_id(i), flags: node },
    }
}

/// An endpoint's tables as map entries: flags and `PEERS` values (port sets by id).
struct Desired {
    flags: u32,
    peers: HashMap<PeerSlot, PeerValue>,
}

struct DpEndpoint {
    id: u32,
    revision: u32,
    /// In the maps: whether the endpoint entry was written, with which flags, addresses
    /// and interface, and its `PEERS` entries.
    listed: bool,
    flags: u32,
    addresses: Vec<IpAddr>,
    ifindex: u32,
    peers: HashMap<PeerSlot, PeerValue>,
    /// Wanted: the compiler's tables (`None` for a pod that left), addresses, interface.
    target: Option<EndpointTables>,
    want_addresses: Vec<IpAddr>,
    want_ifindex: u32,
    /// Steps left to reach the wanted state; `started` once one ran.
    plan: VecDeque<Op>,
    started: bool,
    /// The plan must pass the space check before it starts.
    check_space: bool,
    status: EndpointStatus,
    /// Fail-closed because of this; retried when this many entries are free.
    held_back: Option<(SyncError, usize, usize)>,
}

impl DpEndpoint {
    fn new(id: u32, revision: u32) -> DpEndpoint {
        DpEndpoint {
            id,
            revision,
            listed: false,
            flags: 0,
            addresses: Vec::new(),
            ifindex: 0,
            peers: HashMap::new(),
            target: None,
            want_addresses: Vec::new(),
            want_ifindex: 0,
            plan: VecDeque::new(),
            started: false,
            check_space: false,
            status: EndpointStatus::Enforced,
            held_back: None,
        }
    }
}

/// The datapath's view of the endpoints, and the id/revision bookkeeping.
#[derive(Default)]
pub struct MapSync {
    endpoints: BTreeMap<ObjectKey, DpEndpoint>,
    /// Pods that left (or that a previous agent left behind), being removed.
    leaving: Vec<(ObjectKey, DpEndpoint)>,
    /// Endpoints found in pinned maps at start, by id, until a pod claims them.
    adopted: BTreeMap<u32, DpEndpoint>,
    used_ids: BTreeSet<u32>,
    sets: PortSets,
    /// Entries in `PEERS`.
    peer_entries: usize,
    /// The maps' capacities (as of the last `adopt` or `run`).
    sizes: MapSizes,
    /// Service prefixes in the map.
    /// `SERVICES` as written: prefix (address, length) and value.
    services: BTreeMap<(policy_ebpf::Addr, u32), u32>,
    /// Failed map writes since start (for metrics).
    pub write_errors: u64,
    /// New endpoints' first revision is above this (a migration sharing the previous
    /// maps' connection tracking: their entries' revisions must never match ours).
    revision_floor: u32,
    /// Targets set from the entries that changed alone ([`MapSync::retarget_entries`]).
    pub entry_retargets: u64,
}

fn keyed(addr: IpAddr) -> EndpointKey {
    EndpointKey { addr: encode_addr(addr) }
}

/// The endpoint flag under which the kernel reads `direction`'s table (an audit table's
/// flag for `DIRECTION_AUDIT_*`).
pub(crate) fn isolation_bit(direction: u32) -> u32 {
    match direction {
        DIRECTION_INGRESS => ENDPOINT_INGRESS_ISOLATED,
        DIRECTION_EGRESS => ENDPOINT_EGRESS_ISOLATED,
        DIRECTION_AUDIT_INGRESS => ENDPOINT_AUDIT_INGRESS,
        _ => ENDPOINT_AUDIT_EGRESS,
    }
}

/// Every `PEERS` direction of an endpoint: its two tables, then its two audit tables.
const DIRECTIONS: [u32; 4] = [DIRECTION_INGRESS, DIRECTION_EGRESS, DIRECTION_AUDIT_INGRESS, DIRECTION_AUDIT_EGRESS];

/// An endpoint's tables with their `PEERS` directions: the enforced ones, then the audit
/// tables it has.
fn directed_tables(tables: &EndpointTables) -> impl Iterator<Item = (&PeerTable, u32)> {
    [(Some(&tables.ingress), DIRECTION_INGRESS), (Some(&tables.egress), DIRECTION_EGRESS)]
        .into_iter()
        .chain([
            (tables.audit.ingress.as_ref().map(|a| &a.table), DIRECTION_AUDIT_INGRESS),
            (tables.audit.egress.as_ref().map(|a| &a.table), DIRECTION_AUDIT_EGRESS),
        ])
        .filter_map(|(t, d)| t.map(|t| (t, d)))
}

/// The entries of two versions of one peer table (each sorted by prefix) that differ, each
/// with the new version's entry, or `None` where the new table has none for the prefix:
/// a prefix only one version has, or one whose node flag or port set changed.
fn changed_entries<'t>(old: &'t PeerTable, new: &'t PeerTable) -> Vec<(&'t PeerEntry, Option<&'t PeerEntry>)> {
    use std::cmp::Ordering;
    let mut changed = Vec::new();
    let (mut i, mut j) = (0, 0);
    loop {
        let order = match (old.entries.get(i), new.entries.get(j)) {
            (Some(x), Some(y)) => x.prefix.cmp(&y.prefix),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => return changed,
        };
        match order {
            Ordering::Less => {
                changed.push((&old.entries[i], None));
                i += 1;
            }
            Ordering::Greater => {
                changed.push((&new.entries[j], Some(&new.entries[j])));
                j += 1;
            }
            Ordering::Equal => {
                let (x, y) = (&old.entries[i], &new.entries[j]);
                if x.own_node != y.own_node || old.port_set(x) != new.port_set(y) {
                    changed.push((y, Some(y)));
                }
                i += 1;
                j += 1;
            }
        }
    }
}

/// The slot that IPv4's `0.0.0.0/0` and the stop in the mapped block share, and the value
/// table `t` of direction `dir` wants in it (`None`: no entry). Entries elsewhere in the
/// table decide it (see `peer_entries`), so a delta always looks at it again, as
/// `desired` would give it. `value` makes an entry's value (interning its port set).
fn mapped_block_entry(
    t: &PeerTable,
    dir: u32,
    mut value: impl FnMut(&PeerTable, Allow, bool) -> PeerValue,
) -> (PeerSlot, Option<PeerValue>) {
    let v4_everything = t.entries.binary_search_by(|e| e.prefix.cmp(&Prefix::everything(Family::Ipv4))).ok().map(|k| &t.entries[k]);
    let now = if let Some((_, allow, own_node)) = v4_everything.and_then(|e| peer_entry(t, e, dir)) {
        Some(value(t, allow, own_node))
    } else if mapped_block_stop(t, dir).is_some() {
        Some(peer_value(Allow::Nothing, false, |_| NO_PORT_SET))
    } else {
        None
    };
    (mapped_block_slot(dir), now)
}

/// Whether the kernel reads `direction`'s table of an endpoint with these flags.
fn visible(listed: bool, flags: u32, direction: u32) -> bool {
    listed && flags & ENDPOINT_FAIL_CLOSED == 0 && flags & isolation_bit(direction) != 0
}

fn next_revision(r: u32) -> u32 {
    // 0 means "not judged" and u32::MAX "not local" in connection tracking.
    match r.wrapping_add(1) {
        0 | u32::MAX => 1,
        n => n,
    }
}

/// The steps from the endpoint's state in the maps to `want` (see the module doc).
fn plan_ops(listed: bool, flags: u32, cur: &HashMap<PeerSlot, PeerValue>, want: &Desired, identity_changed: bool) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut sets = BTreeSet::new();
    let mut puts: [Vec<(PeerSlot, PeerValue)>; 4] = Default::default();
    for (slot, v) in &want.peers {
        if cur.get(slot) != Some(v) {
            if v.flags & PEER_ALL == 0 && v.port_set != NO_PORT_SET {
                sets.insert(v.port_set);
            }
            puts[slot.direction as usize & 3].push((*slot, *v));
        }
    }
    let mut dels: [Vec<PeerSlot>; 4] = Default::default();
    for slot in cur.keys() {
        if !want.peers.contains_key(slot) {
            dels[slot.direction as usize & 3].push(*slot);
        }
    }
    for d in DIRECTIONS {
        let i = d as usize;
        // Longest prefix first; ties in a fixed order (they are disjoint).
        puts[i].sort_by(|a, b| b.0.len.cmp(&a.0.len).then(a.0.cmp(&b.0)));
        dels[i].sort_by(|a, b| a.len.cmp(&b.len).then(a.cmp(b)));
    }
    ops.extend(sets.into_iter().map(Op::EnsureSet));
    let mut visible_before = false;
    for d in DIRECTIONS {
        let i = d as usize;
        if visible(listed, flags, d) {
            visible_before |= !puts[i].is_empty();
        } else {
            // The kernel ignores this table for now: clear what is not wanted first.
            ops.extend(std::mem::take(&mut dels[i]).into_iter().map(Op::Del));
        }
        ops.extend(puts[i].iter().map(|(s, v)| Op::Put(*s, *v)));
    }
    let flags_change = !listed || flags != want.flags;
    if flags_change {
        ops.push(Op::Endpoint { flags: want.flags });
    }
    let mut visible_after = false;
    for d in DIRECTIONS {
        let i = d as usize;
        visible_after |= visible(true, want.flags, d) && !dels[i].is_empty();
        ops.extend(dels[i].iter().map(|s| Op::Del(*s)));
    }
    let bump = if flags_change { visible_after } else { visible_before || visible_after || identity_changed };
    if bump {
        ops.push(Op::Endpoint { flags: want.flags });
    }
    ops
}

impl MapSync {
    pub fn new() -> MapSync {
        MapSync::default()
    }

    /// Reads what a previous agent left in the pinned maps: endpoints keep their ids, and
    /// their tables are changed from what is there (revisions go on increasing).
    pub fn adopt(&mut self, maps: &dyn Maps) {
        self.sizes = maps.sizes();
        for (ip, v) in maps.read_endpoints() {
            let ep = self.adopted.entry(v.id).or_insert_with(|| DpEndpoint::new(v.id, v.revision));
            ep.listed = true;
            ep.flags = v.flags;
            ep.revision = ep.revision.max(v.revision);
            ep.ifindex = v.ifindex;
            ep.addresses.push(ip);
            self.used_ids.insert(v.id);
        }
        let mut by_set: BTreeMap<u32, Vec<PortEntry>> = BTreeMap::new();
        for (id, e) in maps.read_ports() {
            by_set.entry(id).or_default().push(e);
        }
        for (id, mut entries) in by_set {
            entries.sort();
            let entries: Arc<[PortEntry]> = entries.into();
            self.sets.written += entries.len();
            self.sets.by_content.insert(entries.clone(), id);
            self.sets.by_id.insert(id, SetState { written: entries.len(), entries, refs: 0 });
            self.sets.garbage.insert(id);
            self.sets.next_id = self.sets.next_id.max(id.wrapping_add(1));
        }
        for (endpoint, slot, v) in maps.read_peers() {
            self.peer_entries += 1;
            // Entries of endpoints no longer listed are cleared by `collect_garbage`.
            let ep = self.adopted.entry(endpoint).or_insert_with(|| DpEndpoint::new(endpoint, 0));
            self.used_ids.insert(endpoint);
            if v.flags & PEER_ALL == 0 {
                self.sets.add_ref(v.port_set);
            }
            ep.peers.insert(slot, v);
        }
    }

    /// Makes new endpoints' revisions start above `floor`.
    pub fn set_revision_floor(&mut self, floor: u32) {
        self.revision_floor = floor;
    }

    pub fn status(&self, pod: &ObjectKey) -> Option<&EndpointStatus> {
        self.endpoints.get(pod).map(|e| &e.status)
    }

    /// The error that keeps a pod fail-closed, if any.
    pub fn error(&self, pod: &ObjectKey) -> Option<&SyncError> {
        self.endpoints.get(pod).and_then(|e| e.held_back.as_ref()).map(|(e, _, _)| e)
    }

    /// Pods fail-closed because their tables do not fit.
    pub fn too_big_count(&self) -> usize {
        self.endpoints.values().filter(|e| e.held_back.as_ref().is_some_and(|(e, _, _)| e.kind.is_too_big())).count()
    }

    /// Entries this agent keeps in `PEERS` and `PORTS`.
    pub fn entry_counts(&self) -> (usize, usize) {
        (self.peer_entries, self.sets.written)
    }

    /// The datapath id and revision of a pod.
    pub fn id_and_revision(&self, pod: &ObjectKey) -> Option<(u32, u32)> {
        self.endpoints.get(pod).map(|e| (e.id, e.revision))
    }

    /// The pods this knows.
    pub fn pods(&self) -> impl Iterator<Item = &ObjectKey> {
        self.endpoints.keys()
    }

    /// Whether the pod's endpoint entry is in the maps (its programs may be attached).
    pub fn is_listed(&self, pod: &ObjectKey) -> bool {
        self.endpoints.get(pod).is_some_and(|e| e.listed)
    }

    /// Whether updates are left to do (a deadline stopped them).
    pub fn has_work(&self) -> bool {
        !self.leaving.is_empty()
            || self.endpoints.values().any(|e| !e.plan.is_empty() || self.may_retry(e))
            || self.sets.garbage.iter().any(|id| self.sets.by_id.get(id).is_some_and(|s| s.refs == 0 && s.written > 0))
    }

    fn may_retry(&self, e: &DpEndpoint) -> bool {
        e.plan.is_empty() && e.held_back.as_ref().is_some_and(|(_, peers, ports)| self.sizes_fit(&self.sizes, *peers, *ports, true))
    }

    fn allocate_id(&mut self, addresses: &[IpAddr], max: u32) -> Option<DpEndpoint> {
        // What a previous agent left for this pod's address.
        let adopted = self.adopted.iter().find(|(_, e)| e.addresses.iter().any(|a| addresses.contains(a))).map(|(id, _)| *id);
        if let Some(id) = adopted {
            return self.adopted.remove(&id);
        }
        let id = (1..max).find(|i| !self.used_ids.contains(i))?;
        self.used_ids.insert(id);
        Some(DpEndpoint::new(id, self.revision_floor))
    }

    /// Sets what the maps should hold for `pod`, whose host-side veth is `ifindex`; the
    /// writes happen in [`MapSync::run`]. Cheap when nothing changed.
    pub fn set_target(&mut self, pod: &ObjectKey, tables: &EndpointTables, ifindex: u32, sizes: &MapSizes) -> Result<(), SyncError> {
        if let Some(e) = self.endpoints.get(pod) {
            if e.want_ifindex == ifindex && e.target.as_ref().is_some_and(|t| t.same_datapath(tables)) {
                return Ok(());
            }
        }
        if self.retarget_entries(pod, tables, ifindex) {
            return Ok(());
        }
        if !self.endpoints.contains_key(pod) {
            let Some(ep) = self.allocate_id(&tables.addresses, sizes.endpoints) else {
                self.write_errors += 1;
                return Err(SyncError { pod: pod.clone(), kind: SyncErrorKind::NoEndpointId { max: sizes.endpoints - 1 } });
            };
            self.endpoints.insert(pod.clone(), ep);
        }
        let desired = self.desired(tables);
        let mut ep = self.endpoints.remove(pod).expect("inserted above");
        ep.target = Some(tables.clone());
        ep.want_addresses = tables.addresses.clone();
        ep.want_ifindex = ifindex;
        ep.held_back = None;
        self.replan(&mut ep, &desired);
        self.endpoints.insert(pod.clone(), ep);
        Ok(())
    }

    /// [`MapSync::set_target`] for an endpoint whose maps hold its last target exactly (its
    /// plan ran to the end, nothing failed or was held back) and whose new tables differ
    /// from it in entries only (see [`MapSync::peers_delta`]), at the same addresses and
    /// interface: the plan covers the entries that changed, as a whole-table comparison's
    /// would. `false`: not such a case, nothing done.
    fn retarget_entries(&mut self, pod: &ObjectKey, tables: &EndpointTables, ifindex: u32) -> bool {
        let Some(mut ep) = self.endpoints.remove(pod) else { return false };
        let settled = ep.plan.is_empty()
            && ep.held_back.is_none()
            && ep.listed
            && ep.ifindex == ifindex
            && ep.want_ifindex == ifindex
            && ep.addresses == tables.addresses
            && ep.want_addresses == tables.addresses;
        let delta = match &ep.target {
            Some(old) if settled => self.peers_delta(&ep.peers, old, tables).filter(|(_, want)| want.flags == ep.flags),
            _ => None,
        };
        let Some((before, want)) = delta else {
            self.endpoints.insert(pod.clone(), ep);
            return false;
        };
        #[cfg(debug_assertions)]
        if let Some(old) = &ep.target {
            // The premise: what the maps hold is the last target's whole-table encoding.
            let full = self.desired(old);
            debug_assert!(full.peers == ep.peers && full.flags == ep.flags, "{pod}: the maps differ from the last target");
        }
        ep.target = Some(tables.clone());
        let ops = plan_ops(ep.listed, ep.flags, &before, &want, false);
        self.take_plan(&mut ep, ops);
        ep.started = false;
        ep.check_space = !ep.plan.is_empty();
        self.endpoints.insert(pod.clone(), ep);
        self.entry_retargets += 1;
        true
    }

    /// A pod that left the node: its endpoint entries go, then its table.
    pub fn remove_endpoint(&mut self, pod: &ObjectKey) {
        let Some(mut ep) = self.endpoints.remove(pod) else {
            return;
        };
        self.drop_plan(&mut ep);
        ep.target = None;
        ep.plan.push_back(Op::Unlist);
        let mut slots: Vec<PeerSlot> = ep.peers.keys().copied().collect();
        slots.sort();
        ep.plan.extend(slots.into_iter().map(Op::Del));
        self.leaving.push((pod.clone(), ep));
    }

    fn desired(&mut self, tables: &EndpointTables) -> Desired {
        let mut flags = 0;
        let mut peers = HashMap::new();
        for (table, dir) in directed_tables(tables) {
            if !table.isolated {
                continue;
            }
            flags |= isolation_bit(dir);
            let ids: Vec<Option<u32>> =
                table.port_sets.iter().map(|s| (!s.is_all() && !s.is_empty()).then(|| self.sets.intern(port_set_entries(s)))).collect();
            for (slot, allow, own_node) in peer_entries(table, dir) {
                peers.insert(slot, peer_value(allow, own_node, |i| ids[i].unwrap_or(NO_PORT_SET)));
            }
        }
        Desired { flags, peers }
    }

    /// What changes in `PEERS` from `old` to `new`, two versions of one endpoint's tables
    /// whose maps hold `old` exactly (`cur`: the entries written), when they differ in
    /// entries only: the same tables isolated, the same audit tables. For each slot that
    /// may change: its entry now (in the first map, if it has one) and the wanted one (in
    /// the second's peers; absent: none), from a merge of the two sorted entry lists. A
    /// pod that comes or goes under a peer that covers every pod changes one entry of
    /// each subject's table of thousands; the whole tables' maps need not be built and
    /// compared for it. `None`: the tables differ in more (compare whole tables).
    fn peers_delta(
        &mut self,
        cur: &HashMap<PeerSlot, PeerValue>,
        old: &EndpointTables,
        new: &EndpointTables,
    ) -> Option<(HashMap<PeerSlot, PeerValue>, Desired)> {
        let shape = |t: &EndpointTables| directed_tables(t).map(|(t, d)| (d, t.isolated)).collect::<Vec<_>>();
        let new_shape = shape(new);
        if shape(old) != new_shape {
            return None;
        }
        let flags = new_shape.iter().filter(|(_, isolated)| *isolated).fold(0, |f, (d, _)| f | isolation_bit(*d));
        let mut before: HashMap<PeerSlot, PeerValue> = HashMap::new();
        let mut want: HashMap<PeerSlot, PeerValue> = HashMap::new();
        for ((a, dir), (b, _)) in directed_tables(old).zip(directed_tables(new)) {
            if !b.isolated {
                continue;
            }
            let ids = &mut self.sets;
            let mut value = |t: &PeerTable, allow, own_node| peer_value(allow, own_node, |i| ids.intern(port_set_entries(&t.port_sets[i])));
            for (e, now) in changed_entries(a, b) {
                // An IPv6 prefix in the mapped block has no entry in either version.
                let Some(slot) = peer_slot(&e.prefix, dir) else { continue };
                if let Some(v) = cur.get(&slot) {
                    before.insert(slot, *v);
                }
                if let Some((_, allow, own_node)) = now.and_then(|e| peer_entry(b, e, dir)) {
                    want.insert(slot, value(b, allow, own_node));
                }
            }
            let (slot, now) = mapped_block_entry(b, dir, value);
            before.remove(&slot);
            want.remove(&slot);
            if let Some(v) = cur.get(&slot) {
                before.insert(slot, *v);
            }
            if let Some(v) = now {
                want.insert(slot, v);
            }
        }
        Some((before, Desired { flags, peers: want }))
    }

    /// Forgets the endpoint's remaining steps (the sets they would have used).
    fn drop_plan(&mut self, ep: &mut DpEndpoint) {
        for op in ep.plan.drain(..) {
            if let Op::Put(_, v) = op {
                if v.flags & PEER_ALL == 0 {
                    self.sets.release(v.port_set);
                }
            }
        }
        ep.started = false;
        ep.check_space = false;
    }

    fn replan(&mut self, ep: &mut DpEndpoint, want: &Desired) {
        let was_started = ep.started;
        self.drop_plan(ep);
        let sorted = |v: &[IpAddr]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        let identity_changed = sorted(&ep.addresses) != sorted(&ep.want_addresses) || ep.ifindex != ep.want_ifindex;
        let ops = plan_ops(ep.listed, ep.flags, &ep.peers, want, identity_changed);
        self.take_plan(ep, ops);
        // A plan that replaces one half-way goes on first, like the one it replaces.
        ep.started = was_started && !ep.plan.is_empty();
        ep.check_space = !ep.plan.is_empty();
    }

    fn take_plan(&mut self, ep: &mut DpEndpoint, ops: Vec<Op>) {
        for op in &ops {
            if let Op::Put(_, v) = op {
                if v.flags & PEER_ALL == 0 {
                    self.sets.add_ref(v.port_set);
                }
            }
        }
        ep.plan = ops.into();
    }

    /// (peak `PEERS` entries, final `PEERS` entries, `PORTS` entries to add) of a plan.
    fn plan_space(&self, ep: &DpEndpoint) -> (usize, usize, usize) {
        let mut adds = 0;
        let mut dels = 0;
        let mut sets = BTreeSet::new();
        for op in &ep.plan {
            match op {
                Op::Put(s, _) if !ep.peers.contains_key(s) => adds += 1,
                Op::Del(_) => dels += 1,
                Op::EnsureSet(id) => {
                    sets.insert(*id);
                }
                _ => {}
            }
        }
        (self.peer_entries + adds, (self.peer_entries + adds).saturating_sub(dels), self.sets.missing(&sets))
    }

    fn margin(capacity: u32) -> usize {
        capacity as usize / 16
    }

    fn sizes_fit(&self, sizes: &MapSizes, peers: usize, ports: usize, grows: bool) -> bool {
        let (pm, qm) = if grows { (Self::margin(sizes.peer_entries), Self::margin(sizes.port_entries)) } else { (0, 0) };
        self.peer_entries + peers + pm <= sizes.peer_entries as usize && self.sets.written + ports + qm <= sizes.port_entries as usize
    }

    /// The policies contributing entries to a table, largest first (entries counted per
    /// policy among an entry's rules, plus, for `PORTS`, its port sets' entries).
    fn contributors(tables: &EndpointTables, ports: bool) -> Vec<ObjectKey> {
        let mut weight: HashMap<&ObjectKey, usize> = HashMap::new();
        for (t, _) in directed_tables(tables) {
            let set_sizes: Vec<usize> = t.port_sets.iter().map(|s| if s.is_all() { 0 } else { port_set_entries(s).len() }).collect();
            for e in &t.entries {
                let mut seen = BTreeSet::new();
                for r in e.rules.iter() {
                    if seen.insert(&r.policy) {
                        *weight.entry(&r.policy).or_default() += if ports { set_sizes[e.port_set as usize] } else { 1 };
                    }
                }
            }
        }
        let mut v: Vec<(&ObjectKey, usize)> = weight.into_iter().filter(|(_, n)| *n > 0).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.into_iter().map(|(k, _)| k.clone()).collect()
    }

    /// Checks the space an endpoint's plan needs before it starts; makes the endpoint
    /// fail-closed alone (or rewrites it closed, see the module doc) when it does not fit.
    fn admit(&mut self, pod: &ObjectKey, ep: &mut DpEndpoint, sizes: &MapSizes) {
        ep.check_space = false;
        let (peak, fin, new_ports) = self.plan_space(ep);
        let cur = self.peer_entries;
        let grows = fin > cur || new_ports > 0;
        let margin_p = Self::margin(sizes.peer_entries);
        let margin_q = Self::margin(sizes.port_entries);
        let cap_p = sizes.peer_entries as usize;
        let cap_q = sizes.port_entries as usize;
        let peers_ok = if fin > cur { fin + margin_p <= cap_p && peak <= cap_p } else { peak <= cap_p };
        let ports_ok = new_ports == 0 || self.sets.written + new_ports + margin_q <= cap_q;
        if peers_ok && ports_ok {
            return;
        }
        let Some(tables) = ep.target.clone() else { return };
        if !grows && ports_ok {
            // Shrinks, but its removed entries kept to the end would not fit beside the new
            // ones: close it for the time of a rewrite (the only unordered change).
            let desired = self.desired(&tables);
            self.drop_plan(ep);
            let mut ops = plan_ops(ep.listed, ep.flags, &ep.peers, &Desired { flags: ENDPOINT_FAIL_CLOSED, peers: HashMap::new() }, false);
            ops.extend(plan_ops(true, ENDPOINT_FAIL_CLOSED, &HashMap::new(), &desired, true));
            self.take_plan(ep, ops);
            return;
        }
        // Too big: fail-closed alone, its entries freed; retried once it fits.
        let own = ep.peers.len();
        let needed_peers = tables.entry_count() + 2;
        let (map, needed, capacity, available, ports) = if !ports_ok {
            let needed: usize = directed_tables(&tables)
                .flat_map(|(t, _)| t.port_sets.iter())
                .filter(|s| !s.is_all())
                .map(|s| port_set_entries(s).len())
                .sum();
            ("PORTS", needed, cap_q, cap_q.saturating_sub(self.sets.written + margin_q), true)
        } else {
            ("PEERS", needed_peers.max(fin + own - cur), cap_p, cap_p.saturating_sub(cur - own + margin_p), false)
        };
        let err = SyncError {
            pod: pod.clone(),
            kind: SyncErrorKind::TooBig { needed_entries: needed, map, capacity, available, policies: Self::contributors(&tables, ports) },
        };
        self.drop_plan(ep);
        let ops = plan_ops(ep.listed, ep.flags, &ep.peers, &Desired { flags: ENDPOINT_FAIL_CLOSED, peers: HashMap::new() }, false);
        self.take_plan(ep, ops);
        ep.status = EndpointStatus::FailClosed { error: err.kind.to_string() };
        // Retry when the final table and its new sets fit (beside what others hold).
        ep.held_back = Some((err, (fin + own).saturating_sub(cur), new_ports));
    }

    /// Runs the planned writes until done or `deadline`: pods that left first, then an
    /// update under way, updates that free room, then those that need it, then unused
    /// port sets. Errors go to `report` (that pod is left fail-closed).
    pub fn run(&mut self, maps: &mut dyn Maps, deadline: Option<Instant>, report: &mut SyncReport) {
        self.run_with(maps, &mut Budget::until(deadline), report)
    }

    /// [`MapSync::run`] within a [`Budget`].
    pub fn run_with(&mut self, maps: &mut dyn Maps, budget: &mut Budget, report: &mut SyncReport) {
        let sizes = maps.sizes();
        self.sizes = sizes;
        // Pods that left.
        while let Some((pod, mut ep)) = self.leaving.pop() {
            if !self.execute(maps, &pod, &mut ep, budget, report) {
                self.leaving.push((pod, ep));
                report.more_work = true;
                return;
            }
            self.used_ids.remove(&ep.id);
        }
        // Held-back endpoints that fit now get their plan back.
        let retry: Vec<ObjectKey> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.plan.is_empty() && e.held_back.as_ref().is_some_and(|(_, p, q)| self.sizes_fit(&sizes, *p, *q, true)))
            .map(|(k, _)| k.clone())
            .collect();
        for pod in retry {
            let mut ep = self.endpoints.remove(&pod).expect("listed above");
            if let Some(tables) = ep.target.clone() {
                let desired = self.desired(&tables);
                ep.held_back = None;
                self.replan(&mut ep, &desired);
            }
            self.endpoints.insert(pod, ep);
        }
        // Order: under way, freeing room (most first), needing room (least first).
        let mut order: Vec<(u8, i64, ObjectKey)> = self
            .endpoints
            .iter()
            .filter(|(_, e)| !e.plan.is_empty())
            .map(|(k, e)| {
                let (_, fin, ports) = self.plan_space(e);
                let delta = fin as i64 - self.peer_entries as i64 + ports as i64;
                let class = if e.started {
                    0
                } else if delta <= 0 {
                    1
                } else {
                    2
                };
                (class, delta, k.clone())
            })
            .collect();
        order.sort();
        for (_, _, pod) in order {
            let mut ep = self.endpoints.remove(&pod).expect("listed above");
            if ep.check_space {
                self.admit(&pod, &mut ep, &sizes);
            }
            let done = self.execute(maps, &pod, &mut ep, budget, report);
            if done {
                if let Some((err, _, _)) = &ep.held_back {
                    report.errors.push(err.clone());
                }
            }
            self.endpoints.insert(pod, ep);
            if !done {
                report.more_work = true;
                return;
            }
        }
        if !self.sets.collect(maps, budget, report) {
            report.more_work = true;
        }
    }

    /// Runs an endpoint's plan. `false`: the deadline came first.
    fn execute(&mut self, maps: &mut dyn Maps, pod: &ObjectKey, ep: &mut DpEndpoint, budget: &mut Budget, report: &mut SyncReport) -> bool {
        let had_plan = !ep.plan.is_empty();
        while let Some(op) = ep.plan.front().cloned() {
            if budget.spent() {
                return false;
            }
            ep.started = true;
            let result = match &op {
                Op::EnsureSet(id) => match self.sets.ensure(maps, *id, budget, report) {
                    Ok(true) => Ok(()),
                    Ok(false) => return false,
                    Err(e) => Err(("PORTS", e)),
                },
                Op::Put(slot, v) => match maps.put_peer(ep.id, slot, *v) {
                    Ok(()) => {
                        report.written_entries += 1;
                        match ep.peers.insert(*slot, *v) {
                            Some(old) => {
                                if old.flags & PEER_ALL == 0 {
                                    self.sets.release(old.port_set);
                                }
                            }
                            None => self.peer_entries += 1,
                        }
                        Ok(())
                    }
                    Err(e) => Err(("PEERS", e)),
                },
                Op::Del(slot) => {
                    if maps.del_peer(ep.id, slot).is_ok() {
                        report.deleted_entries += 1;
                    }
                    if let Some(old) = ep.peers.remove(slot) {
                        self.peer_entries -= 1;
                        if old.flags & PEER_ALL == 0 {
                            self.sets.release(old.port_set);
                        }
                    }
                    Ok(())
                }
                Op::Endpoint { flags } => self.write_endpoint(maps, ep, *flags, report).map_err(|e| ("ENDPOINTS", e)),
                Op::Unlist => {
                    for a in &ep.addresses {
                        maps.del_endpoint(*a);
                    }
                    // Unless the interface went to another pod by now.
                    if !self.endpoints.values().any(|e| e.listed && e.ifindex == ep.ifindex) {
                        clear_iface(maps, ep.ifindex);
                    }
                    ep.listed = false;
                    Ok(())
                }
            };
            ep.plan.pop_front();
            if let Err((map, e)) = result {
                self.fail(maps, pod, ep, map, e, matches!(op, Op::Endpoint { .. }), report);
            }
        }
        ep.started = false;
        if had_plan {
            report.endpoints_updated += 1;
            if ep.held_back.is_none() && ep.flags & ENDPOINT_FAIL_CLOSED == 0 && ep.listed {
                ep.status = EndpointStatus::Enforced;
            }
        }
        true
    }

    /// A write failed: the endpoint is made fail-closed and its entries are deleted.
    #[allow(clippy::too_many_arguments)]
    fn fail(
        &mut self,
        maps: &mut dyn Maps,
        pod: &ObjectKey,
        ep: &mut DpEndpoint,
        map: &'static str,
        e: WriteError,
        endpoint_write: bool,
        report: &mut SyncReport,
    ) {
        self.write_errors += 1;
        let err = SyncError { pod: pod.clone(), kind: SyncErrorKind::MapWrite { map, message: e.message } };
        report.errors.push(err.clone());
        ep.status = EndpointStatus::FailClosed { error: err.kind.to_string() };
        self.drop_plan(ep);
        if endpoint_write {
            // Whatever of it was written says fail-closed now; the table goes.
            let _ = self.write_endpoint(maps, ep, ENDPOINT_FAIL_CLOSED, report);
        }
        let ops = plan_ops(ep.listed, ep.flags, &ep.peers, &Desired { flags: ENDPOINT_FAIL_CLOSED, peers: HashMap::new() }, false);
        self.take_plan(ep, ops);
        ep.started = true;
        // Retried once the endpoint's whole table fits beside the others'.
        let need = ep.target.as_ref().map_or(0, |t| t.entry_count() + 2);
        ep.held_back = Some((err, need, 0));
    }

    fn write_endpoint(&mut self, maps: &mut dyn Maps, ep: &mut DpEndpoint, flags: u32, report: &mut SyncReport) -> Result<(), WriteError> {
        let sizes = maps.sizes();
        let revision = next_revision(ep.revision);
        let value = EndpointValue { id: ep.id, revision, ifindex: ep.want_ifindex, flags };
        let mut error = None;
        for a in &ep.want_addresses {
            if let Err(e) = maps.put_endpoint(*a, value) {
                error = Some(e);
            }
        }
        if ep.want_ifindex < sizes.max_ifindex {
            if let Err(e) = maps.set_iface(ep.want_ifindex, iface_value(&value, &ep.want_addresses)) {
                error = Some(e);
            }
        }
        if ep.listed {
            for a in ep.addresses.iter().filter(|a| !ep.want_addresses.contains(a)) {
                maps.del_endpoint(*a);
            }
            if ep.ifindex != ep.want_ifindex {
                clear_iface(maps, ep.ifindex);
            }
        }
        report.endpoint_writes += 1;
        ep.revision = revision;
        ep.flags = flags;
        ep.listed = true;
        ep.addresses = ep.want_addresses.clone();
        ep.ifindex = ep.want_ifindex;
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// After the first full sync following `adopt`: removes what a previous agent left
    /// that no pod claimed (endpoints, their entries, stray addresses and slots).
    pub fn collect_garbage(&mut self, maps: &mut dyn Maps, report: &mut SyncReport) {
        for (id, mut ep) in std::mem::take(&mut self.adopted) {
            ep.plan.push_back(Op::Unlist);
            let mut slots: Vec<PeerSlot> = ep.peers.keys().copied().collect();
            slots.sort();
            ep.plan.extend(slots.into_iter().map(Op::Del));
            self.leaving.push((ObjectKey::new("", format!("(endpoint {id} left by a previous agent)")), ep));
        }
        let live_addrs: BTreeSet<IpAddr> =
            self.endpoints.values().chain(self.leaving.iter().map(|(_, e)| e)).flat_map(|e| e.addresses.iter().copied()).collect();
        for (a, _) in maps.read_endpoints() {
            if !live_addrs.contains(&a) {
                maps.del_endpoint(a);
                report.deleted_entries += 1;
            }
        }
        let live_ifindexes: BTreeSet<u32> = self.endpoints.values().chain(self.leaving.iter().map(|(_, e)| e)).map(|e| e.ifindex).collect();
        for v in maps.read_ifaces() {
            if v.flags & ENDPOINT_FAIL_CLOSED != 0 && v.id == 0 {
                continue; // a held interface
            }
            if !live_ifindexes.contains(&v.ifindex) {
                clear_iface(maps, v.ifindex);
                report.deleted_entries += 1;
            }
        }
        self.run(maps, None, report);
    }

    /// Marks an interface fail-closed before any pod is known behind it.
    pub fn hold_interface(&mut self, maps: &mut dyn Maps, ifindex: u32) {
        if ifindex < maps.sizes().max_ifindex && !self.endpoints.values().any(|e| e.listed && e.ifindex == ifindex) {
            let _ = maps.set_iface(ifindex, IfaceValue { ifindex, flags: ENDPOINT_FAIL_CLOSED, ..IfaceValue::default() });
        }
    }

    /// Undoes `hold_interface` (unless a pod owns the interface by now).
    pub fn release_interface(&mut self, maps: &mut dyn Maps, ifindex: u32) {
        if !self.endpoints.values().any(|e| e.listed && e.ifindex == ifindex) {
            clear_iface(maps, ifindex);
        }
    }

    /// Sets where the egress of flows to Service addresses (VIPs, or Service CIDRs) is
    /// judged: after DNAT for every protocol (`all`, `SERVICE_DEFER_ALL`), for TCP only
    /// (`tcp_only`, `SERVICE_DEFER_TCP`), or before translation (`before`,
    /// `SERVICE_BEFORE_DNAT`: a VIP inside a CIDR of `all`). A prefix in several lists gets
    /// the last one's value. Writes only what is new or changed, deletes what went away.
    pub fn set_services(&mut self, dp: &mut Datapath, all: &[Prefix], tcp_only: &[Prefix], before: &[Prefix]) -> Result<(), String> {
        let mut want: BTreeMap<(policy_ebpf::Addr, u32), u32> = all.iter().map(|p| (encode_prefix(p), SERVICE_DEFER_ALL)).collect();
        want.extend(tcp_only.iter().map(|p| (encode_prefix(p), SERVICE_DEFER_TCP)));
        want.extend(before.iter().map(|p| (encode_prefix(p), SERVICE_BEFORE_DNAT)));
        for (&(addr, len), &value) in &want {
            if self.services.get(&(addr, len)) != Some(&value) {
                dp.services
                    .insert(&Key::new(len, addr), value, 0)
                    .map_err(|e| format!("writing Service prefix: {}", write_error(&e).message))?;
            }
        }
        for &(addr, len) in self.services.keys().filter(|k| !want.contains_key(k)) {
            let _ = dp.services.remove(&Key::new(len, addr));
        }
        self.services = want;
        Ok(())
    }
}

/// The `IFACES` slot of an endpoint: at most one address per family (as `status.podIPs`).
fn iface_value(v: &EndpointValue, addresses: &[IpAddr]) -> IfaceValue {
    let mut out = IfaceValue { id: v.id, revision: v.revision, flags: v.flags, ifindex: v.ifindex, ..IfaceValue::default() };
    if let Some(a) = addresses.iter().find(|a| a.is_ipv4()) {
        out.v4 = encode_addr(*a);
        out.flags |= IFACE_HAS_V4;
    }
    if let Some(a) = addresses.iter().find(|a| a.is_ipv6()) {
        out.v6 = encode_addr(*a);
        out.flags |= IFACE_HAS_V6;
    }
    out
}

fn clear_iface(maps: &mut dyn Maps, ifindex: u32) {
    if ifindex != 0 && ifindex < maps.sizes().max_ifindex {
        let _ = maps.set_iface(ifindex, IfaceValue::default());
    }
}

/// The address a 16-byte map address stands for.
pub fn decode_addr(a: &Addr) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(a.0);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use policy_model::{IpProtocol, PeerEntry, PeerTable, PortRange, PortSet, Protocol};

    use super::*;
    use crate::datapath::model::ModelMaps;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn pool() -> Vec<PortSet> {
        let mut v = vec![PortSet::all(), PortSet::empty()];
        v.push(PortSet::range(Protocol::Tcp, PortRange::single(1)));
        v.push(PortSet::range(Protocol::Tcp, PortRange { start: 1, end: 5 }));
        v.push(PortSet::range(Protocol::Udp, PortRange { start: 3, end: 9 }));
        let mut s = PortSet::range(Protocol::Tcp, PortRange { start: 2, end: 3 });
        s.insert(Protocol::Udp, PortRange { start: 1000, end: 5000 });
        v.push(s);
        v.push(PortSet::protocol(Protocol::Tcp));
        v
    }

    const PORTS: [u16; 12] = [0, 1, 2, 3, 4, 5, 6, 9, 10, 999, 1000, 5000];

    fn random_table(rng: &mut Rng) -> PeerTable {
        if rng.below(6) == 0 {
            return PeerTable::not_isolated();
        }
        let pool = pool();
        let mut entries: Vec<PeerEntry> = Vec::new();
        let mut sets: Vec<PortSet> = Vec::new();
        for _ in 0..rng.below(14) {
            let len = [8u8, 12, 16, 16, 20, 24, 24, 28, 32, 32][rng.below(10) as usize];
            let a = Ipv4Addr::new(10, rng.below(2) as u8, rng.below(4) as u8 * 16, rng.below(8) as u8 * 32);
            let bits = u32::from(a) & (u32::MAX << (32 - len as u32));
            let prefix = Prefix::new(IpAddr::V4(Ipv4Addr::from(bits)), len).unwrap();
            if entries.iter().any(|e| e.prefix == prefix) {
                continue;
            }
            let set = pool[rng.below(pool.len() as u64) as usize].clone();
            let index = match sets.iter().position(|s| *s == set) {
                Some(i) => i,
                None => {
                    sets.push(set);
                    sets.len() - 1
                }
            };
            let own_node = len == 32 && rng.below(2) == 0;
            entries.push(PeerEntry { prefix, port_set: index as u32, stands_for: Vec::new().into(), rules: Vec::new().into(), own_node });
        }
        entries.sort_by_key(|e| e.prefix);
        PeerTable { isolated: true, isolated_by: Vec::new(), entries, port_sets: sets }
    }

    fn tables(pod: &ObjectKey, addr: IpAddr, rng: &mut Rng) -> EndpointTables {
        let mut t = EndpointTables {
            pod: pod.clone(),
            addresses: vec![addr],
            ingress: random_table(rng),
            egress: random_table(rng),
            audit: Default::default(),
        };
        // Audit tables, sometimes (the kernel reads them in their own directions).
        for d in policy_model::Direction::BOTH {
            if rng.below(3) == 0 {
                *t.audit.get_mut(d) = Some(policy_model::AuditTable { audited: Vec::new(), table: random_table(rng) });
            }
        }
        t
    }

    /// Addresses to probe: each prefix's first and last address, and a few others.
    fn probe_addrs(rng: &mut Rng) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = Vec::new();
        for _ in 0..24 {
            let a = Ipv4Addr::new(10, rng.below(2) as u8, rng.below(64) as u8, rng.below(256) as u8);
            v.push(IpAddr::V4(a));
        }
        for b in [0u8, 1] {
            for c in [0u8, 15, 16, 48, 63] {
                for d in [0u8, 31, 32, 255] {
                    v.push(IpAddr::V4(Ipv4Addr::new(10, b, c, d)));
                }
            }
        }
        v.push("11.0.0.1".parse().unwrap());
        v
    }

    type Answers = Vec<Vec<bool>>;

    /// What the model's tables say, per (direction, address): a vector over protocols/ports.
    fn expected(t: &EndpointTables, addrs: &[IpAddr]) -> Answers {
        let mut out = Vec::new();
        let audit = |d| t.audit.get(d).map(|a| &a.table);
        let none = PeerTable::not_isolated();
        let audit_in = audit(policy_model::Direction::Ingress).unwrap_or(&none);
        let audit_eg = audit(policy_model::Direction::Egress).unwrap_or(&none);
        for table in [&t.ingress, &t.egress, audit_in, audit_eg] {
            for a in addrs {
                let mut v = Vec::new();
                for proto in [Protocol::Tcp, Protocol::Udp] {
                    for p in PORTS {
                        for node_stack in [true, false] {
                            v.push(table.allows_from(*a, IpProtocol::from(proto), p, node_stack));
                        }
                    }
                }
                out.push(v);
            }
        }
        out
    }

    /// What the (model) kernel answers now for the endpoint listed at `ep_addr`.
    fn observed(maps: &ModelMaps, ep_addr: IpAddr, addrs: &[IpAddr]) -> Option<(u32, Answers)> {
        let ep = maps.endpoint(ep_addr)?;
        let mut out = Vec::new();
        for dir in DIRECTIONS {
            for a in addrs {
                let mut v = Vec::new();
                for proto in [Protocol::Tcp, Protocol::Udp] {
                    for p in PORTS {
                        for node_stack in [true, false] {
                            v.push(maps.allows_from(&ep, dir, *a, proto.number(), p, node_stack));
                        }
                    }
                }
                out.push(v);
            }
        }
        Some((ep.revision, out))
    }

    /// Records what every endpoint answers after each map write.
    struct Recording<'a> {
        maps: &'a mut ModelMaps,
        eps: &'a [IpAddr],
        addrs: &'a [IpAddr],
        log: Vec<Vec<Option<(u32, Answers)>>>,
    }

    impl Recording<'_> {
        fn record(&mut self) {
            let states = self.eps.iter().map(|e| observed(self.maps, *e, self.addrs)).collect();
            self.log.push(states);
        }
    }

    impl Maps for Recording<'_> {
        fn sizes(&self) -> MapSizes {
            self.maps.sizes()
        }
        fn put_peer(&mut self, endpoint: u32, slot: &PeerSlot, value: PeerValue) -> Result<(), WriteError> {
            let r = self.maps.put_peer(endpoint, slot, value);
            self.record();
            r
        }
        fn del_peer(&mut self, endpoint: u32, slot: &PeerSlot) -> Result<(), WriteError> {
            let r = self.maps.del_peer(endpoint, slot);
            self.record();
            r
        }
        fn put_port(&mut self, set: u32, entry: &PortEntry) -> Result<(), WriteError> {
            let r = self.maps.put_port(set, entry);
            self.record();
            r
        }
        fn del_port(&mut self, set: u32, entry: &PortEntry) -> Result<(), WriteError> {
            let r = self.maps.del_port(set, entry);
            self.record();
            r
        }
        fn put_endpoint(&mut self, addr: IpAddr, value: EndpointValue) -> Result<(), WriteError> {
            let r = self.maps.put_endpoint(addr, value);
            self.record();
            r
        }
        fn del_endpoint(&mut self, addr: IpAddr) {
            self.maps.del_endpoint(addr);
            self.record();
        }
        fn set_iface(&mut self, ifindex: u32, value: IfaceValue) -> Result<(), WriteError> {
            self.maps.set_iface(ifindex, value)
        }
        fn read_endpoints(&self) -> Vec<(IpAddr, EndpointValue)> {
            self.maps.read_endpoints()
        }
        fn read_peers(&self) -> Vec<(u32, PeerSlot, PeerValue)> {
            self.maps.read_peers()
        }
        fn read_ports(&self) -> Vec<(u32, PortEntry)> {
            self.maps.read_ports()
        }
        fn read_ifaces(&self) -> Vec<IfaceValue> {
            self.maps.read_ifaces()
        }
    }

    /// Random old and new tables for two endpoints that share port sets, applied a few
    /// writes at a time (sometimes retargeted half-way): after every single map write,
    /// every address gets from each endpoint an answer (over all probed ports) of one of
    /// its tables, never a mix; while an endpoint shows its final revision, it answers as
    /// its final table does (connection tracking trusts flows approved under it); and
    /// the maps end equal to the final tables, with no port set left that nothing uses.
    #[test]
    fn every_intermediate_state_gives_old_or_new_answers() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let pods = [ObjectKey::new("x", "a"), ObjectKey::new("x", "b")];
        let eps: Vec<IpAddr> = vec!["10.250.9.1".parse().unwrap(), "10.250.9.2".parse().unwrap()];
        let sizes = MapSizes { peer_entries: 4096, port_entries: 4096, ..MapSizes::default() };
        let mut writes = 0;
        for trial in 0..120 {
            let addrs = probe_addrs(&mut rng);
            let mut maps = ModelMaps::new(sizes);
            let mut sync = MapSync::new();
            let mut targets: Vec<Vec<EndpointTables>> = Vec::new();
            for (i, pod) in pods.iter().enumerate() {
                let t = tables(pod, eps[i], &mut rng);
                sync.set_target(pod, &t, 10 + i as u32, &sizes).unwrap();
                targets.push(vec![t]);
            }
            let mut report = SyncReport::default();
            sync.run(&mut maps, None, &mut report);
            assert!(report.errors.is_empty() && !report.more_work);
            // The change: one or both endpoints.
            for (i, pod) in pods.iter().enumerate() {
                if i == 0 || rng.below(2) == 0 {
                    let t = tables(pod, eps[i], &mut rng);
                    sync.set_target(pod, &t, 10 + i as u32, &sizes).unwrap();
                    targets[i].push(t);
                }
            }
            let mut rec = Recording { maps: &mut maps, eps: &eps, addrs: &addrs, log: Vec::new() };
            let mut retargets = 0;
            loop {
                let mut report = SyncReport::default();
                let mut budget = Budget { deadline: None, writes: Some(1 + rng.below(4) as usize) };
                sync.run_with(&mut rec, &mut budget, &mut report);
                assert!(report.errors.is_empty(), "{:?}", report.errors);
                if !report.more_work {
                    break;
                }
                if retargets < 2 && rng.below(8) == 0 {
                    retargets += 1;
                    let i = rng.below(2) as usize;
                    let t = tables(&pods[i], eps[i], &mut rng);
                    sync.set_target(&pods[i], &t, 10 + i as u32, &sizes).unwrap();
                    targets[i].push(t);
                }
            }
            let log = std::mem::take(&mut rec.log);
            writes += log.len();
            let finals: Vec<(u32, Answers)> = eps.iter().map(|e| observed(&maps, *e, &addrs).unwrap()).collect();
            for i in 0..eps.len() {
                let allowed: Vec<Answers> = targets[i].iter().map(|t| expected(t, &addrs)).collect();
                let last = allowed.last().unwrap();
                assert_eq!(&finals[i].1, last, "trial {trial}: endpoint {i} ends with its final table");
                for (step, states) in log.iter().enumerate() {
                    let (rev, answers) = states[i].as_ref().expect("the endpoint stays listed");
                    for (j, a) in answers.iter().enumerate() {
                        assert!(
                            allowed.iter().any(|t| t[j] == *a),
                            "trial {trial} step {step}: endpoint {i}, direction {}, address {}: {a:?} is none of {:?}",
                            j / addrs.len(),
                            addrs[j % addrs.len()],
                            allowed.iter().map(|t| &t[j]).collect::<Vec<_>>()
                        );
                    }
                    if *rev == finals[i].0 {
                        assert_eq!(answers, last, "trial {trial} step {step}: endpoint {i} shows its final revision with another table");
                    }
                }
            }
            // Only the sets in use are left, each complete.
            let used: BTreeSet<u32> = maps.peers.values().filter(|v| v.flags & PEER_ALL == 0).map(|v| v.port_set).collect();
            let present: BTreeSet<u32> = maps.ports.keys().map(|k| k.0).collect();
            assert!(present.is_subset(&used), "trial {trial}: unused sets left: {present:?} vs {used:?}");
            assert_eq!(maps.peers.len(), sync.entry_counts().0);
            assert_eq!(maps.ports.len(), sync.entry_counts().1);
        }
        assert!(writes > 1000, "the trials wrote something: {writes}");
    }

    /// A random prefix of either family, IPv4 `0.0.0.0/0` among them, and IPv6 prefixes
    /// that cover the IPv4-mapped block, sit next to it or inside it.
    fn random_prefix(rng: &mut Rng) -> Prefix {
        let v6 = |s: &str, len: u8| Prefix::new(s.parse::<IpAddr>().unwrap(), len).unwrap();
        match rng.below(12) {
            0 => Prefix::everything(Family::Ipv4),
            1 => Prefix::everything(Family::Ipv6),
            2 => v6("::", 64),
            3 => v6("::ffff:0:0", 96),
            4 => v6("::ffff:10.0.0.0", 104),
            5 => v6("::ffff:10.0.0.1", 128),
            6 => v6("::fffe:0:0", 95),
            7 => Prefix::new(
                IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, rng.below(4) as u16)),
                [64u8, 128][rng.below(2) as usize],
            )
            .unwrap(),
            _ => {
                let len = [8u8, 16, 24, 32, 32][rng.below(5) as usize];
                let a = Ipv4Addr::new(10, rng.below(2) as u8, rng.below(4) as u8 * 16, rng.below(8) as u8 * 32);
                Prefix::new(IpAddr::V4(a), len).unwrap()
            }
        }
    }

    /// One small change to an isolated table: an entry added, removed, given another port
    /// set or another own-node mark.
    fn mutate(t: &mut PeerTable, rng: &mut Rng) {
        let pool = pool();
        match rng.below(4) {
            0 if !t.entries.is_empty() => {
                t.entries.remove(rng.below(t.entries.len() as u64) as usize);
            }
            1 if !t.entries.is_empty() => {
                let i = rng.below(t.entries.len() as u64) as usize;
                let set = t.port_set_id(&pool[rng.below(pool.len() as u64) as usize]);
                t.entries[i].port_set = set;
            }
            2 if !t.entries.is_empty() => {
                let i = rng.below(t.entries.len() as u64) as usize;
                t.entries[i].own_node = t.entries[i].prefix.is_host() && !t.entries[i].own_node;
            }
            _ => {
                let prefix = random_prefix(rng);
                if let Err(i) = t.entries.binary_search_by(|e| e.prefix.cmp(&prefix)) {
                    let port_set = t.port_set_id(&pool[rng.below(pool.len() as u64) as usize]);
                    t.entries.insert(
                        i,
                        PeerEntry { prefix, port_set, stands_for: Vec::new().into(), rules: Vec::new().into(), own_node: false },
                    );
                }
            }
        }
    }

    /// A `PEERS` entry with its port set's `PORTS` entries: (endpoint, slot, flags, set).
    type PeerContent = (u32, PeerSlot, u32, Vec<(u8, u16, u8, PortBits)>);

    /// The endpoints' `PEERS` entries with their port sets' contents (ids differ between
    /// two syncs).
    fn peer_contents(maps: &ModelMaps) -> BTreeSet<PeerContent> {
        maps.peers
            .iter()
            .map(|((ep, slot), v)| {
                let mut set: Vec<(u8, u16, u8, PortBits)> = maps
                    .ports
                    .iter()
                    .filter(|(k, _)| v.flags & PEER_ALL == 0 && k.0 == v.port_set)
                    .map(|(k, b)| (k.1, k.2, k.3, *b))
                    .collect();
                set.sort();
                (*ep, *slot, v.flags, set)
            })
            .collect()
    }

    /// Tables changed a few entries at a time, as a pod coming and going under a peer that
    /// covers every pod changes them, go to the maps through the entries that changed
    /// (`retarget_entries`), sometimes retargeted before a plan is done (whole tables
    /// then): the maps end as a fresh sync of the final tables writes them, and every
    /// address gets the final tables' answers.
    #[test]
    fn entry_changes_end_as_a_fresh_sync_of_the_final_tables() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let pod = ObjectKey::new("x", "a");
        let ep: IpAddr = "10.250.9.1".parse().unwrap();
        let sizes = MapSizes { peer_entries: 4096, port_entries: 4096, ..MapSizes::default() };
        let mut addrs = probe_addrs(&mut rng);
        // (Not IPv4-mapped IPv6: the maps take those for IPv4, see `peer_entries`.)
        addrs.extend(["fd00::1", "fd00::3", "fd01::1", "::1", "::fffe:0:1"].map(|a| a.parse::<IpAddr>().unwrap()));
        let mut retargets = 0;
        for trial in 0..200 {
            let mut maps = ModelMaps::new(sizes);
            let mut sync = MapSync::new();
            let mut t = tables(&pod, ep, &mut rng);
            sync.set_target(&pod, &t, 10, &sizes).unwrap();
            sync.run(&mut maps, None, &mut SyncReport::default());
            for _ in 0..1 + rng.below(6) {
                for d in policy_model::Direction::BOTH {
                    for _ in 0..1 + rng.below(3) {
                        if t.table(d).isolated {
                            mutate(t.table_mut(d), &mut rng);
                        }
                    }
                }
                sync.set_target(&pod, &t, 10, &sizes).unwrap();
                let mut budget = Budget { deadline: None, writes: (rng.below(3) == 0).then(|| 1 + rng.below(3) as usize) };
                let mut report = SyncReport::default();
                sync.run_with(&mut maps, &mut budget, &mut report);
                assert!(report.errors.is_empty(), "{:?}", report.errors);
            }
            let mut report = SyncReport::default();
            sync.run(&mut maps, None, &mut report);
            assert!(report.errors.is_empty() && !report.more_work);
            let mut fresh_maps = ModelMaps::new(sizes);
            let mut fresh = MapSync::new();
            fresh.set_target(&pod, &t, 10, &sizes).unwrap();
            fresh.run(&mut fresh_maps, None, &mut SyncReport::default());
            assert_eq!(peer_contents(&maps), peer_contents(&fresh_maps), "trial {trial}: {t:?}");
            assert!(observed(&maps, ep, &addrs).unwrap().1 == expected(&t, &addrs), "trial {trial}: the maps answer otherwise than {t:?}");
            // Every set in use is written, and no other.
            let used: BTreeSet<u32> =
                maps.peers.values().filter(|v| v.flags & PEER_ALL == 0 && v.port_set != NO_PORT_SET).map(|v| v.port_set).collect();
            let present: BTreeSet<u32> = maps.ports.keys().map(|k| k.0).collect();
            assert_eq!(present, used, "trial {trial}: the port sets written are not those in use");
            assert_eq!(maps.peers.len(), sync.entry_counts().0);
            assert_eq!(maps.ports.len(), sync.entry_counts().1);
            retargets += sync.entry_retargets;
        }
        assert!(retargets > 300, "the entries' path was taken: {retargets}");
    }
}
