//! The outside network of `from: outside` probes and ExternalName Services.

use std::net::IpAddr;

use policy_model::Family;

use super::{load_balancer_ip, node_port, node_port_local};
use crate::case::{OUTSIDE_CLIENTS, outside_address};
use crate::netns::{Netns, unique};
use crate::topology::NodeNet;
use crate::traffic::Servers;

/// kube-proxy's mark for masquerade (KUBE-MARK-MASQ).
pub(super) const MASQUERADE_MARK: &str = "0x4000/0x4000";

/// The outside network of `from: outside` probes and ExternalName Services: one
/// namespace, linked to every node by a veth (`out0` on the node: a node device, so the
/// agent's programs are on it), holding the outside clients' addresses. Pods reach it
/// masqueraded to their node's address on the link, as a cluster's egress to the
/// internet is.
pub(super) struct Outside {
    pub(super) ns: Netns,
    /// What the outside serves (the ports of ExternalName Services), on every address.
    pub(super) _servers: Option<Servers>,
}

impl Outside {
    /// The node side of node `i`'s link: where the outside reaches its NodePorts.
    pub(super) fn node_side(i: usize, family: Family) -> IpAddr {
        match family {
            Family::Ipv4 => format!("203.0.113.{}", 4 * i + 1).parse().unwrap(),
            Family::Ipv6 => format!("2001:db8:1:{i}::1").parse().unwrap(),
        }
    }

    pub(super) fn outside_side(i: usize, family: Family) -> IpAddr {
        match family {
            Family::Ipv4 => format!("203.0.113.{}", 4 * i + 2).parse().unwrap(),
            Family::Ipv6 => format!("2001:db8:1:{i}::2").parse().unwrap(),
        }
    }

    /// The outside network, serving `ports` (TCP, UDP and SCTP) if any.
    pub(super) fn create(nodes: &[NodeNet], ports: &[u16]) -> Result<Outside, String> {
        let e = |e: crate::netns::NetnsError| e.to_string();
        let ns = Netns::create(&unique("cfo")).map_err(e)?;
        ns.ip(&["link", "set", "lo", "up"]).map_err(e)?;
        for family in [Family::Ipv4, Family::Ipv6] {
            for c in OUTSIDE_CLIENTS {
                let a = outside_address(c, family).expect("outside client");
                let (fam, len) = if family == Family::Ipv4 { ("-4", 32) } else { ("-6", 128) };
                ns.ip(&[fam, "addr", "add", &format!("{a}/{len}"), "dev", "lo"]).map_err(e)?;
            }
        }
        for (i, node) in nodes.iter().enumerate() {
            let far = format!("n{i}");
            node.ns.ip(&["link", "add", "out0", "type", "veth", "peer", "name", &far, "netns", ns.name()]).map_err(e)?;
            for (family, fam, len) in [(Family::Ipv4, "-4", 30), (Family::Ipv6, "-6", 64)] {
                let (near_addr, far_addr) = (Outside::node_side(i, family), Outside::outside_side(i, family));
                let mut add = vec![fam, "addr", "add"];
                let near = format!("{near_addr}/{len}");
                let far_cidr = format!("{far_addr}/{len}");
                add.extend([near.as_str(), "dev", "out0"]);
                if family == Family::Ipv6 {
                    add.push("nodad");
                }
                node.ns.ip(&add).map_err(e)?;
                let mut add = vec![fam, "addr", "add", far_cidr.as_str(), "dev", far.as_str()];
                if family == Family::Ipv6 {
                    add.push("nodad");
                }
                ns.ip(&add).map_err(e)?;
            }
            node.ns.ip(&["link", "set", "out0", "up"]).map_err(e)?;
            ns.ip(&["link", "set", &far, "up"]).map_err(e)?;
            for (family, fam, clients) in [(Family::Ipv4, "-4", "198.51.100.0/24"), (Family::Ipv6, "-6", "2001:db8:100::/64")] {
                let via = Outside::outside_side(i, family).to_string();
                node.ns.ip(&[fam, "route", "add", clients, "via", &via, "dev", "out0"]).map_err(e)?;
                // kube-proxy's masquerade of marked traffic (KUBE-POSTROUTING): the address
                // the kernel picks for the pod's veth. With the link-local gateway on it
                // (routed), 169.254.1.1; with none (proxy-ARP), the node's own; on a
                // bridge, the bridge's.
                let tool = if family == Family::Ipv4 { "iptables" } else { "ip6tables" };
                node.ns
                    .exec(tool, &["-t", "nat", "-A", "POSTROUTING", "-m", "mark", "--mark", MASQUERADE_MARK, "-j", "MASQUERADE"])
                    .map_err(e)?;
                // Pods' own connections to the outside (an ExternalName's address).
                node.ns.exec(tool, &["-t", "nat", "-A", "POSTROUTING", "-o", "out0", "-j", "MASQUERADE"]).map_err(e)?;
            }
        }
        let servers = if ports.is_empty() { None } else { Some(crate::traffic::serve(&ns, ports).map_err(e)?) };
        Ok(Outside { ns, _servers: servers })
    }

    /// kube-proxy's rules on node `i` (`node`) for pod `index`'s port `port` from
    /// outside: its NodePorts (`externalTrafficPolicy` Cluster and Local) and its
    /// LoadBalancer IP, which the outside routes to this node. Cluster traffic is marked
    /// for the masquerade first, as KUBE-EXT chains do.
    pub(super) fn serve_pod(&self, node: &NodeNet, i: usize, index: usize, backend: IpAddr, port: u16) -> Result<(), String> {
        let family = Family::of(backend);
        let e = |e: crate::netns::NetnsError| e.to_string();
        let tool = if family == Family::Ipv4 { "iptables" } else { "ip6tables" };
        let node_side = Outside::node_side(i, family);
        let lb = load_balancer_ip(index, family);
        for (dst, dport, masquerade) in
            [(node_side, node_port(index, port), true), (node_side, node_port_local(index, port), false), (lb, port, true)]
        {
            if masquerade {
                let (d, p) = (dst.to_string(), dport.to_string());
                node.ns
                    .exec(
                        tool,
                        &[
                            "-t",
                            "nat",
                            "-A",
                            "PREROUTING",
                            "-d",
                            &d,
                            "-p",
                            "tcp",
                            "--dport",
                            &p,
                            "-j",
                            "MARK",
                            "--set-xmark",
                            MASQUERADE_MARK,
                        ],
                    )
                    .map_err(e)?;
            }
            node.dnat(dst, dport, backend, port, "tcp").map_err(e)?;
        }
        // The outside's route to the LoadBalancer IP: this node (`replace`: the pod's other
        // port set it already).
        let (fam, len) = if family == Family::Ipv4 { ("-4", 32) } else { ("-6", 128) };
        let (route, via, dev) = (format!("{lb}/{len}"), node_side.to_string(), format!("n{i}"));
        self.ns.ip(&[fam, "route", "replace", &route, "via", &via, "dev", &dev]).map_err(e)?;
        Ok(())
    }

    /// The outside's route to a LoadBalancer IP: node `i` (`replace`: it may have one).
    pub(super) fn route_load_balancer(&self, lb: IpAddr, i: usize) -> Result<(), String> {
        let family = Family::of(lb);
        let (fam, len) = if family == Family::Ipv4 { ("-4", 32) } else { ("-6", 128) };
        let (route, via, dev) = (format!("{lb}/{len}"), Outside::node_side(i, family).to_string(), format!("n{i}"));
        self.ns.ip(&[fam, "route", "replace", &route, "via", &via, "dev", &dev]).map(|_| ()).map_err(|e| e.to_string())
    }
}
