//! The case's own Services (a case file's `services`): their addresses, their endpoints as
//! the endpoint controller finds them, the manifests the agent reads, and the NAT rules
//! kube-proxy (iptables mode) makes of them. Pure: the runner applies what this computes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use policy_model::{Family, Protocol};
use serde_json::{Value, json};

use crate::case::{ContainerPort, ServiceSpec, ServiceType, TargetPort, TrafficPolicy, node_index};
use crate::cluster::{PROTOCOLS, PodSpec, SERVED_PORTS, node_addresses};

/// The ClusterIP of the case's `index`-th Service (in `ns/name` order); the pods' own
/// Services use 10.96.0.x.
pub fn cluster_ip(index: usize, family: Family) -> IpAddr {
    match family {
        Family::Ipv4 => format!("10.96.1.{}", 10 + index).parse().unwrap(),
        Family::Ipv6 => format!("fd10:96::1:{:x}", 10 + index).parse().unwrap(),
    }
}

/// The NodePort of port `port_index` of the case's `index`-th Service (the pods' own
/// Services use 30000–31999).
pub fn node_port(index: usize, port_index: usize) -> u16 {
    32000 + 10 * index as u16 + port_index as u16
}

/// The LoadBalancer ingress IP of the case's `index`-th Service.
pub fn load_balancer_ip(index: usize, family: Family) -> IpAddr {
    match family {
        Family::Ipv4 => format!("203.0.113.{}", 200 + index).parse().unwrap(),
        Family::Ipv6 => format!("2001:db8:2::1:{:x}", index).parse().unwrap(),
    }
}

/// A pod as the endpoint controller sees it: only running pods with an address are
/// endpoints.
#[derive(Debug, Clone)]
pub struct PodView<'a> {
    pub spec: &'a PodSpec,
    /// Its container ports beyond the ones every pod serves.
    pub extra_ports: &'a [ContainerPort],
    /// Index of its node.
    pub node: usize,
}

impl PodView<'_> {
    /// The number of container port `name` for `protocol`, as a named targetPort
    /// resolves.
    fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        if let Some(c) = self.extra_ports.iter().find(|c| c.name == name && c.protocol == protocol) {
            return Some(c.port);
        }
        SERVED_PORTS.into_iter().find(|p| default_port_name(*p, protocol) == name)
    }
}

/// The name every pod gives its served port `port` for `protocol` (upstream's
/// `serve-80-tcp`).
pub fn default_port_name(port: u16, protocol: Protocol) -> String {
    format!("serve-{port}-{}", protocol.as_str().to_lowercase())
}

/// Every container port of a pod: the served ones and `extra`.
pub fn container_ports(extra: &[ContainerPort]) -> Vec<ContainerPort> {
    let mut out = Vec::new();
    for port in SERVED_PORTS {
        for proto in PROTOCOLS {
            let protocol: Protocol = serde_json::from_value(json!(proto)).expect("TCP, UDP, SCTP");
            out.push(ContainerPort { name: default_port_name(port, protocol), port, protocol });
        }
    }
    out.extend(extra.iter().cloned());
    out
}

/// One backend of a Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// The node it runs on (its own node for a node address).
    pub node: usize,
}

/// A case's Service as the cluster has it at a step.
#[derive(Debug, Clone)]
pub struct Resolved<'a> {
    pub key: String,
    pub index: usize,
    pub spec: &'a ServiceSpec,
    /// Per port of the spec, its backends (the endpoint controller's view).
    pub backends: Vec<Vec<Backend>>,
}

/// The case's Services at a step: `pods` are the running pods (with their node index),
/// `namespaces` those that exist (a deleted namespace's Services are gone).
pub fn resolve<'a>(
    services: &'a BTreeMap<String, ServiceSpec>,
    pods: &[PodView<'_>],
    namespaces: &[String],
    family: Family,
) -> Vec<Resolved<'a>> {
    services
        .iter()
        .enumerate()
        .filter(|(_, (key, _))| key.split_once('/').is_some_and(|(ns, _)| namespaces.iter().any(|n| n == ns)))
        .map(|(index, (key, spec))| {
            let ns = key.split_once('/').map_or("", |(n, _)| n);
            let selected: Vec<&PodView> = if spec.selector.is_empty() {
                Vec::new()
            } else {
                pods.iter()
                    .filter(|p| p.spec.namespace == ns && spec.selector.iter().all(|(k, v)| p.spec.labels.get(k) == Some(v)))
                    .collect()
            };
            let backends = spec
                .ports
                .iter()
                .map(|port| {
                    let mut out: Vec<Backend> = selected
                        .iter()
                        .filter_map(|p| {
                            let target = match &port.target_port {
                                None => port.port,
                                Some(TargetPort::Number(n)) => *n,
                                Some(TargetPort::Name(name)) => p.named_port(name, port.protocol)?,
                            };
                            Some(Backend { addr: p.spec.ip(family)?, port: target, node: p.node })
                        })
                        .collect();
                    for e in &spec.endpoints {
                        let Some(node) = node_index(e) else { continue };
                        // A named targetPort means nothing without a pod: the endpoint
                        // controller does not make these endpoints.
                        let target = match &port.target_port {
                            None => port.port,
                            Some(TargetPort::Number(n)) => *n,
                            Some(TargetPort::Name(_)) => continue,
                        };
                        let addr = node_addresses(node).into_iter().find(|a| Family::of(*a) == family).expect("both families");
                        out.push(Backend { addr, port: target, node });
                    }
                    out
                })
                .collect();
            Resolved { key: key.clone(), index, spec, backends }
        })
        .collect()
}

impl Resolved<'_> {
    fn name(&self) -> (&str, &str) {
        self.key.split_once('/').expect("validated ns/name")
    }

    fn has_cluster_ip(&self) -> bool {
        self.spec.kind != ServiceType::ExternalName && !self.spec.is_headless()
    }

    fn serves_node_ports(&self) -> bool {
        matches!(self.spec.kind, ServiceType::NodePort | ServiceType::LoadBalancer)
    }

    /// The addresses a client connects to for the Service's port `port`/`protocol` (see
    /// `ProbeTarget::Services`): empty if it has no such port. A ClusterIP reaches one
    /// backend at random per connection, so each backend (at its target port, what the
    /// ClusterIP translates to) is probed directly too: a backend judged wrongly cannot
    /// hide behind a lucky draw.
    pub fn destinations(&self, port: u16, protocol: Protocol, family: Family) -> Vec<SocketAddr> {
        let Some(i) = self.spec.ports.iter().position(|p| p.port == port && p.protocol == protocol) else { return Vec::new() };
        if self.spec.kind == ServiceType::ExternalName {
            return self.spec.external_address(family).map(|a| vec![SocketAddr::new(a, port)]).unwrap_or_default();
        }
        if self.spec.is_headless() {
            return self.backends[i].iter().map(|b| SocketAddr::new(b.addr, b.port)).collect();
        }
        std::iter::once(SocketAddr::new(cluster_ip(self.index, family), port))
            .chain(self.backends[i].iter().map(|b| SocketAddr::new(b.addr, b.port)))
            .collect()
    }

    /// Where a client's connection to the Service's port ends after kube-proxy's
    /// translation (what policies judge): the backends, or an ExternalName's address.
    pub fn judged(&self, port: u16, protocol: Protocol, family: Family) -> Vec<SocketAddr> {
        let Some(i) = self.spec.ports.iter().position(|p| p.port == port && p.protocol == protocol) else { return Vec::new() };
        if self.spec.kind == ServiceType::ExternalName {
            return self.destinations(port, protocol, family);
        }
        self.backends[i].iter().map(|b| SocketAddr::new(b.addr, b.port)).collect()
    }

    /// The backends an outside client reaches over TCP port `port` (see
    /// [`Resolved::outside_destination`]): those on the first backend's node, where
    /// [`Resolved::nat_rules`] send the NodePort and the LoadBalancer IP.
    pub fn outside_judged(&self, port: u16) -> Vec<SocketAddr> {
        let Some(i) = self.spec.ports.iter().position(|p| p.port == port && p.protocol == Protocol::Tcp) else { return Vec::new() };
        let Some(first) = self.backends[i].first() else { return Vec::new() };
        self.backends[i].iter().filter(|b| b.node == first.node).map(|b| SocketAddr::new(b.addr, b.port)).collect()
    }

    /// Where an outside client reaches the Service's port `port` (TCP): its NodePort on
    /// the node of its first backend (`node_side(node)` is that node's address toward the
    /// outside), or its LoadBalancer IP. `None` if it has no backend.
    pub fn outside_destination(
        &self,
        port: u16,
        load_balancer: bool,
        family: Family,
        node_side: impl Fn(usize) -> IpAddr,
    ) -> Option<SocketAddr> {
        let i = self.spec.ports.iter().position(|p| p.port == port && p.protocol == Protocol::Tcp)?;
        if load_balancer {
            return Some(SocketAddr::new(load_balancer_ip(self.index, family), port));
        }
        let first = self.backends[i].first()?;
        Some(SocketAddr::new(node_side(first.node), node_port(self.index, i)))
    }

    /// The node the outside routes the LoadBalancer IP to: the first backend's.
    pub fn load_balancer_node(&self) -> Option<usize> {
        self.backends.iter().flatten().next().map(|b| b.node)
    }

    /// The Service and its EndpointSlices, as the API server holds them (one slice per
    /// set of target ports, as the endpoint controller groups endpoints).
    pub fn manifests(&self, family: Family) -> Value {
        let (ns, name) = self.name();
        let mut spec = json!({"type": format!("{:?}", self.spec.kind)});
        let ports: Vec<Value> = self
            .spec
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut v = json!({"port": p.port, "protocol": p.protocol.as_str()});
                if let Some(n) = &p.name {
                    v["name"] = json!(n);
                }
                match &p.target_port {
                    Some(TargetPort::Number(n)) => v["targetPort"] = json!(n),
                    Some(TargetPort::Name(n)) => v["targetPort"] = json!(n),
                    None => v["targetPort"] = json!(p.port),
                }
                if self.serves_node_ports() {
                    v["nodePort"] = json!(node_port(self.index, i));
                }
                v
            })
            .collect();
        spec["ports"] = json!(ports);
        if !self.spec.selector.is_empty() {
            spec["selector"] = json!(self.spec.selector);
        }
        if self.spec.is_headless() {
            spec["clusterIP"] = json!("None");
            spec["clusterIPs"] = json!(["None"]);
        } else if self.has_cluster_ip() {
            let ip = cluster_ip(self.index, family).to_string();
            spec["clusterIP"] = json!(ip);
            spec["clusterIPs"] = json!([ip]);
        }
        if self.serves_node_ports() {
            spec["externalTrafficPolicy"] = json!(format!("{:?}", self.spec.external_traffic_policy));
        }
        if let Some(e) = &self.spec.external_name {
            spec["externalName"] = json!(e);
        }
        let mut service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec});
        if self.spec.kind == ServiceType::LoadBalancer {
            service["status"] = json!({"loadBalancer": {"ingress": [{"ip": load_balancer_ip(self.index, family).to_string()}]}});
        }
        let mut items = vec![service];
        if self.spec.kind != ServiceType::ExternalName {
            items.extend(self.endpoint_slices(family));
        }
        json!({"apiVersion": "v1", "kind": "List", "items": items})
    }

    fn endpoint_slices(&self, family: Family) -> Vec<Value> {
        let (ns, name) = self.name();
        // Each address with its target port per Service port; addresses with the same
        // ports share a slice.
        let mut by_ports: BTreeMap<Vec<Option<u16>>, Vec<IpAddr>> = BTreeMap::new();
        let addresses: Vec<IpAddr> = {
            let mut a: Vec<IpAddr> = self.backends.iter().flatten().map(|b| b.addr).collect();
            a.sort();
            a.dedup();
            a
        };
        for a in addresses {
            let ports: Vec<Option<u16>> = self.backends.iter().map(|bs| bs.iter().find(|b| b.addr == a).map(|b| b.port)).collect();
            by_ports.entry(ports).or_default().push(a);
        }
        let address_type = if family == Family::Ipv4 { "IPv4" } else { "IPv6" };
        let mut slices: Vec<Value> = by_ports
            .into_iter()
            .enumerate()
            .map(|(i, (ports, addrs))| {
                let ports: Vec<Value> = ports
                    .iter()
                    .zip(&self.spec.ports)
                    .filter_map(|(t, p)| {
                        let mut v = json!({"port": (*t)?, "protocol": p.protocol.as_str()});
                        if let Some(n) = &p.name {
                            v["name"] = json!(n);
                        }
                        Some(v)
                    })
                    .collect();
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": format!("{name}-{}", i + 1), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
                       "addressType": address_type, "ports": ports,
                       "endpoints": addrs.iter().map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}})).collect::<Vec<_>>()})
            })
            .collect();
        if slices.is_empty() {
            slices.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                               "metadata": {"name": format!("{name}-1"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
                               "addressType": address_type, "endpoints": []}));
        }
        slices
    }

    /// kube-proxy's nat rules for this Service on node `node` (`iptables-restore` lines
    /// for chain [`CHAIN`]): ClusterIP DNAT spread over the backends at random, as its
    /// KUBE-SVC chains do; on NodePort and LoadBalancer Services, the NodePort on
    /// `node_side` and the LoadBalancer IP, marked for the masquerade unless
    /// `externalTrafficPolicy: Local`. A NodePort balances over the backends on its own
    /// node if it has some (always so with `Local`), else over all: kube-proxy balances
    /// over all with `Cluster`, but a backend across nodes would lose the client's
    /// address (a limitation the README names), which cases must not depend on.
    pub fn nat_rules(&self, node: usize, node_side: Option<IpAddr>, family: Family) -> Vec<String> {
        let mut out = Vec::new();
        if !self.has_cluster_ip() {
            return out;
        }
        let vip = cluster_ip(self.index, family);
        for (i, port) in self.spec.ports.iter().enumerate() {
            let proto = port.protocol.as_str().to_lowercase();
            let all = &self.backends[i];
            let match_vip = format!("-d {} -p {proto} --dport {}", host(vip), port.port);
            out.extend(spread(&match_vip, all));
            if !self.serves_node_ports() || port.protocol != Protocol::Tcp {
                continue;
            }
            let local: Vec<Backend> = all.iter().filter(|b| b.node == node).cloned().collect();
            let (targets, masquerade) = match self.spec.external_traffic_policy {
                TrafficPolicy::Local => (local, false),
                TrafficPolicy::Cluster => (if local.is_empty() { all.clone() } else { local }, true),
            };
            let mut entries = Vec::new();
            if let Some(side) = node_side {
                entries.push(format!("-d {} -p tcp --dport {}", host(side), node_port(self.index, i)));
            }
            if self.spec.kind == ServiceType::LoadBalancer {
                entries.push(format!("-d {} -p tcp --dport {}", host(load_balancer_ip(self.index, family)), port.port));
            }
            for m in entries {
                if masquerade {
                    out.push(format!("-A {CHAIN} {m} -j MARK --set-xmark 0x4000/0x4000"));
                }
                out.extend(spread(&m, &targets));
            }
        }
        out
    }
}

/// The nat chain kube-proxy's rules for the case's Services live in, jumped to from
/// PREROUTING and OUTPUT.
pub const CHAIN: &str = "CASE-SERVICES";

fn host(a: IpAddr) -> String {
    match a {
        IpAddr::V4(_) => format!("{a}/32"),
        IpAddr::V6(_) => format!("{a}/128"),
    }
}

/// DNAT rules for `matching` spread over `backends` at random (rule k of n matches with
/// probability 1/(n-k), as kube-proxy writes them).
fn spread(matching: &str, backends: &[Backend]) -> Vec<String> {
    let n = backends.len();
    backends
        .iter()
        .enumerate()
        .map(|(k, b)| {
            let to = match b.addr {
                IpAddr::V4(_) => format!("{}:{}", b.addr, b.port),
                IpAddr::V6(_) => format!("[{}]:{}", b.addr, b.port),
            };
            let chance =
                if k + 1 < n { format!(" -m statistic --mode random --probability {:.5}", 1.0 / (n - k) as f64) } else { String::new() };
            format!("-A {CHAIN} {matching}{chance} -j DNAT --to-destination {to}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::Case;
    use crate::cluster::{Families, make_pods};

    const CASE: &str = "name: s
pods: [x/a, x/b, y/a]
containerPorts:
  x/b: [{name: web, port: 8080}]
services:
  x/web:
    type: NodePort
    selector: {pod: b}
    ports: [{port: 80, targetPort: web}, {port: 81, targetPort: serve-81-udp, protocol: UDP}]
  x/all:
    clusterIP: None
    ports: [{port: 80}]
    selector: {}
  default/kubernetes:
    ports: [{name: https, port: 443, targetPort: 6443}]
    endpoints: [node-0]
steps: []
";

    fn views<'a>(specs: &'a [PodSpec], extra: &'a BTreeMap<String, Vec<ContainerPort>>) -> Vec<PodView<'a>> {
        specs.iter().map(|s| PodView { spec: s, extra_ports: extra.get(&s.key()).map_or(&[], Vec::as_slice), node: 0 }).collect()
    }

    #[test]
    fn named_target_ports_resolve_per_pod_and_node_endpoints_to_the_node_address() {
        let case = Case::parse("t", CASE).unwrap();
        let specs = make_pods(&case.pod_names(), Families::Ipv4, 1);
        let pods = views(&specs, &case.container_ports);
        let namespaces = vec!["x".to_string(), "y".to_string(), "default".to_string()];
        let r = resolve(&case.services, &pods, &namespaces, Family::Ipv4);
        let web = r.iter().find(|s| s.key == "x/web").unwrap();
        // x/b's container port `web` is 8080; UDP 81 by its default name.
        assert_eq!(web.backends[0], [Backend { addr: specs[1].ips[0], port: 8080, node: 0 }]);
        assert_eq!(web.backends[1], [Backend { addr: specs[1].ips[0], port: 81, node: 0 }]);
        let k = r.iter().find(|s| s.key == "default/kubernetes").unwrap();
        assert_eq!(k.backends[0], [Backend { addr: "10.250.0.1".parse().unwrap(), port: 6443, node: 0 }]);
        assert_eq!(
            k.destinations(443, Protocol::Tcp, Family::Ipv4),
            [SocketAddr::new(cluster_ip(k.index, Family::Ipv4), 443), "10.250.0.1:6443".parse().unwrap()],
            "the ClusterIP, and each backend directly"
        );
        // An empty selector selects nothing here (the harness's headless Service selects
        // by labels): no backends.
        let all = r.iter().find(|s| s.key == "x/all").unwrap();
        assert!(all.destinations(80, Protocol::Tcp, Family::Ipv4).is_empty());
        // A namespace that is gone takes its Services with it.
        let r = resolve(&case.services, &pods, &namespaces[..2], Family::Ipv4);
        assert!(r.iter().all(|s| s.key != "default/kubernetes"));
    }

    #[test]
    fn node_port_rules_mark_for_the_masquerade_and_spread_over_the_backends() {
        let case = Case::parse("t", &CASE.replace("selector: {pod: b}", "selector: {}")).unwrap();
        let mut specs = make_pods(&case.pod_names(), Families::Ipv4, 1);
        for s in &mut specs {
            s.labels.insert("app".into(), "web".into());
        }
        let mut services = case.services.clone();
        services.get_mut("x/web").unwrap().selector = BTreeMap::from([("app".to_string(), "web".to_string())]);
        services.get_mut("x/web").unwrap().ports[0].target_port = Some(TargetPort::Number(80));
        let pods = views(&specs, &case.container_ports);
        let r = resolve(&services, &pods, &["x".to_string()], Family::Ipv4);
        let web = r.iter().find(|s| s.key == "x/web").unwrap();
        assert_eq!(web.backends[0].len(), 2, "x/a and x/b, not y/a");
        let rules = web.nat_rules(0, Some("203.0.113.1".parse().unwrap()), Family::Ipv4);
        let vip = cluster_ip(web.index, Family::Ipv4);
        assert!(rules[0].contains(&format!("-d {vip}/32 -p tcp --dport 80 -m statistic --mode random --probability 0.50000")), "{rules:?}");
        assert!(rules[1].ends_with(&format!("-j DNAT --to-destination {}:80", specs[1].ips[0])), "{rules:?}");
        let np = node_port(web.index, 0);
        assert!(rules.iter().any(|r| r.contains(&format!("--dport {np} -j MARK"))), "{rules:?}");
        // UDP gets no NodePort here (the outside probes TCP only).
        assert!(!rules.iter().any(|r| r.contains(&format!("--dport {}", node_port(web.index, 1)))));
        // Local: no mark.
        services.get_mut("x/web").unwrap().external_traffic_policy = TrafficPolicy::Local;
        let r = resolve(&services, &pods, &["x".to_string()], Family::Ipv4);
        let web = r.iter().find(|s| s.key == "x/web").unwrap();
        assert!(!web.nat_rules(0, Some("203.0.113.1".parse().unwrap()), Family::Ipv4).iter().any(|r| r.contains("MARK")));
    }

    #[test]
    fn a_headless_service_is_reached_at_its_backends_and_an_external_name_at_its_address() {
        let text = CASE.replace("selector: {}", "selector: {pod: a}") + "";
        let text = text.replace(
            "  default/kubernetes:",
            "  x/ext:\n    type: ExternalName\n    externalName: outside-b.example\n    ports: [{port: 80}]\n  default/kubernetes:",
        );
        let case = Case::parse("t", &text).unwrap();
        let specs = make_pods(&case.pod_names(), Families::Ipv4, 1);
        let pods = views(&specs, &case.container_ports);
        let r = resolve(&case.services, &pods, &["x".to_string()], Family::Ipv4);
        let all = r.iter().find(|s| s.key == "x/all").unwrap();
        assert_eq!(all.destinations(80, Protocol::Tcp, Family::Ipv4), [SocketAddr::new(specs[0].ips[0], 80)]);
        assert!(all.nat_rules(0, None, Family::Ipv4).is_empty());
        let ext = r.iter().find(|s| s.key == "x/ext").unwrap();
        assert_eq!(ext.destinations(80, Protocol::Tcp, Family::Ipv4), [SocketAddr::new("198.51.100.11".parse().unwrap(), 80)]);
        let m = ext.manifests(Family::Ipv4);
        assert_eq!(m["items"].as_array().unwrap().len(), 1, "an ExternalName Service has no EndpointSlice");
        assert_eq!(m["items"][0]["spec"]["externalName"], "outside-b.example");
    }
}
