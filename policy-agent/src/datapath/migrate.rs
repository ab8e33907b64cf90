//! Where maps are pinned, and what a new agent does with maps another build pinned.
//!
//! Pins under the pin directory (`/sys/fs/bpf/policy-agent` by default):
//! - `links/<point>-<ifname>`: the tcx links, shared by every agent build (a new agent
//!   swaps its programs into them atomically);
//! - `maps-v<layout>-<sizes>-<generation>/PA_*`: one generation of maps, of layout
//!   `policy_ebpf::LAYOUT_VERSION` = `<layout>` and map sizes with digest `<sizes>`
//!   ([`sizes_tag`]). bpffs holds only pins and directories: the name says it all;
//! - `PA_*` directly in the pin directory: the maps of agents from before layouts were
//!   versioned ("legacy", layout 1). An agent of that time, started on pins a newer agent
//!   left, makes fresh ones there — except `PA_CONNTRACK` and `PA_PENDING`, which this
//!   build keeps pinned at the root too ([`BRIDGED`], while their layout is still that of
//!   layout 1): a rolled-back agent then shares connection tracking with the programs it
//!   replaces, so no flow is unknown to either while it swaps the links. Those two pins
//!   alone are not legacy maps.
//!
//! On start ([`plan`]): exactly one maps directory, ours (same layout and sizes), and no
//! legacy pins: adopt it (ids, revisions and entries are reused). Anything else — another
//! layout, other sizes, legacy pins, several generations (an interrupted migration, a
//! rollback and back) — migrates: new maps in a fresh generation, filled by the first
//! full sync while the old programs go on enforcing with the old maps; tracked
//! connections carried over where the layouts allow; then the programs swapped in every
//! pinned link; then every other generation removed (see `Enforcer`).

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapInfo};
use policy_ebpf::{CT_NOT_LOCAL, CtKey, CtValue, EndpointKey, EndpointValue, IfaceValue, LAYOUT_VERSION, map_names};

use super::loader::MapSizes;

/// Maps directories start with this (then the layout version).
const MAPS_PREFIX: &str = "maps-v";

/// Where the revision of a carried connection-tracking entry is set: no endpoint ever has
/// it, so the entry is judged again, once, against the new tables by its next packet.
pub const CARRIED_REVISION: u32 = CT_NOT_LOCAL - 1;

/// The layout of legacy pins (`PA_*` at the root of the pin directory).
pub const LEGACY_LAYOUT: u32 = 1;

/// Maps this build also pins at the root of the pin directory, under the names a legacy
/// agent looks for, when their layout is still layout 1's (see the module docs).
pub const BRIDGED: [&str; 2] = [map_names::CONNTRACK, map_names::PENDING];

/// The lowest revision a migrated generation uses: far above those of a legacy agent
/// starting on fresh maps, so that no flow a newer agent approved in connection tracking
/// they share is ever taken as approved by the legacy agent's tables (a legacy agent
/// judges it again).
pub const MIN_MIGRATED_REVISION: u32 = 1 << 24;

/// One set of pinned maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The directory holding its `PA_*` pins (the pin directory itself for legacy pins).
    pub path: PathBuf,
    /// Its layout version, if the name says (legacy: 1).
    pub layout: Option<u32>,
    /// Its sizes digest, if the name says.
    pub sizes: Option<String>,
    /// Generation number (legacy: 0); higher is newer.
    pub number: u64,
    pub legacy: bool,
}

impl Generation {
    pub fn describe(&self) -> String {
        if self.legacy {
            format!("legacy maps in {} (layout {LEGACY_LAYOUT})", self.path.display())
        } else {
            self.path.display().to_string()
        }
    }

    fn is_ours(&self, sizes: &MapSizes) -> bool {
        !self.legacy && self.layout == Some(LAYOUT_VERSION) && self.sizes.as_deref() == Some(sizes_tag(sizes).as_str())
    }
}

/// A digest of the map sizes (FNV-1a, 32 bits, hex): maps of other sizes are migrated.
pub fn sizes_tag(s: &MapSizes) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for v in [s.endpoint_addresses, s.peer_entries, s.port_entries, s.conntrack, s.pending, s.services, s.endpoints, s.max_ifindex] {
        for b in v.to_le_bytes() {
            h ^= b as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    format!("{h:08x}")
}

/// The directory name of a generation.
pub fn dir_name(layout: u32, sizes: &MapSizes, number: u64) -> String {
    format!("{MAPS_PREFIX}{layout}-{}-{number}", sizes_tag(sizes))
}

fn parse_dir_name(name: &str) -> Option<(Option<u32>, Option<String>, u64)> {
    let rest = name.strip_prefix(MAPS_PREFIX)?;
    let mut parts = rest.split('-');
    let layout = parts.next().and_then(|p| p.parse().ok());
    let sizes = parts.next().map(str::to_string);
    let number = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((layout, sizes, number))
}

/// Every generation of maps pinned in `pin_dir`, oldest first.
pub fn scan(pin_dir: &Path) -> io::Result<Vec<Generation>> {
    let mut out = Vec::new();
    let mut legacy = false;
    let dir = match std::fs::read_dir(pin_dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in dir {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("PA_") && !BRIDGED.contains(&name.as_str()) {
            legacy = true;
        } else if let Some((layout, sizes, number)) = parse_dir_name(&name) {
            out.push(Generation { path: entry.path(), layout, sizes, number, legacy: false });
        }
    }
    if legacy {
        out.push(Generation { path: pin_dir.to_path_buf(), layout: Some(LEGACY_LAYOUT), sizes: None, number: 0, legacy: true });
    }
    out.sort_by_key(|g| (g.number, g.path.clone()));
    Ok(out)
}

/// What a starting agent does with the pins it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Reuse this generation (ours, alone).
    Adopt(PathBuf),
    /// Make `new` and migrate from `old` (empty: a first start).
    Migrate { new: PathBuf, old: Vec<Generation> },
}

pub fn plan(pin_dir: &Path, sizes: &MapSizes) -> io::Result<Plan> {
    let found = scan(pin_dir)?;
    if let [only] = found.as_slice() {
        if only.is_ours(sizes) {
            return Ok(Plan::Adopt(only.path.clone()));
        }
    }
    let number = found.iter().map(|g| g.number).max().map_or(1, |n| n + 1);
    Ok(Plan::Migrate { new: pin_dir.join(dir_name(LAYOUT_VERSION, sizes, number)), old: found })
}

/// The maps `dump` should read: the only generation, or, while several exist (a
/// migration under way or interrupted, a rollback), the oldest — the one the links still
/// use until a migration swaps them. Errors if its layout is not this build's.
pub fn maps_dir_in_force(pin_dir: &Path) -> Result<PathBuf, String> {
    let found = scan(pin_dir).map_err(|e| format!("reading {}: {e}", pin_dir.display()))?;
    let Some(g) = found.first() else {
        return Err(format!("no maps pinned in {} (is the agent running, with this --pin-dir?)", pin_dir.display()));
    };
    match g.layout {
        Some(LAYOUT_VERSION) => Ok(g.path.clone()),
        other => Err(format!(
            "the maps in force ({}) have layout {}; this build reads layout {LAYOUT_VERSION}",
            g.describe(),
            other.map_or("unknown".to_string(), |v| v.to_string())
        )),
    }
}

/// Whether connection-tracking entries of maps of `layout` mean the same in ours.
pub fn conntrack_compatible(layout: Option<u32>) -> bool {
    layout.is_some_and(|l| {
        policy_ebpf::layout::same_items(
            l,
            LAYOUT_VERSION,
            &[
                "Addr",
                "CtKey",
                "CtValue",
                map_names::CONNTRACK,
                "CT_NOT_LOCAL",
                "CT_ORIG_IS_LO",
                "CT_VIA_SERVICE",
                "CT_TCP_CLOSING",
                "CT_TCP_RESET",
            ],
        )
    })
}

/// Whether pending Service judgments of maps of `layout` mean the same in ours.
pub fn pending_compatible(layout: Option<u32>) -> bool {
    conntrack_compatible(layout)
        && layout.is_some_and(|l| policy_ebpf::layout::same_items(l, LAYOUT_VERSION, &["PendingKey", map_names::PENDING]))
}

fn max_entries(path: &Path) -> Option<u32> {
    MapInfo::from_pin(path).ok().map(|i| i.max_entries())
}

/// The state maps (connection tracking, pending Service judgments) of the generation in
/// force (the oldest: the links use it until a migration swaps them) that the new
/// generation can use as they are: same layout and size. Old and new programs then share
/// them, so no flow is ever unknown to either during the swap. By name, with their pin.
pub fn shareable(old: &[Generation], sizes: &MapSizes) -> Vec<(&'static str, PathBuf)> {
    let Some(g) = old.first() else { return Vec::new() };
    let mut out = Vec::new();
    for (name, size, compatible) in [
        (map_names::CONNTRACK, sizes.conntrack, conntrack_compatible(g.layout)),
        (map_names::PENDING, sizes.pending, pending_compatible(g.layout)),
    ] {
        let path = g.path.join(name);
        if compatible && max_entries(&path) == Some(size) {
            out.push((name, path));
        }
    }
    out
}

/// The connection tracking map of the generation in force (the oldest), when the new
/// generation does not share it but its entries mean the same: the new programs then read
/// and write it too while the links are swapped (`PA_PREV_CT`).
pub fn previous_conntrack(old: &[Generation], shared: &[(&'static str, PathBuf)]) -> Option<PathBuf> {
    let g = old.first()?;
    if shared.iter().any(|(n, _)| *n == map_names::CONNTRACK) || !conntrack_compatible(g.layout) {
        return None;
    }
    let path = g.path.join(map_names::CONNTRACK);
    max_entries(&path).map(|_| path)
}

/// The root pins of [`BRIDGED`] maps this build can keep for a legacy agent: (name, pin).
pub fn bridges(pin_dir: &Path) -> Vec<(&'static str, PathBuf)> {
    BRIDGED
        .into_iter()
        .filter(|name| match *name {
            map_names::CONNTRACK => conntrack_compatible(Some(LEGACY_LAYOUT)),
            _ => pending_compatible(Some(LEGACY_LAYOUT)),
        })
        .map(|name| (name, pin_dir.join(name)))
        .collect()
}

/// A revision above every revision the generation `g` uses or its programs may still
/// write into shared connection tracking before the swap: the new generation's
/// revisions start there, so no shared entry is taken as approved by the new tables.
pub fn revision_floor(g: &Generation) -> u32 {
    let mut max = 0u32;
    let mut exact = false;
    let seen = |r: u32, max: &mut u32| {
        if r != CT_NOT_LOCAL && r != CARRIED_REVISION {
            *max = (*max).max(r);
        }
    };
    if policy_ebpf::layout::same_items(g.layout.unwrap_or(0), LAYOUT_VERSION, &["EndpointKey", "EndpointValue", "IfaceValue"]) {
        let endpoints = MapData::from_pin(g.path.join(map_names::ENDPOINTS))
            .ok()
            .and_then(|d| HashMap::<MapData, EndpointKey, EndpointValue>::try_from(aya::maps::Map::HashMap(d)).ok());
        let ifaces = MapData::from_pin(g.path.join(map_names::IFACES))
            .ok()
            .and_then(|d| Array::<MapData, IfaceValue>::try_from(aya::maps::Map::Array(d)).ok());
        if let (Some(e), Some(i)) = (endpoints, ifaces) {
            exact = true;
            for (_, v) in e.iter().flatten() {
                seen(v.revision, &mut max);
            }
            for v in i.iter().flatten() {
                seen(v.revision, &mut max);
            }
        }
    }
    if let Ok(d) = MapData::from_pin(g.path.join(map_names::CONNTRACK)) {
        if let Ok(ct) = HashMap::<MapData, CtKey, CtValue>::try_from(aya::maps::Map::LruHashMap(d)) {
            for (_, v) in ct.iter().flatten() {
                seen(v.src_rev, &mut max);
                seen(v.dst_rev, &mut max);
            }
        }
    }
    // Without the endpoints' own revisions, leave room for those not seen in flows yet.
    max.saturating_add(if exact { 0 } else { 1 << 20 }).max(MIN_MIGRATED_REVISION)
}

/// Copies the tracked connections of `old` into `new`, with their revisions replaced by
/// [`CARRIED_REVISION`] (0 "not judged yet" and `CT_NOT_LOCAL` kept): each carried flow is
/// judged again once against the new tables, whatever revisions the new maps use.
/// `keep_existing`: entries already in `new` (made by the new programs) win. Returns how
/// many were copied.
pub fn carry_conntrack(old: &Generation, new: &mut HashMap<MapData, CtKey, CtValue>, keep_existing: bool) -> Result<usize, String> {
    let path = old.path.join(map_names::CONNTRACK);
    let data = MapData::from_pin(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let map: HashMap<MapData, CtKey, CtValue> =
        HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(|e| format!("{}: {e}", path.display()))?;
    let carried = |r: u32| if r == 0 || r == CT_NOT_LOCAL { r } else { CARRIED_REVISION };
    let flags = if keep_existing {
        1 /* BPF_NOEXIST */
    } else {
        0
    };
    let mut n = 0;
    for (k, mut v) in map.iter().flatten() {
        v.src_rev = carried(v.src_rev);
        v.dst_rev = carried(v.dst_rev);
        if new.insert(k, v, flags).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Removes a generation's pins (its maps go when no program uses them any more).
pub fn remove(g: &Generation) -> io::Result<()> {
    if !g.legacy {
        return std::fs::remove_dir_all(&g.path);
    }
    for entry in std::fs::read_dir(&g.path)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("PA_") {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes() -> MapSizes {
        MapSizes::default()
    }

    fn mk(dir: &Path, names: &[&str]) {
        for n in names {
            if n.starts_with("PA_") {
                std::fs::write(dir.join(n), b"").unwrap();
            } else {
                std::fs::create_dir_all(dir.join(n)).unwrap();
            }
        }
    }

    #[test]
    fn plans() {
        let ours = dir_name(LAYOUT_VERSION, &sizes(), 3);
        let other_sizes = dir_name(LAYOUT_VERSION, &MapSizes { conntrack: 7, ..sizes() }, 4);
        let cases: Vec<(Vec<&str>, Option<&str>, Vec<u64>)> = vec![
            // (pins, adopted, old generations migrated from)
            (vec![], None, vec![]),
            (vec!["links"], None, vec![]),
            (vec!["links", &ours], Some(&ours), vec![]),
            // The pins kept for a rolled-back legacy agent are not legacy maps.
            (vec!["links", "PA_CONNTRACK", "PA_PENDING", &ours], Some(&ours), vec![]),
            (vec!["links", "PA_CONNTRACK", "PA_PENDING", "PA_PEERS", &ours], None, vec![0, 3]),
            (vec!["links", "PA_PEERS", "PA_ENDPOINTS"], None, vec![0]),
            (vec!["links", "PA_PEERS", &ours], None, vec![0, 3]),
            (vec!["links", &ours, &other_sizes], None, vec![3, 4]),
            (vec!["links", &other_sizes], None, vec![4]),
            (vec!["maps-v99-00000000-7"], None, vec![7]),
        ];
        for (pins, adopted, old) in cases {
            let tmp = tempfile::tempdir().unwrap();
            mk(tmp.path(), &pins);
            let p = plan(tmp.path(), &sizes()).unwrap();
            match (adopted, p) {
                (Some(a), Plan::Adopt(dir)) => assert_eq!(dir, tmp.path().join(a), "{pins:?}"),
                (None, Plan::Migrate { new, old: found }) => {
                    assert_eq!(found.iter().map(|g| g.number).collect::<Vec<_>>(), old, "{pins:?}");
                    let n = old.iter().max().map_or(1, |n| n + 1);
                    assert_eq!(new, tmp.path().join(dir_name(LAYOUT_VERSION, &sizes(), n)), "{pins:?}");
                }
                (a, p) => panic!("{pins:?}: expected {a:?}, got {p:?}"),
            }
        }
    }

    #[test]
    fn removing_legacy_pins_keeps_links_and_generations() {
        let tmp = tempfile::tempdir().unwrap();
        let ours = dir_name(LAYOUT_VERSION, &sizes(), 1);
        mk(tmp.path(), &["links", "PA_PEERS", "PA_CONNTRACK", &ours]);
        let found = scan(tmp.path()).unwrap();
        remove(found.iter().find(|g| g.legacy).unwrap()).unwrap();
        assert_eq!(plan(tmp.path(), &sizes()).unwrap(), Plan::Adopt(tmp.path().join(&ours)));
        assert!(tmp.path().join("links").is_dir());
        assert_eq!(maps_dir_in_force(tmp.path()).unwrap(), tmp.path().join(&ours));
    }

    /// Maps of an older layout (3 to 8) are migrated (a new generation), with connection
    /// tracking and pending judgments shared: layout 4 added the flow event maps, layout 5
    /// audit mode (flags, directions and a verdict: constants only), layouts 6, 7, 8 and 9
    /// constants only.
    #[test]
    fn older_layouts_are_migrated_sharing_connection_tracking() {
        assert_eq!(LAYOUT_VERSION, 9);
        for old in [3, 4, 5, 6, 7, 8] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = dir_name(old, &sizes(), 5);
            mk(tmp.path(), &["links", &dir]);
            match plan(tmp.path(), &sizes()).unwrap() {
                Plan::Migrate { new, old: found } => {
                    assert_eq!(found.iter().map(|g| g.layout).collect::<Vec<_>>(), vec![Some(old)]);
                    assert_eq!(new, tmp.path().join(dir_name(LAYOUT_VERSION, &sizes(), 6)));
                }
                p => panic!("layout {old} maps must be migrated, not {p:?}"),
            }
            assert!(conntrack_compatible(Some(old)) && pending_compatible(Some(old)), "layout {old}");
        }
        assert!(!policy_ebpf::layout::same_items(3, 4, &[map_names::FLOWS]), "v3 has no flow events");
        let tables = ["PeerKey", "PeerValue", "PortKey", "EndpointValue", "IfaceValue", "FlowEvent", map_names::PEERS, map_names::FLOWS];
        assert!(policy_ebpf::layout::same_items(4, 5, &tables), "layout 5 changes no type nor map");
        assert!(!policy_ebpf::layout::same_items(4, 5, &["FLOW_VERDICT_AUDIT"]), "v4 has no audit verdict");
        assert!(policy_ebpf::layout::same_items(5, 6, &tables), "layout 6 changes no type nor map");
        assert!(!policy_ebpf::layout::same_items(5, 6, &["PEER_OWN_NODE"]), "v5 has no own-node entries");
        assert!(policy_ebpf::layout::same_items(6, 7, &tables), "layout 7 changes no type nor map");
        assert!(!policy_ebpf::layout::same_items(6, 7, &["SERVICE_DEFER_TCP"]), "v6 defers every protocol");
        assert!(policy_ebpf::layout::same_items(7, 8, &tables), "layout 8 changes no type nor map");
        assert!(!policy_ebpf::layout::same_items(7, 8, &["CT_TCP_FIN_ORIG"]), "v7 closes at the first FIN");
        assert!(policy_ebpf::layout::same_items(8, 9, &tables), "layout 9 changes no type nor map");
        assert!(!policy_ebpf::layout::same_items(8, 9, &["SERVICE_BEFORE_DNAT"]), "v8 defers a whole Service range");
    }

    #[test]
    fn connection_tracking_is_carried_within_a_layout() {
        assert!(conntrack_compatible(Some(LEGACY_LAYOUT)));
        // A rollback to a legacy agent shares both through the root pins.
        assert_eq!(bridges(Path::new("/p")).len(), BRIDGED.len());
        assert!(conntrack_compatible(Some(LAYOUT_VERSION)));
        assert!(!conntrack_compatible(None));
        assert!(!conntrack_compatible(Some(LAYOUT_VERSION + 1)));
        assert_ne!(sizes_tag(&sizes()), sizes_tag(&MapSizes { peer_entries: 1, ..sizes() }));
    }
}
