//! An emulated node: a network namespace holding the node's addresses, with pods in
//! namespaces of their own joined by veth pairs and routed (a /32 or /128 route per pod to
//! its host-side veth, a link-local gateway in the pod), as routed CNIs do.

use std::net::IpAddr;

use crate::netns::{Netns, NetnsError};

/// The gateway pods route through (answered by every host-side veth).
pub const GATEWAY_V4: &str = "169.254.1.1";
pub const GATEWAY_V6: &str = "fe80::1";

pub struct NodeNet {
    pub ns: Netns,
    pub name: String,
    pub addresses: Vec<IpAddr>,
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
    /// A node namespace with `addresses`, forwarding on.
    pub fn create(ns_name: &str, node_name: &str, addresses: &[IpAddr]) -> Result<NodeNet, NetnsError> {
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
        Ok(NodeNet { ns, name: node_name.to_string(), addresses: addresses.to_vec() })
    }

    fn address_of(&self, v4: bool) -> Option<IpAddr> {
        self.addresses.iter().copied().find(|a| a.is_ipv4() == v4)
    }

    /// A pod namespace `pod_ns` with `ips`, joined by veth `host_veth` (≤ 15 characters).
    pub fn add_pod(&self, pod_ns: &str, host_veth: &str, ips: &[IpAddr]) -> Result<PodNet, NetnsError> {
        let pod = Netns::create(pod_ns)?;
        self.ns.ip(&["link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", pod_ns])?;
        self.ns.ip(&["-4", "addr", "add", &format!("{GATEWAY_V4}/32"), "dev", host_veth])?;
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
