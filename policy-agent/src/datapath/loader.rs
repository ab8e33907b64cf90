//! Loading, pinning and attaching the kernel programs.

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use policy_ebpf::{
    Addr, Counters, CtKey, CtValue, EndpointKey, EndpointValue, FlowStats, IfaceValue, PeerKey, PeerValue, PortBits, PortKey, global_names,
    map_names as names, program_names,
};

use super::program_bytes;

/// Where pins live by default. Enforcement outlives the agent through these pins.
pub const PIN_ROOT: &str = "/sys/fs/bpf/policy-agent";

/// Map capacities (see `policy-ebpf` for the defaults: 250 pods × 10,000 entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    pub endpoint_addresses: u32,
    pub peer_entries: u32,
    pub port_entries: u32,
    pub conntrack: u32,
    pub pending: u32,
    pub services: u32,
    /// Endpoint ids stay below this.
    pub endpoints: u32,
    /// Interfaces with an ifindex below this get the fast per-interface lookup.
    pub max_ifindex: u32,
}

impl Default for MapSizes {
    fn default() -> MapSizes {
        MapSizes {
            endpoint_addresses: policy_ebpf::DEFAULT_MAX_ENDPOINT_ADDRESSES,
            peer_entries: policy_ebpf::DEFAULT_MAX_PEER_ENTRIES,
            port_entries: policy_ebpf::DEFAULT_MAX_PORT_ENTRIES,
            conntrack: policy_ebpf::DEFAULT_MAX_CONNTRACK,
            pending: policy_ebpf::DEFAULT_MAX_PENDING,
            services: policy_ebpf::DEFAULT_MAX_SERVICES,
            endpoints: policy_ebpf::DEFAULT_MAX_ENDPOINTS,
            max_ifindex: policy_ebpf::DEFAULT_MAX_IFINDEX,
        }
    }
}

/// Which new flows the kernel programs report (`FlowEvent`s in `PA_FLOWS`), and how many
/// at most: set at load (read-only globals, so the verifier drops what is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowConfig {
    /// Denied new flows are reported.
    pub denied: bool,
    /// Allowed new flows: none (0), all (1), or one in N at random (N).
    pub allowed_every: u32,
    /// The most events per second on the node (split evenly over its CPUs); 0: none.
    pub rate_per_node: u32,
}

/// The default rate limit of flow events, per node.
pub const DEFAULT_FLOW_RATE: u32 = 1000;

impl Default for FlowConfig {
    /// Denied flows only, at most 1,000 events/s per node.
    fn default() -> FlowConfig {
        FlowConfig { denied: true, allowed_every: 0, rate_per_node: DEFAULT_FLOW_RATE }
    }
}

impl FlowConfig {
    /// No events at all.
    pub fn off() -> FlowConfig {
        FlowConfig { denied: false, allowed_every: 0, rate_per_node: 0 }
    }

    /// `none`, `denied`, `sampled:N` (denied ones and one allowed flow in N) or `all`, at
    /// the default rate.
    pub fn parse(s: &str) -> Result<FlowConfig, String> {
        let d = FlowConfig::default();
        match s {
            "none" => Ok(FlowConfig { denied: false, allowed_every: 0, ..d }),
            "denied" => Ok(d),
            "all" => Ok(FlowConfig { allowed_every: 1, ..d }),
            _ => match s.strip_prefix("sampled:").map(str::parse::<u32>) {
                Some(Ok(n)) if n >= 1 => Ok(FlowConfig { allowed_every: n, ..d }),
                _ => Err(format!("{s:?}: expected none, denied, sampled:N (N >= 1) or all")),
            },
        }
    }

    /// The globals' values over `cpus` CPUs: (denied, allowed_every, cost_ns, burst_ns).
    pub fn globals(&self, cpus: u32) -> (u8, u32, u64, u64) {
        if self.rate_per_node == 0 {
            return (0, 0, u64::MAX, 0);
        }
        let cost_ns = (cpus.max(1) as u64 * 1_000_000_000 / self.rate_per_node as u64).max(1);
        // A burst of a tenth of a second's worth (at least one event) per CPU.
        let burst_ns = 100_000_000u64;
        (self.denied as u8, self.allowed_every, cost_ns, burst_ns)
    }
}

/// Where a program goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttachPoint {
    /// tc egress of a pod's host-side veth (the pod's ingress).
    PodIngress,
    /// tc ingress of a pod's host-side veth (the pod's egress).
    PodEgress,
    /// tc egress of any other device of the node.
    NodeEgress,
    /// tc ingress of the same devices (notes where arriving packets came from).
    NodeIngress,
}

impl AttachPoint {
    fn program(self) -> &'static str {
        match self {
            AttachPoint::PodIngress => program_names::POD_INGRESS,
            AttachPoint::PodEgress => program_names::POD_EGRESS,
            AttachPoint::NodeEgress => program_names::NODE_EGRESS,
            AttachPoint::NodeIngress => program_names::NODE_INGRESS,
        }
    }

    fn tc(self) -> TcAttachType {
        match self {
            AttachPoint::PodEgress | AttachPoint::NodeIngress => TcAttachType::Ingress,
            AttachPoint::PodIngress | AttachPoint::NodeEgress => TcAttachType::Egress,
        }
    }

    /// A node device's program (not a pod veth's).
    pub fn is_node(self) -> bool {
        matches!(self, AttachPoint::NodeEgress | AttachPoint::NodeIngress)
    }

    fn pin_name(self) -> &'static str {
        match self {
            AttachPoint::PodIngress => "pod-ingress",
            AttachPoint::PodEgress => "pod-egress",
            AttachPoint::NodeEgress => "node-egress",
            AttachPoint::NodeIngress => "node-ingress",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot prepare the pin directory {path}: {source} (it must be on a BPF filesystem: mount -t bpf bpf /sys/fs/bpf)")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("loading the kernel programs failed (is this root, with BPF, on Linux >= 6.6?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("attaching {point:?} to {interface}: {message}")]
    Attach { interface: String, point: AttachPoint, message: String },
}

/// The loaded programs and typed handles on their (pinned) maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    maps_dir: PathBuf,
    pub(crate) endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    pub(crate) ifaces: Array<MapData, IfaceValue>,
    pub(crate) peers: LpmTrie<MapData, PeerKey, PeerValue>,
    pub(crate) ports: LpmTrie<MapData, PortKey, PortBits>,
    pub(crate) conntrack: HashMap<MapData, CtKey, CtValue>,
    pub(crate) services: LpmTrie<MapData, Addr, u32>,
    pub(crate) counters: PerCpuArray<MapData, Counters>,
    pub(crate) flow_stats: PerCpuArray<MapData, FlowStats>,
    pub sizes: MapSizes,
    pub flows: FlowConfig,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError> {
    let map =
        ebpf.take_map(name).ok_or(DatapathError::Map { name, source: aya::maps::MapError::InvalidName { name: name.to_string() } })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

impl Datapath {
    /// Loads the programs with their maps pinned in `maps_dir` (reusing maps already
    /// pinned there, so a restarted agent keeps its predecessor's tables and connections;
    /// see `migrate` for which directory) and links pinned in `pin_dir/links`.
    /// `share`: maps of another generation to use as they are (by name, their pin), pinned
    /// in `maps_dir` too. `prev_conntrack`: the pin of the connection tracking map of the
    /// programs being replaced, when it cannot be shared: the programs then also look
    /// flows up there and record new ones there, until reloaded without it (see
    /// `Enforcer::finish_migration`).
    pub fn load(
        pin_dir: &Path,
        maps_dir: &Path,
        sizes: MapSizes,
        share: &[(&'static str, PathBuf)],
        prev_conntrack: Option<&Path>,
    ) -> Result<Datapath, DatapathError> {
        Datapath::load_with(pin_dir, maps_dir, sizes, FlowConfig::default(), share, prev_conntrack)
    }

    /// [`Datapath::load`] with the flow events of `flows`.
    pub fn load_with(
        pin_dir: &Path,
        maps_dir: &Path,
        sizes: MapSizes,
        flows: FlowConfig,
        share: &[(&'static str, PathBuf)],
        prev_conntrack: Option<&Path>,
    ) -> Result<Datapath, DatapathError> {
        for dir in [pin_dir.join("links"), maps_dir.to_path_buf()] {
            std::fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
        }
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(maps_dir)
            .map_max_entries(names::ENDPOINTS, sizes.endpoint_addresses)
            .map_max_entries(names::IFACES, sizes.max_ifindex)
            .map_max_entries(names::PEERS, sizes.peer_entries)
            .map_max_entries(names::PORTS, sizes.port_entries)
            .map_max_entries(names::CONNTRACK, sizes.conntrack)
            .map_max_entries(names::PENDING, sizes.pending)
            .map_max_entries(names::SERVICES, sizes.services)
            .map_max_entries(names::COUNTERS, sizes.endpoints * 2);
        for (name, path) in share {
            loader.map_pin_path(name, path.as_path());
        }
        if let Some(path) = prev_conntrack {
            loader.map_pin_path(names::CONNTRACK_PREV, path).override_global(global_names::PREV_CT, &1u8, true);
        }
        let cpus = aya::util::online_cpus().map(|c| c.len() as u32).unwrap_or(1);
        let (denied, allowed_every, cost_ns, burst_ns) = flows.globals(cpus);
        loader
            .override_global(global_names::FLOW_DENIED, &denied, true)
            .override_global(global_names::FLOW_ALLOWED_EVERY, &allowed_every, true)
            .override_global(global_names::FLOW_COST_NS, &cost_ns, true)
            .override_global(global_names::FLOW_BURST_NS, &burst_ns, true);
        let mut ebpf = loader.load(program_bytes())?;
        for (name, _) in share {
            let pin = maps_dir.join(name);
            if !pin.exists() {
                let map = ebpf
                    .map(name)
                    .ok_or(DatapathError::Map { name, source: aya::maps::MapError::InvalidName { name: name.to_string() } })?;
                map.pin(&pin).map_err(|e| DatapathError::Map {
                    name,
                    source: aya::maps::MapError::PinError { name: Some(name.to_string()), error: e },
                })?;
            }
        }
        for name in [program_names::POD_INGRESS, program_names::POD_EGRESS, program_names::NODE_EGRESS, program_names::NODE_INGRESS] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Program { name, source: aya::programs::ProgramError::UnexpectedProgramType })?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(Datapath {
            endpoints: take(&mut ebpf, names::ENDPOINTS)?,
            ifaces: take(&mut ebpf, names::IFACES)?,
            peers: take(&mut ebpf, names::PEERS)?,
            ports: take(&mut ebpf, names::PORTS)?,
            conntrack: take(&mut ebpf, names::CONNTRACK)?,
            services: take(&mut ebpf, names::SERVICES)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
            flow_stats: take(&mut ebpf, names::FLOW_STATS)?,
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            maps_dir: maps_dir.to_path_buf(),
            sizes,
            flows,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Where this datapath's maps are pinned.
    pub fn maps_dir(&self) -> &Path {
        &self.maps_dir
    }

    fn link_pin(&self, interface: &str, point: AttachPoint) -> PathBuf {
        // bpffs names may not contain '.'.
        self.pin_dir.join("links").join(format!("{}-{interface}", point.pin_name()))
    }

    /// Attaches (tcx) a program to an interface of the current network namespace and pins
    /// the link, so it stays attached after this process exits. If a pinned link is
    /// already there (a previous agent), its program is replaced atomically: no packet
    /// goes unjudged across an agent restart or upgrade.
    pub fn attach(&mut self, interface: &str, point: AttachPoint) -> Result<(), DatapathError> {
        let pin = self.link_pin(interface, point);
        let err = |message: String| DatapathError::Attach { interface: interface.to_string(), point, message };
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(point.program())
            .ok_or_else(|| err("program missing".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| err(e.to_string()))?;
        match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                // The pin stays in place: the link keeps its pin throughout (a crash here
                // cannot drop the last reference to it, which would detach it), and only
                // its program changes.
                let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|e| err(format!("previous link: {e}")))?;
                let id = prog.attach_to_link(link).map_err(|e| err(format!("replacing the previous program: {e}")))?;
                // Closes this process's descriptor; the pin holds the link.
                drop(prog.take_link(id).map_err(|e| err(e.to_string()))?);
                Ok(())
            }
            Err(_) if !pin.exists() => {
                let id = prog
                    .attach_with_options(interface, point.tc(), TcAttachOptions::TcxOrder(LinkOrder::default()))
                    .map_err(|e| err(e.to_string()))?;
                let link = prog.take_link(id).map_err(|e| err(e.to_string()))?;
                let fd: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| err(e.to_string()))?;
                fd.pin(&pin).map_err(|e| err(format!("pinning the link: {e}")))?;
                Ok(())
            }
            Err(e) => Err(err(format!("reading the pinned link {}: {e}", pin.display()))),
        }
    }

    /// Detaches the program from an interface (a no-op if it is not attached).
    pub fn detach(&mut self, interface: &str, point: AttachPoint) -> Result<(), DatapathError> {
        let pin = self.link_pin(interface, point);
        if !pin.exists() {
            return Ok(());
        }
        let err = |message: String| DatapathError::Attach { interface: interface.to_string(), point, message };
        let link = PinnedLink::from_pin(&pin).map_err(|e| err(e.to_string()))?;
        // Dropping the last reference to an unpinned link detaches it.
        drop(link.unpin().map_err(|e| err(e.to_string()))?);
        Ok(())
    }

    /// Interfaces with a pinned link, as (interface, attach point).
    pub fn attached(&self) -> Vec<(String, AttachPoint)> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir(self.pin_dir.join("links")) else {
            return out;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            for point in [AttachPoint::PodIngress, AttachPoint::PodEgress, AttachPoint::NodeEgress, AttachPoint::NodeIngress] {
                if let Some(ifname) = name.strip_prefix(point.pin_name()).and_then(|r| r.strip_prefix('-')) {
                    out.push((ifname.to_string(), point));
                }
            }
        }
        out.sort();
        out
    }

    /// An endpoint's counters, [ingress, egress], summed over CPUs.
    pub fn counters(&self, endpoint: u32) -> [Counters; 2] {
        let mut out = [Counters::default(); 2];
        for (dir, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(endpoint * 2 + dir as u32), 0) {
                for c in values.iter() {
                    slot.allowed_packets += c.allowed_packets;
                    slot.allowed_bytes += c.allowed_bytes;
                    slot.denied_packets += c.denied_packets;
                    slot.denied_bytes += c.denied_bytes;
                }
            }
        }
        out
    }

    /// The flow events' counters (`emitted`, `suppressed`, `ring_full`), summed over CPUs.
    pub fn flow_stats(&self) -> FlowStats {
        let mut out = FlowStats::default();
        if let Ok(values) = self.flow_stats.get(&0, 0) {
            for s in values.iter() {
                out.emitted += s.emitted;
                out.suppressed += s.suppressed;
                out.ring_full += s.ring_full;
            }
        }
        out
    }

    /// The pin of the flow events ring buffer (read by `flows::reader`).
    pub fn flows_pin(&self) -> PathBuf {
        self.maps_dir.join(names::FLOWS)
    }

    /// The `ENDPOINTS` entry of an address, as the kernel sees it.
    pub fn endpoint_entry(&self, addr: std::net::IpAddr) -> Option<EndpointValue> {
        self.endpoints.get(&EndpointKey { addr: super::encode_addr(addr) }, 0).ok()
    }

    /// Pins this datapath's `name` map at `path` too (replacing what is pinned there).
    pub fn pin_map_at(&self, name: &'static str, path: &Path) -> io::Result<()> {
        let ours = MapData::from_pin(self.maps_dir.join(name)).map_err(|e| io::Error::other(format!("{name}: {e}")))?;
        let id = |m: &MapData| m.info().map(|i| i.id()).ok();
        if let Ok(there) = MapData::from_pin(path) {
            if id(&there).is_some() && id(&there) == id(&ours) {
                return Ok(());
            }
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        ours.pin(path).map_err(|e| io::Error::other(format!("pinning {name} at {}: {e}", path.display())))
    }

    /// Tracked connections: (key, value) pairs.
    pub fn conntrack_entries(&self) -> Vec<(CtKey, CtValue)> {
        self.conntrack.iter().flatten().collect()
    }

    /// Removes every link and map pin: enforcement stops. (`uninstall`.)
    pub fn unpin_all(self) -> io::Result<()> {
        let dir = self.pin_dir.clone();
        drop(self);
        std::fs::remove_dir_all(dir)
    }
}
