//! An emulated node: a network namespace holding the node's addresses, with pods in
//! namespaces of their own joined by veth pairs, in one of three layouts:
//! - routed: a /32 or /128 route per pod to its host-side veth, which holds the pods'
//!   link-local gateway (169.254.1.1, fe80::1);
//! - proxy-ARP (Calico's): the same routes, but the host-side veth holds no IPv4 address
//!   (its MAC is the pods' gateway, ee:ee:ee:ee:ee:ee, a permanent neighbour entry in the
//!   pod): the node's masquerade then picks a node address for traffic into a pod;
//! - bridged (the bridge CNI, kubenet): the host-side veths are ports of a bridge that holds
//!   the gateway of the node's pod subnets; pods are on-link with each other, and bridged
//!   traffic goes through netfilter (`br_netfilter`) as kube-proxy requires.
//!
//! Nodes can be joined by a link (`connect`), each routing the other's pod subnets to it.

use std::net::IpAddr;

use crate::netns::{Netns, NetnsError};

/// The gateway pods route through (answered by every host-side veth).
pub const GATEWAY_V4: &str = "169.254.1.1";
pub const GATEWAY_V6: &str = "fe80::1";

/// How a node joins its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Topology {
    Routed,
    Bridge,
    /// Routed, with no IPv4 address on the host-side veths.
    ProxyArp,
}

/// The MAC of every host-side veth in the proxy-ARP layout (Calico's).
pub const PROXY_ARP_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// The bridge of a bridged node.
pub const BRIDGE: &str = "cbr0";
/// The link between two nodes (the node's uplink).
pub const UPLINK: &str = "eth0";

pub struct NodeNet {
    pub ns: Netns,
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub topology: Topology,
    /// The node's index: its pod subnets are 10.244.<index>.0/24 and fd10:244:0:<index>::/64.
    pub index: usize,
}

/// The pod subnets of node `index` (the bridge's gateway is `.1` / `::1` in them).
pub fn pod_subnets(index: usize) -> [(IpAddr, u8); 2] {
    [(format!("10.244.{index}.0").parse().unwrap(), 24), (format!("fd10:244:0:{index}::").parse().unwrap(), 64)]
}

fn bridge_gateway(index: usize, v4: bool) -> IpAddr {
    if v4 { format!("10.244.{index}.1").parse().unwrap() } else { format!("fd10:244:0:{index}::1").parse().unwrap() }
}

pub struct PodNet {
    pub ns: Netns,
    pub ips: Vec<IpAddr>,
    /// The host-side veth, in the node's namespace.
    pub host_veth: String,
}

fn plen(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "32" } else { "128" }
}

impl NodeNet {
    /// A routed node namespace with `addresses`, forwarding on.
    pub fn create(ns_name: &str, node_name: &str, addresses: &[IpAddr]) -> Result<NodeNet, NetnsError> {
        NodeNet::create_with(ns_name, node_name, addresses, Topology::Routed, 0)
    }

    /// A node namespace with `addresses` in `topology`, node index `index`.
    pub fn create_with(
        ns_name: &str,
        node_name: &str,
        addresses: &[IpAddr],
        topology: Topology,
        index: usize,
    ) -> Result<NodeNet, NetnsError> {
        let ns = Netns::create(ns_name)?;
        // The node's own addresses live on loopback (this kernel has no dummy devices);
        // routes to pods name them as source, so node traffic comes from them.
        for a in addresses {
            if a.is_ipv4() {
                ns.ip(&["-4", "addr", "add", &format!("{a}/32"), "dev", "lo"])?;
            } else {
                ns.ip(&["-6", "addr", "add", &format!("{a}/128"), "dev", "lo"])?;
            }
        }
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        if topology == Topology::Bridge {
            // Multicast snooping off: neighbour solicitations reach a pod at once, as on a
            // plain L2 segment.
            ns.ip(&["link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0"])?;
            ns.ip(&["-4", "addr", "add", &format!("{}/24", bridge_gateway(index, true)), "dev", BRIDGE])?;
            ns.ip(&["-6", "addr", "add", &format!("{}/64", bridge_gateway(index, false)), "dev", BRIDGE, "nodad"])?;
            ns.ip(&["link", "set", BRIDGE, "up"])?;
            // kube-proxy's DNAT must see bridged replies (pod to pod on the bridge) to undo
            // itself: bridge netfilter, as kubenet and the bridge CNI require.
            ns.sysctl("net.bridge.bridge-nf-call-iptables", "1")?;
            ns.sysctl("net.bridge.bridge-nf-call-ip6tables", "1")?;
            // Node traffic to pods leaves from the node's address, not the bridge's.
            let [(net4, len4), (net6, len6)] = pod_subnets(index);
            for (net, len, v4) in [(net4, len4, true), (net6, len6, false)] {
                if let Some(src) = addresses.iter().find(|a| a.is_ipv4() == v4) {
                    // Replaces the connected route (metric 0 in IPv4, 256 in IPv6).
                    let (fam, metric) = if v4 { ("-4", "0") } else { ("-6", "256") };
                    ns.ip(&[fam, "route", "replace", &format!("{net}/{len}"), "dev", BRIDGE, "src", &src.to_string(), "metric", metric])?;
                }
            }
        }
        Ok(NodeNet { ns, name: node_name.to_string(), addresses: addresses.to_vec(), topology, index })
    }

    /// Joins two nodes by a veth pair (`UPLINK` in each), each routing the other's node
    /// addresses and pod subnets to it. IPv6 goes through link-local next hops.
    pub fn connect(a: &NodeNet, b: &NodeNet) -> Result<(), NetnsError> {
        a.ns.ip(&["link", "add", UPLINK, "type", "veth", "peer", "name", UPLINK, "netns", b.ns.name()])?;
        let link_local = |n: &NodeNet| format!("fe80::{:x}", n.index + 1);
        for n in [a, b] {
            n.ns.ip(&["-6", "addr", "add", &format!("{}/64", link_local(n)), "dev", UPLINK, "nodad"])?;
            // The uplink holds the node's addresses too, as a real node's does (the agent
            // tells its uplink from pods' veths by them).
            for addr in &n.addresses {
                if addr.is_ipv4() {
                    n.ns.ip(&["-4", "addr", "add", &format!("{addr}/32"), "dev", UPLINK])?;
                } else {
                    n.ns.ip(&["-6", "addr", "add", &format!("{addr}/128"), "dev", UPLINK, "nodad"])?;
                }
            }
            n.ns.ip(&["link", "set", UPLINK, "up"])?;
        }
        for (n, peer) in [(a, b), (b, a)] {
            let mut prefixes: Vec<(IpAddr, u8)> = peer.addresses.iter().map(|a| (*a, if a.is_ipv4() { 32 } else { 128 })).collect();
            prefixes.extend(pod_subnets(peer.index));
            let peer_v4 = peer.addresses.iter().find(|a| a.is_ipv4());
            for (net, len) in prefixes {
                let dest = format!("{net}/{len}");
                if net.is_ipv4() {
                    // The peer answers ARP for its loopback addresses (arp_ignore 0).
                    match peer_v4 {
                        Some(via) if *via != net => {
                            n.ns.ip(&["-4", "route", "add", &dest, "via", &via.to_string(), "dev", UPLINK, "onlink"])?
                        }
                        _ => n.ns.ip(&["-4", "route", "add", &dest, "dev", UPLINK])?,
                    };
                } else {
                    n.ns.ip(&["-6", "route", "add", &dest, "via", &link_local(peer), "dev", UPLINK])?;
                }
            }
        }
        Ok(())
    }

    fn address_of(&self, v4: bool) -> Option<IpAddr> {
        self.addresses.iter().copied().find(|a| a.is_ipv4() == v4)
    }

    /// A pod namespace `pod_ns` with `ips`, joined by veth `host_veth` (≤ 15 characters).
    pub fn add_pod(&self, pod_ns: &str, host_veth: &str, ips: &[IpAddr]) -> Result<PodNet, NetnsError> {
        match self.topology {
            Topology::Routed | Topology::ProxyArp => self.add_routed_pod(pod_ns, host_veth, ips),
            Topology::Bridge => self.add_bridged_pod(pod_ns, host_veth, ips),
        }
    }

    fn add_bridged_pod(&self, pod_ns: &str, host_veth: &str, ips: &[IpAddr]) -> Result<PodNet, NetnsError> {
        let pod = Netns::create(pod_ns)?;
        self.ns.ip(&["link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", pod_ns])?;
        self.ns.ip(&["link", "set", host_veth, "master", BRIDGE, "up"])?;
        // Hairpin, as the bridge CNI's `hairpinMode` and kubenet set it: a pod's packet to
        // its own Service comes back out of the port it came in by.
        self.ns.ip(&["link", "set", host_veth, "type", "bridge_slave", "hairpin", "on"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        for ip in ips {
            let len = if ip.is_ipv4() { 24 } else { 64 };
            if ip.is_ipv4() {
                pod.ip(&["-4", "addr", "add", &format!("{ip}/{len}"), "dev", "eth0"])?;
                pod.ip(&["-4", "route", "add", "default", "via", &bridge_gateway(self.index, true).to_string(), "dev", "eth0"])?;
            } else {
                pod.ip(&["-6", "addr", "add", &format!("{ip}/{len}"), "dev", "eth0", "nodad"])?;
                pod.ip(&["-6", "route", "add", "default", "via", &bridge_gateway(self.index, false).to_string(), "dev", "eth0"])?;
            }
        }
        Ok(PodNet { ns: pod, ips: ips.to_vec(), host_veth: host_veth.to_string() })
    }

    fn add_routed_pod(&self, pod_ns: &str, host_veth: &str, ips: &[IpAddr]) -> Result<PodNet, NetnsError> {
        let pod = Netns::create(pod_ns)?;
        self.ns.ip(&["link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", pod_ns])?;
        let proxy_arp = self.topology == Topology::ProxyArp;
        if proxy_arp {
            self.ns.ip(&["link", "set", "dev", host_veth, "address", PROXY_ARP_MAC])?;
        } else {
            self.ns.ip(&["-4", "addr", "add", &format!("{GATEWAY_V4}/32"), "dev", host_veth])?;
        }
        self.ns.ip(&["-6", "addr", "add", &format!("{GATEWAY_V6}/64"), "dev", host_veth, "nodad"])?;
        self.ns.ip(&["link", "set", host_veth, "up"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        for ip in ips {
            let cidr = format!("{ip}/{}", plen(ip));
            if ip.is_ipv4() {
                pod.ip(&["-4", "addr", "add", &cidr, "dev", "eth0"])?;
            } else {
                pod.ip(&["-6", "addr", "add", &cidr, "dev", "eth0", "nodad"])?;
            }
            // Node-originated traffic leaves from the node's own address.
            let mut route = vec![if ip.is_ipv4() { "-4" } else { "-6" }, "route", "add", &cidr, "dev", host_veth];
            let src = self.address_of(ip.is_ipv4()).map(|a| a.to_string());
            if let Some(s) = &src {
                route.extend(["src", s.as_str()]);
            }
            self.ns.ip(&route)?;
        }
        if ips.iter().any(IpAddr::is_ipv4) {
            if proxy_arp {
                // What proxy ARP would answer, fixed: the gateway is the host veth's MAC.
                pod.ip(&["-4", "neigh", "add", GATEWAY_V4, "lladdr", PROXY_ARP_MAC, "dev", "eth0", "nud", "permanent"])?;
            }
            pod.ip(&["-4", "route", "add", GATEWAY_V4, "dev", "eth0", "scope", "link"])?;
            pod.ip(&["-4", "route", "add", "default", "via", GATEWAY_V4, "dev", "eth0"])?;
        }
        if ips.iter().any(IpAddr::is_ipv6) {
            pod.ip(&["-6", "route", "add", "default", "via", GATEWAY_V6, "dev", "eth0"])?;
        }
        Ok(PodNet { ns: pod, ips: ips.to_vec(), host_veth: host_veth.to_string() })
    }

    /// kube-proxy's iptables DNAT for one Service port: `vip:port/proto` → `backend:target_port`
    /// (ip6tables for IPv6).
    pub fn dnat(&self, vip: IpAddr, port: u16, backend: IpAddr, target_port: u16, proto: &str) -> Result<(), NetnsError> {
        let (tool, dest) = if vip.is_ipv4() {
            ("iptables", format!("{backend}:{target_port}"))
        } else {
            ("ip6tables", format!("[{backend}]:{target_port}"))
        };
        self.ns
            .exec(
                tool,
                &[
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-d",
                    &vip.to_string(),
                    "-p",
                    proto,
                    "--dport",
                    &port.to_string(),
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &dest,
                ],
            )
            .map(|_| ())
    }

    /// The ifindex of an interface of the node's namespace.
    pub fn ifindex(&self, interface: &str) -> Result<u32, NetnsError> {
        let out = self.ns.ip(&["-o", "link", "show", "dev", interface])?;
        out.split(':').next().and_then(|n| n.trim().parse().ok()).ok_or_else(|| NetnsError::Command {
            command: format!("ip -o link show dev {interface}"),
            message: format!("unexpected output {out:?}"),
        })
    }
}

impl PodNet {
    pub fn ip(&self, v4: bool) -> IpAddr {
        self.ips.iter().copied().find(|a| a.is_ipv4() == v4).expect("pod has an address of that family")
    }
}
