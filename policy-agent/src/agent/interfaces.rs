//! Which host-side interface each local pod is behind, asked of the kernel with
//! rtnetlink: the route to the pod's address names the device (routed CNIs give each pod a
//! host route to its veth). No CNI-specific interface names are assumed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use netlink_packet_route::route::RouteAttribute;
use policy_model::ObjectKey;
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::datapath::PodInterface;

pub struct InterfaceResolver {
    handle: Handle,
    names: BTreeMap<u32, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("rtnetlink: {0}")]
pub struct NetlinkError(String);

impl InterfaceResolver {
    /// Opens a netlink connection in the current network namespace (the node's).
    pub fn new() -> Result<InterfaceResolver, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| NetlinkError(e.to_string()))?;
        tokio::spawn(connection);
        Ok(InterfaceResolver { handle, names: BTreeMap::new() })
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

    /// The name of a veth device (`None` for anything else: a route through a bridge or
    /// an uplink does not identify a pod's interface).
    async fn veth_name(&mut self, ifindex: u32) -> Option<String> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let link = links.try_next().await.ok()??;
        let is_veth = link.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
            _ => false,
        });
        if !is_veth {
            return None;
        }
        let name = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })?;
        self.names.insert(ifindex, name.clone());
        Some(name)
    }

    /// Every veth device of the node: ifindex → name.
    pub async fn veths(&self) -> BTreeMap<u32, String> {
        let mut out = BTreeMap::new();
        let mut links = self.handle.link().get().execute();
        while let Ok(Some(link)) = links.try_next().await {
            let is_veth = link.attributes.iter().any(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
                _ => false,
            });
            let name = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            if let (true, Some(name)) = (is_veth, name) {
                out.insert(link.header.index, name);
            }
        }
        out
    }

    /// The interface of each pod (by its addresses; all must agree).
    pub async fn resolve(&mut self, pods: &[(ObjectKey, Vec<IpAddr>)]) -> BTreeMap<ObjectKey, PodInterface> {
        let mut out = BTreeMap::new();
        for (pod, ips) in pods {
            let mut found: Option<u32> = None;
            let mut consistent = true;
            for ip in ips {
                match (self.route_oif(*ip).await, found) {
                    (Some(i), None) => found = Some(i),
                    (Some(i), Some(f)) if i != f => consistent = false,
                    _ => {}
                }
            }
            let (Some(ifindex), true) = (found, consistent) else { continue };
            if let Some(name) = self.veth_name(ifindex).await {
                out.insert(pod.clone(), PodInterface { name, ifindex });
            }
        }
        out
    }
}
