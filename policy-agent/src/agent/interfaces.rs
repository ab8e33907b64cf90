//! Which host-side interface each local pod is behind, asked of the kernel with
//! rtnetlink. No CNI-specific interface names are assumed:
//! - routed CNIs give each pod a host route to its veth: the route names the device;
//! - bridge CNIs route the pod subnet to a bridge whose ports are the pods' veths: the
//!   neighbour entry of the pod's address gives its MAC, the bridge's forwarding database
//!   the port that MAC was learnt on. A pod the node has not talked to yet has no neighbour
//!   entry: resolution is then asked of the kernel (`NTF_USE`, what `ip neigh replace ..
//!   use` does: an ARP request or neighbour solicitation, no IP traffic to the pod).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::RouteAttribute;
use policy_model::ObjectKey;
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::debug;

use crate::datapath::PodInterface;

/// How long to wait for the answers to the neighbour resolutions a pass asked for (a
/// pod's veth answers in well under a millisecond).
const NEIGHBOUR_WAIT: Duration = Duration::from_millis(30);

pub struct InterfaceResolver {
    handle: Handle,
    /// The last answer per pod: kept while the pod's addresses and its veth stay, when the
    /// kernel momentarily cannot say (a bridge's learnt entry aged out of a silent pod).
    last: BTreeMap<ObjectKey, (Vec<IpAddr>, PodInterface)>,
}

#[derive(Debug, thiserror::Error)]
#[error("rtnetlink: {0}")]
pub struct NetlinkError(String);

/// The devices of the node that matter here.
#[derive(Default)]
struct Links {
    veths: BTreeMap<u32, String>,
    bridges: BTreeMap<u32, String>,
}

fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn neighbour_ip(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

fn neighbour_lladdr(n: &NeighbourMessage) -> Option<&[u8]> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => Some(l.as_slice()),
        _ => None,
    })
}

/// What the kernel knows of the pods behind bridges: (bridge, address) → MAC, and
/// (bridge, MAC) → the port it was learnt on.
#[derive(Default)]
struct BridgeTables {
    macs: BTreeMap<(u32, IpAddr), Vec<u8>>,
    ports: BTreeMap<(u32, Vec<u8>), u32>,
}

impl BridgeTables {
    fn port_of(&self, bridge: u32, ip: IpAddr) -> Option<u32> {
        let mac = self.macs.get(&(bridge, ip))?;
        self.ports.get(&(bridge, mac.clone())).copied()
    }
}

impl InterfaceResolver {
    /// Opens a netlink connection in the current network namespace (the node's).
    pub fn new() -> Result<InterfaceResolver, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| NetlinkError(e.to_string()))?;
        tokio::spawn(connection);
        Ok(InterfaceResolver { handle, last: BTreeMap::new() })
    }

    /// The output interface of the route to `ip`, if it is a device other than loopback.
    async fn route_oif(&self, ip: IpAddr) -> Option<u32> {
        let msg = match ip {
            IpAddr::V4(a) => RouteMessageBuilder::<std::net::Ipv4Addr>::new().destination_prefix(a, 32).build(),
            IpAddr::V6(a) => RouteMessageBuilder::<std::net::Ipv6Addr>::new().destination_prefix(a, 128).build(),
        };
        let mut routes = self.handle.route().get(msg).execute();
        let route = routes.try_next().await.ok()??;
        route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) if *i > 1 => Some(*i),
            _ => None,
        })
    }

    async fn links(&self) -> Links {
        let mut out = Links::default();
        let mut links = self.handle.link().get().execute();
        while let Ok(Some(link)) = links.try_next().await {
            let Some(name) = link_name(&link) else { continue };
            match link_kind(&link) {
                Some(InfoKind::Veth) => {
                    out.veths.insert(link.header.index, name);
                }
                Some(InfoKind::Bridge) => {
                    out.bridges.insert(link.header.index, name);
                }
                _ => {}
            }
        }
        out
    }

    /// Every veth device of the node: ifindex → name.
    pub async fn veths(&self) -> BTreeMap<u32, String> {
        self.links().await.veths
    }

    /// The devices holding an address of the node's own (not loopback, not link-local).
    async fn devices_with_node_addresses(&self) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        let mut addresses = self.handle.address().get().execute();
        while let Ok(Some(a)) = addresses.try_next().await {
            let node_address = a.attributes.iter().any(|attr| match attr {
                AddressAttribute::Address(IpAddr::V4(v4)) => !v4.is_link_local() && !v4.is_loopback(),
                AddressAttribute::Address(IpAddr::V6(v6)) => !v6.is_unicast_link_local() && !v6.is_loopback(),
                _ => false,
            });
            if node_address {
                out.insert(a.header.index);
            }
        }
        out
    }

    /// The veths that may be a pod's: not one holding an address of the node's own (an
    /// uplink that happens to be a veth, as in kind or a container-based node). Host-side
    /// pod veths hold no address, or a link-local gateway.
    pub async fn pod_candidate_veths(&self) -> BTreeMap<u32, String> {
        let mut veths = self.veths().await;
        for index in self.devices_with_node_addresses().await {
            veths.remove(&index);
        }
        veths
    }

    /// The devices that pod traffic can leave the node by, for the post-DNAT egress check:
    /// every Ethernet device that is up, except loopback, bridges and their ports (bonded
    /// or bridged devices are seen through their master), and pods' veths. Uplinks, VXLAN
    /// and Geneve tunnels qualify; L3 devices (IPIP, WireGuard) carry no Ethernet header
    /// and are left out.
    pub async fn node_devices(&self) -> BTreeSet<String> {
        let node_addressed = self.devices_with_node_addresses().await;
        let mut out = BTreeSet::new();
        let mut links = self.handle.link().get().execute();
        while let Ok(Some(link)) = links.try_next().await {
            let Some(name) = link_name(&link) else { continue };
            let up = link.header.flags.contains(LinkFlags::Up);
            let ether = link.header.link_layer_type == LinkLayerType::Ether;
            let enslaved = link.attributes.iter().any(|a| matches!(a, LinkAttribute::Controller(_)));
            let kind = link_kind(&link);
            let pod_veth = matches!(kind, Some(InfoKind::Veth)) && !node_addressed.contains(&link.header.index);
            if up && ether && !enslaved && !pod_veth && !matches!(kind, Some(InfoKind::Bridge)) {
                out.insert(name);
            }
        }
        out
    }

    /// The neighbour entries of the bridges and their forwarding databases.
    async fn bridge_tables(&self, bridges: &BTreeMap<u32, String>) -> BridgeTables {
        let mut t = BridgeTables::default();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut dump = self.handle.neighbours().get().set_address_family(family).execute();
            while let Ok(Some(n)) = dump.try_next().await {
                let usable = matches!(
                    n.header.state,
                    NeighbourState::Reachable
                        | NeighbourState::Stale
                        | NeighbourState::Delay
                        | NeighbourState::Probe
                        | NeighbourState::Permanent
                );
                if !usable || !bridges.contains_key(&n.header.ifindex) {
                    continue;
                }
                if let (Some(ip), Some(mac)) = (neighbour_ip(&n), neighbour_lladdr(&n)) {
                    t.macs.insert((n.header.ifindex, ip), mac.to_vec());
                }
            }
        }
        let mut fdb = self.handle.neighbours().get().set_address_family(AddressFamily::Bridge).execute();
        while let Ok(Some(n)) = fdb.try_next().await {
            // A port's own address is permanent; a pod's is learnt.
            if n.header.state == NeighbourState::Permanent {
                continue;
            }
            let bridge = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Controller(c) => Some(*c),
                _ => None,
            });
            if let (Some(bridge), Some(mac)) = (bridge, neighbour_lladdr(&n))
                && bridges.contains_key(&bridge)
            {
                t.ports.insert((bridge, mac.to_vec()), n.header.ifindex);
            }
        }
        t
    }

    /// Asks the kernel to resolve `ip`'s link-layer address on `bridge`.
    async fn ask_neighbour(&self, bridge: u32, ip: IpAddr) {
        let request = self.handle.neighbours().add(bridge, ip).flags(NeighbourFlags::Use).replace();
        if let Err(e) = request.execute().await {
            debug!(%ip, bridge, error = %e, "cannot ask for neighbour resolution");
        }
    }

    /// The interface of each pod (by its addresses; all that resolve must agree).
    pub async fn resolve(&mut self, pods: &[(ObjectKey, Vec<IpAddr>)]) -> BTreeMap<ObjectKey, PodInterface> {
        let links = self.links().await;
        // Each address's route: a veth, or a bridge to look behind.
        let mut oifs: BTreeMap<IpAddr, u32> = BTreeMap::new();
        for (_, ips) in pods {
            for ip in ips {
                if let Some(i) = self.route_oif(*ip).await {
                    oifs.insert(*ip, i);
                }
            }
        }
        let behind_bridge: Vec<(u32, IpAddr)> =
            oifs.iter().filter(|(_, i)| links.bridges.contains_key(i)).map(|(ip, i)| (*i, *ip)).collect();
        let mut tables = BridgeTables::default();
        if !behind_bridge.is_empty() {
            tables = self.bridge_tables(&links.bridges).await;
            let unknown: Vec<(u32, IpAddr)> = behind_bridge.iter().copied().filter(|(b, ip)| tables.port_of(*b, *ip).is_none()).collect();
            if !unknown.is_empty() {
                for (bridge, ip) in &unknown {
                    self.ask_neighbour(*bridge, *ip).await;
                }
                tokio::time::sleep(NEIGHBOUR_WAIT).await;
                tables = self.bridge_tables(&links.bridges).await;
            }
        }
        let port_of = |ip: &IpAddr| -> Option<u32> {
            let oif = *oifs.get(ip)?;
            if links.bridges.contains_key(&oif) { tables.port_of(oif, *ip) } else { Some(oif) }
        };

        let mut out = BTreeMap::new();
        let mut last = Vec::new();
        for (pod, ips) in pods {
            let mut found: Option<u32> = None;
            let mut consistent = true;
            for ip in ips {
                match (port_of(ip), found) {
                    (Some(i), None) => found = Some(i),
                    (Some(i), Some(f)) if i != f => consistent = false,
                    _ => {}
                }
            }
            let resolved = match (found, consistent) {
                (Some(ifindex), true) => links.veths.get(&ifindex).map(|name| PodInterface { name: name.clone(), ifindex }),
                _ => None,
            };
            let kept = || {
                let (last_ips, last) = self.last.get(pod)?;
                (last_ips == ips && links.veths.get(&last.ifindex) == Some(&last.name)).then(|| last.clone())
            };
            match resolved.or_else(kept) {
                Some(interface) => {
                    last.push((pod.clone(), Some((ips.clone(), interface.clone()))));
                    out.insert(pod.clone(), interface);
                }
                None => last.push((pod.clone(), None)),
            }
        }
        for (pod, answer) in last {
            match answer {
                Some(a) => self.last.insert(pod, a),
                None => self.last.remove(&pod),
            };
        }
        out
    }

    /// Forgets the last answers for pods not in `pods` (gone from the node).
    pub fn forget_others(&mut self, pods: &[(ObjectKey, Vec<IpAddr>)]) {
        let keep: BTreeSet<&ObjectKey> = pods.iter().map(|(p, _)| p).collect();
        self.last.retain(|pod, _| keep.contains(pod));
    }
}
