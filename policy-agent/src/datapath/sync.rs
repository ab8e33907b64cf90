//! Keeping the maps equal to the compiler's tables.
//!
//! An endpoint whose tables did not change costs no map write. One whose tables changed
//! gets a new revision, applied so that no packet ever sees half a policy: write the new
//! revision's entries, flip the endpoint's revision with one `ENDPOINTS` write per address,
//! then delete the old revision's entries. A failed write (a full map, anything) leaves
//! the endpoint fail-closed (it denies everything) and is reported with the pod's name;
//! other endpoints are unaffected.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use aya::maps::MapError;
use aya::maps::lpm_trie::Key;
use policy_ebpf::{ENDPOINT_FAIL_CLOSED, EndpointKey, EndpointValue, IFACE_HAS_V4, IFACE_HAS_V6, IfaceValue, PeerKey, PortKey};
use policy_model::{EndpointTables, ObjectKey, Prefix};

use super::encode::{EncodedTables, encode_addr, encode_prefix};
use super::loader::Datapath;

/// How an endpoint stands in the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointStatus {
    Enforced,
    /// Its tables could not be written: everything to and from it is denied.
    FailClosed {
        error: String,
    },
}

struct DpEndpoint {
    id: u32,
    revision: u32,
    ifindex: u32,
    addresses: Vec<IpAddr>,
    tables: EndpointTables,
    status: EndpointStatus,
    peer_keys: Vec<Key<PeerKey>>,
    port_keys: Vec<Key<PortKey>>,
}

#[derive(Debug, thiserror::Error)]
#[error("pod {pod}: {message}")]
pub struct SyncError {
    pub pod: ObjectKey,
    pub message: String,
}

/// What one sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub written_entries: usize,
    pub deleted_entries: usize,
    pub endpoints_updated: usize,
    pub errors: Vec<String>,
}

/// The datapath's view of the endpoints, and the id/revision bookkeeping.
#[derive(Default)]
pub struct MapSync {
    endpoints: BTreeMap<ObjectKey, DpEndpoint>,
    /// Ids and revisions found in pinned maps at start, by address.
    adopted: HashMap<IpAddr, (u32, u32)>,
    used_ids: BTreeSet<u32>,
    /// Service prefixes in the map.
    services: BTreeSet<(policy_ebpf::Addr, u32)>,
    /// Failed map writes since start (for metrics).
    pub write_errors: u64,
    /// New endpoints' first revision is above this (a migration sharing the previous
    /// maps' connection tracking: their entries' revisions must never match ours).
    revision_floor: u32,
}

fn keyed(addr: IpAddr) -> EndpointKey {
    EndpointKey { addr: encode_addr(addr) }
}

impl MapSync {
    pub fn new() -> MapSync {
        MapSync::default()
    }

    /// Reads what a previous agent left in the pinned maps, so endpoints keep their ids and
    /// revisions go on increasing (a reused revision could collide with live entries).
    pub fn adopt(&mut self, dp: &Datapath) {
        for item in dp.endpoints.iter().flatten() {
            let (k, v) = item;
            let ip = decode_addr(&k.addr);
            self.adopted.insert(ip, (v.id, v.revision));
            self.used_ids.insert(v.id);
        }
    }

    /// Makes new endpoints' revisions start above `floor`.
    pub fn set_revision_floor(&mut self, floor: u32) {
        self.revision_floor = floor;
    }

    pub fn status(&self, pod: &ObjectKey) -> Option<&EndpointStatus> {
        self.endpoints.get(pod).map(|e| &e.status)
    }

    /// Entries this agent keeps in `PEERS` and `PORTS`.
    pub fn entry_counts(&self) -> (usize, usize) {
        self.endpoints.values().fold((0, 0), |(p, q), e| (p + e.peer_keys.len(), q + e.port_keys.len()))
    }

    /// The datapath id and revision of a pod.
    pub fn id_and_revision(&self, pod: &ObjectKey) -> Option<(u32, u32)> {
        self.endpoints.get(pod).map(|e| (e.id, e.revision))
    }

    fn allocate_id(&mut self, addresses: &[IpAddr], max: u32) -> Option<(u32, u32)> {
        // Reuse what a previous agent gave this pod's address.
        for a in addresses {
            if let Some(&(id, rev)) = self.adopted.get(a) {
                if !self.endpoints.values().any(|e| e.id == id) {
                    return Some((id, rev));
                }
            }
        }
        let id = (1..max).find(|i| !self.used_ids.contains(i) && !self.endpoints.values().any(|e| e.id == *i))?;
        self.used_ids.insert(id);
        Some((id, self.revision_floor))
    }

    /// Makes the maps hold `tables` for `pod`, whose host-side veth is `ifindex`.
    pub fn sync_endpoint(
        &mut self,
        dp: &mut Datapath,
        pod: &ObjectKey,
        tables: &EndpointTables,
        ifindex: u32,
        report: &mut SyncReport,
    ) -> Result<(), SyncError> {
        if let Some(e) = self.endpoints.get(pod) {
            if e.status == EndpointStatus::Enforced && e.ifindex == ifindex && e.tables.same_datapath(tables) {
                return Ok(());
            }
        }
        let (id, last_rev) = match self.endpoints.get(pod) {
            Some(e) => (e.id, e.revision),
            None => match self.allocate_id(&tables.addresses, dp.sizes.endpoints) {
                Some(x) => x,
                None => {
                    self.write_errors += 1;
                    let err = SyncError {
                        pod: pod.clone(),
                        message: format!("no free endpoint id (at most {} endpoints)", dp.sizes.endpoints - 1),
                    };
                    report.errors.push(err.to_string());
                    return Err(err);
                }
            },
        };
        let revision = last_rev.wrapping_add(1).max(1);
        let enc = EncodedTables::new(tables, id, revision);
        report.endpoints_updated += 1;

        // 1. The new revision's entries.
        let mut written_peers: Vec<Key<PeerKey>> = Vec::with_capacity(enc.peers.len());
        let mut written_ports: Vec<Key<PortKey>> = Vec::with_capacity(enc.ports.len());
        let mut failure: Option<String> = None;
        for (k, v) in &enc.peers {
            match dp.peers.insert(k, v, 0) {
                Ok(()) => written_peers.push(*k),
                Err(e) => {
                    failure = Some(format!("writing a peer entry: {}", describe(&e)));
                    break;
                }
            }
        }
        if failure.is_none() {
            for k in &enc.ports {
                match dp.ports.insert(k, 1, 0) {
                    Ok(()) => written_ports.push(*k),
                    Err(e) => {
                        failure = Some(format!("writing a port entry: {}", describe(&e)));
                        break;
                    }
                }
            }
        }
        report.written_entries += written_peers.len() + written_ports.len();

        let old = self.endpoints.remove(pod);
        let (flags, status, peer_keys, port_keys) = match failure {
            None => (enc.flags, EndpointStatus::Enforced, written_peers, written_ports),
            Some(message) => {
                // Fail closed: drop what was written; the flag denies everything, and the
                // new revision makes established flows be judged again (and denied).
                self.write_errors += 1;
                report.deleted_entries += delete_all(dp, &written_peers, &written_ports);
                let err = SyncError { pod: pod.clone(), message: format!("{message}; the pod is fail-closed (all its traffic is denied)") };
                report.errors.push(err.to_string());
                (ENDPOINT_FAIL_CLOSED, EndpointStatus::FailClosed { error: err.message.clone() }, Vec::new(), Vec::new())
            }
        };

        // 2. The flip: the interface slot (both families at once) and one write per
        // address.
        let value = EndpointValue { id, revision, ifindex, flags };
        let mut flip_error = None;
        for a in &tables.addresses {
            if let Err(e) = dp.endpoints.insert(keyed(*a), value, 0) {
                flip_error = Some(format!("writing the endpoint entry for {a}: {}", describe(&e)));
            }
        }
        if ifindex < dp.sizes.max_ifindex {
            if let Err(e) = dp.ifaces.set(ifindex, iface_value(&value, &tables.addresses), 0) {
                flip_error = Some(format!("writing the interface entry for ifindex {ifindex}: {}", describe(&e)));
            }
        }
        if let Some(o) = &old {
            for a in o.addresses.iter().filter(|a| !tables.addresses.contains(a)) {
                let _ = dp.endpoints.remove(&keyed(*a));
            }
            if o.ifindex != ifindex {
                clear_iface(dp, o.ifindex);
            }
        }

        // 3. The old revision's entries.
        if let Some(o) = &old {
            report.deleted_entries += delete_all(dp, &o.peer_keys, &o.port_keys);
        }

        let status = match flip_error {
            Some(m) => {
                self.write_errors += 1;
                report.errors.push(format!("pod {pod}: {m}"));
                EndpointStatus::FailClosed { error: m }
            }
            None => status,
        };
        let failed = status != EndpointStatus::Enforced;
        let error = match &status {
            EndpointStatus::FailClosed { error } => error.clone(),
            EndpointStatus::Enforced => String::new(),
        };
        self.endpoints.insert(
            pod.clone(),
            DpEndpoint { id, revision, ifindex, addresses: tables.addresses.clone(), tables: tables.clone(), status, peer_keys, port_keys },
        );
        if failed {
            return Err(SyncError { pod: pod.clone(), message: error });
        }
        Ok(())
    }

    /// Removes a pod that left the node: its addresses, then its entries.
    pub fn remove_endpoint(&mut self, dp: &mut Datapath, pod: &ObjectKey, report: &mut SyncReport) {
        let Some(e) = self.endpoints.remove(pod) else {
            return;
        };
        for a in &e.addresses {
            let _ = dp.endpoints.remove(&keyed(*a));
        }
        clear_iface(dp, e.ifindex);
        report.deleted_entries += delete_all(dp, &e.peer_keys, &e.port_keys);
        self.used_ids.remove(&e.id);
    }

    /// After the first full sync following `adopt`: deletes entries of revisions and
    /// endpoints no longer in force (what a previous agent left behind).
    pub fn collect_garbage(&mut self, dp: &mut Datapath, report: &mut SyncReport) {
        let live_peers: BTreeSet<(u32, u32)> =
            self.endpoints.values().flat_map(|e| e.peer_keys.iter().map(|k| (k.data().endpoint, k.data().table))).collect();
        let live_tables: BTreeSet<(u32, u32)> = self
            .endpoints
            .values()
            .flat_map(|e| [(e.id, policy_ebpf::table_id(e.revision, 0)), (e.id, policy_ebpf::table_id(e.revision, 1))])
            .chain(live_peers)
            .collect();
        let stale_peers: Vec<Key<PeerKey>> =
            dp.peers.keys().flatten().filter(|k| !live_tables.contains(&(k.data().endpoint, k.data().table))).collect();
        let stale_ports: Vec<Key<PortKey>> =
            dp.ports.keys().flatten().filter(|k| !live_tables.contains(&(k.data().endpoint, k.data().table))).collect();
        report.deleted_entries += delete_all(dp, &stale_peers, &stale_ports);
        let live_addrs: BTreeSet<IpAddr> = self.endpoints.values().flat_map(|e| e.addresses.iter().copied()).collect();
        let stale_addrs: Vec<EndpointKey> = dp.endpoints.keys().flatten().filter(|k| !live_addrs.contains(&decode_addr(&k.addr))).collect();
        for k in stale_addrs {
            let _ = dp.endpoints.remove(&k);
            report.deleted_entries += 1;
        }
        let live_ifindexes: BTreeSet<u32> = self.endpoints.values().map(|e| e.ifindex).collect();
        let stale_slots: Vec<u32> =
            dp.ifaces.iter().flatten().filter(|v| v.ifindex != 0 && !live_ifindexes.contains(&v.ifindex)).map(|v| v.ifindex).collect();
        for i in stale_slots {
            clear_iface(dp, i);
            report.deleted_entries += 1;
        }
        self.adopted.clear();
    }

    /// Marks an interface fail-closed before any pod is known behind it.
    pub fn hold_interface(&mut self, dp: &mut Datapath, ifindex: u32) {
        if ifindex < dp.sizes.max_ifindex && !self.endpoints.values().any(|e| e.ifindex == ifindex) {
            let _ = dp.ifaces.set(ifindex, IfaceValue { ifindex, flags: ENDPOINT_FAIL_CLOSED, ..IfaceValue::default() }, 0);
        }
    }

    /// Undoes `hold_interface` (unless a pod owns the interface by now).
    pub fn release_interface(&mut self, dp: &mut Datapath, ifindex: u32) {
        if !self.endpoints.values().any(|e| e.ifindex == ifindex) {
            clear_iface(dp, ifindex);
        }
    }

    /// Sets the Service addresses (VIPs, or Service CIDRs) whose egress judgment waits for
    /// DNAT: writes only the prefixes that are new, deletes those that went away.
    pub fn set_services(&mut self, dp: &mut Datapath, prefixes: &[Prefix]) -> Result<(), String> {
        let want: BTreeSet<(policy_ebpf::Addr, u32)> = prefixes.iter().map(encode_prefix).collect();
        for (addr, len) in want.difference(&self.services) {
            dp.services.insert(&Key::new(*len, *addr), 1, 0).map_err(|e| format!("writing Service prefix: {}", describe(&e)))?;
        }
        for (addr, len) in self.services.difference(&want) {
            let _ = dp.services.remove(&Key::new(*len, *addr));
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

fn clear_iface(dp: &mut Datapath, ifindex: u32) {
    if ifindex < dp.sizes.max_ifindex {
        let _ = dp.ifaces.set(ifindex, IfaceValue::default(), 0);
    }
}

fn delete_all(dp: &mut Datapath, peers: &[Key<PeerKey>], ports: &[Key<PortKey>]) -> usize {
    let mut n = 0;
    for k in peers {
        if dp.peers.remove(k).is_ok() {
            n += 1;
        }
    }
    for k in ports {
        if dp.ports.remove(k).is_ok() {
            n += 1;
        }
    }
    n
}

fn describe(e: &MapError) -> String {
    match e {
        // Hash maps say E2BIG when full, LPM tries ENOSPC.
        MapError::SyscallError(s) if matches!(s.io_error.raw_os_error(), Some(7 | 28)) => format!("the map is full ({})", s.io_error),
        MapError::SyscallError(s) => format!("{}: {}", s.call, s.io_error),
        other => other.to_string(),
    }
}

/// The address a 16-byte map address stands for.
pub fn decode_addr(a: &policy_ebpf::Addr) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(a.0);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}
