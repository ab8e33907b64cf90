//! The emulated cluster of one case on real traffic, as its steps change it: nodes, pods
//! and their lifecycle, namespaces, Services with kube-proxy's rules, and the manifests
//! the agents read.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use policy_model::{Family, ObjectKey};
use serde_json::{Value, json};

use super::outside::Outside;
use super::{RunOptions, TempDir, load_balancer_ip, node_port, tempfile_dir};
use crate::case::{Case, LifeEvent, Phase, ServiceType, Step};
use crate::cluster::{
    PROTOCOLS, PodSpec, SERVED_PORTS, expand_placeholders, host_network_pod_manifest, make_pods, namespace_manifest, node_addresses,
    node_manifest,
};
use crate::model::{delete_key, is_cluster_policy, merge_labels as merge, namespaces_of, policy_key};
use crate::netns::unique;
use crate::service::{self, PodView, Resolved};
use crate::topology::{NodeNet, PodNet};
use crate::traffic::{Servers, serve};

pub(super) struct LivePod {
    pub(super) spec: PodSpec,
    pub(super) net: PodNet,
    _servers: Servers,
    pub(super) vip: IpAddr,
    /// Its place among the case's pods (its addresses, NodePorts: [`node_port`]).
    pub(super) index: usize,
}

/// The ClusterIP of pod `index`'s own Service.
fn vip(family: Family, index: usize) -> IpAddr {
    match family {
        Family::Ipv4 => format!("10.96.0.{}", 10 + index).parse().unwrap(),
        Family::Ipv6 => format!("fd10:96::{:x}", 10 + index).parse().unwrap(),
    }
}

pub(super) struct Live<'c> {
    pub(super) case: &'c Case,
    pub(super) opts: RunOptions,
    /// The family probes use.
    pub(super) family: Family,
    pub(super) nodes: Vec<NodeNet>,
    pub(super) outside: Option<Outside>,
    pub(super) dir: TempDir,
    /// Every pod of the case, with the addresses it has (or will have).
    pub(super) specs: Vec<PodSpec>,
    /// The running pods.
    pub(super) pods: BTreeMap<String, LivePod>,
    /// The namespaces that exist, with their labels.
    pub(super) namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// The phase of every pod whose object exists.
    phases: BTreeMap<String, &'static str>,
    policies: BTreeMap<ObjectKey, String>,
    _node_servers: Vec<Servers>,
}

fn write(dir: &Path, name: &str, v: &Value) -> Result<(), String> {
    std::fs::write(dir.join(name), serde_yaml_ng::to_string(v).map_err(|e| e.to_string())?).map_err(|e| format!("{name}: {e}"))
}

fn remove(dir: &Path, name: &str) {
    let _ = std::fs::remove_file(dir.join(name));
}

fn pod_file(spec: &PodSpec) -> String {
    format!("pod-{}-{}.yaml", spec.namespace, spec.name)
}

fn own_service_file(spec: &PodSpec) -> String {
    format!("svc-{}-{}.yaml", spec.namespace, spec.name)
}

fn case_service_file(key: &str) -> String {
    format!("case-svc-{}.yaml", key.replace('/', "-"))
}

impl<'c> Live<'c> {
    /// The nodes (joined if two), the outside network if the case needs it, the running
    /// pods, the objects as manifests: everything but the agents.
    pub(super) fn create(case: &'c Case, opts: RunOptions) -> Result<Live<'c>, String> {
        let family = opts.families.probe_family();
        let node_count = opts.nodes.clamp(1, 2);
        let nodes: Vec<NodeNet> = (0..node_count)
            .map(|i| {
                NodeNet::create_with(&unique("cfn"), &super::node_name(i), &node_addresses(i), opts.topology, i).map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
        if let [a, b] = nodes.as_slice() {
            NodeNet::connect(a, b).map_err(|e| format!("joining the nodes: {e}"))?;
        }
        // Servers in each node's own namespace, on the node's addresses: what upstream's
        // host-network pods (centaur) serve for its `nodes` peer tests, and the node
        // endpoints of the case's Services (the API server's 6443).
        let mut node_ports: Vec<u16> = SERVED_PORTS.to_vec();
        for svc in case.services.values().filter(|s| !s.endpoints.is_empty()) {
            for p in &svc.ports {
                if let Some(crate::case::TargetPort::Number(n)) = p.target_port {
                    node_ports.push(n);
                } else if p.target_port.is_none() {
                    node_ports.push(p.port);
                }
            }
        }
        node_ports.sort();
        node_ports.dedup();
        let node_servers: Vec<Servers> =
            nodes.iter().map(|n| serve(&n.ns, &node_ports).map_err(|e| format!("servers on {}: {e}", n.name))).collect::<Result<_, _>>()?;
        let outside_probes = case.steps.iter().flat_map(|s| &s.probes).any(|p| p.from == crate::case::ProbeSource::Outside);
        let mut external: Vec<u16> =
            case.services.values().filter(|s| s.kind == ServiceType::ExternalName).flat_map(|s| s.ports.iter().map(|p| p.port)).collect();
        external.sort();
        external.dedup();
        let outside = if outside_probes || !external.is_empty() { Some(Outside::create(&nodes, &external)?) } else { None };
        if !case.services.is_empty() {
            for node in &nodes {
                for tool in ["iptables", "ip6tables"] {
                    let e = |e: crate::netns::NetnsError| e.to_string();
                    node.ns.exec(tool, &["-t", "nat", "-N", service::CHAIN]).map_err(e)?;
                    for hook in ["PREROUTING", "OUTPUT"] {
                        node.ns.exec(tool, &["-t", "nat", "-A", hook, "-j", service::CHAIN]).map_err(e)?;
                    }
                }
            }
        }
        let dir = tempfile_dir()?;
        let names = case.pod_names();
        let namespaces = namespaces_of(&names)
            .into_iter()
            .chain(case.services.keys().filter_map(|k| k.split_once('/').map(|(n, _)| n.to_string())))
            .filter(|n| !case.later_namespaces.contains(n))
            .map(|n| (n, BTreeMap::new()))
            .collect();
        let specs = make_pods(&names, opts.families, node_count);
        let mut live = Live {
            case,
            opts,
            family,
            nodes,
            outside,
            dir,
            specs,
            pods: BTreeMap::new(),
            namespaces,
            phases: BTreeMap::new(),
            policies: BTreeMap::new(),
            _node_servers: node_servers,
        };
        for i in 0..live.specs.len() {
            if !case.later.contains(&live.specs[i].key()) {
                live.start_pod(i)?;
            }
        }
        for (ns, labels) in &live.namespaces {
            write(live.dir.path(), &format!("ns-{ns}.yaml"), &namespace_manifest(ns, labels))?;
        }
        for (i, node) in live.nodes.iter().enumerate() {
            write(live.dir.path(), &format!("node-{}.yaml", node.name), &node_manifest(&node.name, &node.addresses))?;
            write(live.dir.path(), &format!("host-pod-{}.yaml", node.name), &host_network_pod_manifest(i, &node.addresses))?;
        }
        live.sync_services()?;
        Ok(live)
    }

    fn extra_ports(&self, key: &str) -> &[crate::case::ContainerPort] {
        self.case.container_ports.get(key).map_or(&[], Vec::as_slice)
    }

    fn index_of(&self, key: &str) -> Result<usize, String> {
        self.specs.iter().position(|p| p.key() == key).ok_or(format!("no pod {key} in the case"))
    }

    /// Pod `index` of the case starts on its node: its namespace and veth, its servers,
    /// kube-proxy's rules for its own Service (DNAT in every node, the hairpin masquerade,
    /// the NodePort when there is an outside network), and its manifests.
    fn start_pod(&mut self, index: usize) -> Result<(), String> {
        let spec = self.specs[index].clone();
        let home_index = self.nodes.iter().position(|n| n.name == spec.node).ok_or(format!("pod {} on unknown node", spec.key()))?;
        let home = &self.nodes[home_index];
        let net = home.add_pod(&unique("cfp"), &format!("cf{index}"), &spec.ips).map_err(|e| e.to_string())?;
        let mut ports: Vec<u16> = SERVED_PORTS.to_vec();
        ports.extend(self.extra_ports(&spec.key()).iter().map(|c| c.port));
        ports.sort();
        ports.dedup();
        let servers = serve(&net.ns, &ports).map_err(|e| e.to_string())?;
        let vip = vip(self.family, index);
        let backend = spec.ip(self.family).ok_or("pod without an address of the probe family")?;
        // kube-proxy's DNAT, port = targetPort, in every node, and its hairpin masquerade
        // (KUBE-SEP marks traffic from the endpoint itself): a pod reaching itself through
        // its Service would otherwise get its own address as source, which it drops.
        for node in &self.nodes {
            for proto in ["tcp", "udp", "sctp"] {
                for port in SERVED_PORTS {
                    node.dnat(vip, port, backend, port, proto).map_err(|e| e.to_string())?;
                }
            }
            let tool = if backend.is_ipv4() { "iptables" } else { "ip6tables" };
            let b = backend.to_string();
            node.ns.exec(tool, &["-t", "nat", "-A", "POSTROUTING", "-s", &b, "-d", &b, "-j", "MASQUERADE"]).map_err(|e| e.to_string())?;
        }
        if let Some(outside) = &self.outside {
            for port in SERVED_PORTS {
                outside.serve_pod(home, home_index, index, backend, port)?;
            }
        }
        let dir = self.dir.path();
        write(dir, &pod_file(&spec), &spec.manifest_with("Running", self.extra_ports(&spec.key())))?;
        write(dir, &own_service_file(&spec), &own_service(&spec, index, vip, Some(backend)))?;
        self.phases.insert(spec.key(), "Running");
        self.pods.insert(spec.key(), LivePod { spec, net, _servers: servers, vip, index });
        Ok(())
    }

    /// Running pod `key` stops: its sandbox and addresses go (the veth first, at once: a
    /// namespace's deletion finishes later, and a new pod may want the addresses), and the
    /// endpoint controller drops it from its own Service. Its Pod object is the caller's.
    fn stop_pod(&mut self, key: &str) -> Result<PodSpec, String> {
        let gone = self.pods.remove(key).ok_or(format!("pod {key} does not run"))?;
        let home = self.nodes.iter().find(|n| n.name == gone.spec.node).ok_or("unknown node")?;
        home.ns.ip(&["link", "del", &gone.net.host_veth]).map_err(|e| e.to_string())?;
        write(self.dir.path(), &own_service_file(&gone.spec), &own_service(&gone.spec, gone.index, gone.vip, None))?;
        Ok(gone.spec)
    }

    /// A step's lifecycle changes, in order (`Step::lifecycle`).
    pub(super) fn apply_lifecycle(&mut self, step: &Step) -> Result<(), String> {
        for event in step.lifecycle() {
            self.apply_event(event)?;
        }
        Ok(())
    }

    fn apply_event(&mut self, event: LifeEvent) -> Result<(), String> {
        match event {
            LifeEvent::DeleteNamespace(ns) => self.delete_namespace(ns)?,
            LifeEvent::CreateNamespace(ns) => {
                self.namespaces.insert(ns.to_string(), BTreeMap::new());
                write(self.dir.path(), &format!("ns-{ns}.yaml"), &namespace_manifest(ns, &BTreeMap::new()))?;
            }
            LifeEvent::TakeOver { new, old } => {
                // Pod `old` completes (phase Succeeded, as a Job's pod), then `new` starts
                // on its node with its addresses.
                let gone = self.stop_pod(old).map_err(|e| format!("takeOver: {e}"))?;
                write(self.dir.path(), &pod_file(&gone), &gone.manifest_with("Succeeded", self.extra_ports(old)))?;
                self.phases.insert(old.to_string(), "Succeeded");
                let index = self.index_of(new)?;
                self.specs[index].ips = gone.ips.clone();
                self.specs[index].node = gone.node.clone();
                self.start_pod(index)?;
            }
            LifeEvent::Finish(pod, phase) => {
                let gone = self.stop_pod(pod).map_err(|e| format!("finish: {e}"))?;
                let phase = match phase {
                    Phase::Succeeded => "Succeeded",
                    Phase::Failed => "Failed",
                };
                write(self.dir.path(), &pod_file(&gone), &gone.manifest_with(phase, self.extra_ports(pod)))?;
                self.phases.insert(pod.to_string(), phase);
            }
            LifeEvent::DeletePod(pod) => {
                if self.pods.contains_key(pod) {
                    self.stop_pod(pod)?;
                }
                let index = self.index_of(pod)?;
                remove(self.dir.path(), &pod_file(&self.specs[index]));
                self.phases.remove(pod);
            }
            LifeEvent::Pending(pod) => {
                let index = self.index_of(pod)?;
                let spec = &self.specs[index];
                write(self.dir.path(), &pod_file(spec), &spec.manifest_with("Pending", self.extra_ports(pod)))?;
                self.phases.insert(pod.to_string(), "Pending");
            }
            LifeEvent::Start(pod) => {
                let index = self.index_of(pod)?;
                self.start_pod(index)?;
            }
        }
        Ok(())
    }

    /// Namespace `ns` goes, and everything in it: pods, their Services, NetworkPolicies
    /// (the case's Services follow in [`Live::sync_services`]).
    fn delete_namespace(&mut self, ns: &str) -> Result<(), String> {
        let in_ns: Vec<PodSpec> = self.specs.iter().filter(|p| p.namespace == ns).cloned().collect();
        for spec in in_ns {
            if self.pods.contains_key(&spec.key()) {
                self.stop_pod(&spec.key())?;
            }
            remove(self.dir.path(), &pod_file(&spec));
            remove(self.dir.path(), &own_service_file(&spec));
            self.phases.remove(&spec.key());
        }
        let gone: Vec<ObjectKey> = self.policies.keys().filter(|k| &*k.namespace == ns).cloned().collect();
        for k in gone {
            if let Some(file) = self.policies.remove(&k) {
                remove(self.dir.path(), &file);
            }
        }
        self.namespaces.remove(ns);
        remove(self.dir.path(), &format!("ns-{ns}.yaml"));
        Ok(())
    }

    /// A step's policies (apply, update, delete), then its label changes.
    pub(super) fn apply_objects(&mut self, step: &Step) -> Result<(), String> {
        for manifest in step.apply.iter().chain(&step.update) {
            let mut v = manifest.clone();
            expand_placeholders(&mut v, &self.specs, self.opts.families.primary()).map_err(|e| e.to_string())?;
            let key = policy_key(&v)?;
            let file =
                if is_cluster_policy(&v) { format!("cnp-{}.yaml", key.name) } else { format!("np-{}-{}.yaml", key.namespace, key.name) };
            write(self.dir.path(), &file, &v)?;
            self.policies.insert(key, file);
        }
        for d in &step.delete {
            if let Some(file) = delete_key(d).and_then(|k| self.policies.remove(&k)) {
                remove(self.dir.path(), &file);
            }
        }
        for (ns, changes) in &step.label_namespace {
            let labels = self.namespaces.entry(ns.clone()).or_default();
            merge(labels, changes);
            write(self.dir.path(), &format!("ns-{ns}.yaml"), &namespace_manifest(ns, labels))?;
        }
        for (pod, changes) in &step.label_pod {
            let index = self.index_of(pod)?;
            merge(&mut self.specs[index].labels, changes);
            let spec = self.specs[index].clone();
            if let Some(p) = self.pods.get_mut(pod) {
                p.spec.labels = spec.labels.clone();
            }
            if let Some(phase) = self.phases.get(pod) {
                write(self.dir.path(), &pod_file(&spec), &spec.manifest_with(phase, self.extra_ports(pod)))?;
            }
        }
        Ok(())
    }

    /// The case's Services as they stand: endpoints from the running pods, kube-proxy's
    /// rules rewritten in every node, manifests written (and removed with their
    /// namespace).
    pub(super) fn sync_services(&self) -> Result<(), String> {
        if self.case.services.is_empty() {
            return Ok(());
        }
        let resolved = self.resolved();
        for (i, node) in self.nodes.iter().enumerate() {
            let node_side = self.outside.as_ref().map(|_| Outside::node_side(i, self.family));
            let rules: Vec<String> = resolved.iter().flat_map(|s| s.nat_rules(i, node_side, self.family)).collect();
            let text = format!("*nat\n:{c} - [0:0]\n-F {c}\n{}\nCOMMIT\n", rules.join("\n"), c = service::CHAIN);
            let file = self.dir.path().join(format!("rules-{}.txt", node.name));
            std::fs::write(&file, text).map_err(|e| e.to_string())?;
            let tool = if self.family == Family::Ipv4 { "iptables-restore" } else { "ip6tables-restore" };
            let path = file.display().to_string();
            node.ns.exec(tool, &["--noflush", &path]).map_err(|e| format!("kube-proxy's rules on {}: {e}", node.name))?;
            let _ = std::fs::remove_file(&file);
        }
        for key in self.case.services.keys() {
            match resolved.iter().find(|s| &s.key == key) {
                Some(s) => write(self.dir.path(), &case_service_file(key), &s.manifests(self.family))?,
                None => remove(self.dir.path(), &case_service_file(key)),
            }
        }
        if let Some(outside) = &self.outside {
            for s in resolved.iter().filter(|s| s.spec.kind == ServiceType::LoadBalancer) {
                if let Some(n) = s.load_balancer_node() {
                    outside.route_load_balancer(service::load_balancer_ip(s.index, self.family), n)?;
                }
            }
        }
        Ok(())
    }

    /// The case's Services with their endpoints now.
    pub(super) fn resolved(&self) -> Vec<Resolved<'c>> {
        let views: Vec<PodView> = self
            .pods
            .values()
            .map(|p| PodView {
                spec: &p.spec,
                extra_ports: self.extra_ports(&p.spec.key()),
                node: self.nodes.iter().position(|n| n.name == p.spec.node).unwrap_or(0),
            })
            .collect();
        let namespaces: Vec<String> = self.namespaces.keys().cloned().collect();
        service::resolve(&self.case.services, &views, &namespaces, self.family)
    }

    /// Where a probe connects to pod `to` from inside the cluster: its Service's ClusterIP
    /// or its own address.
    pub(super) fn pod_destination(&self, to: &LivePod, port: u16) -> SocketAddr {
        let addr = match self.opts.probe_to {
            super::ProbeTo::Service => to.vip,
            super::ProbeTo::Pod => to.spec.ip(self.family).expect("address of the family"),
        };
        SocketAddr::new(addr, port)
    }

    pub(super) fn node_of(&self, pod: &LivePod) -> usize {
        self.nodes.iter().position(|n| n.name == pod.spec.node).expect("the pod's node")
    }
}

/// Pod `index`'s own Service (a LoadBalancer: ClusterIP `vip`, NodePorts [`node_port`],
/// ingress IP [`load_balancer_ip`]) and its EndpointSlice: `backend`, or none once the pod
/// stopped.
fn own_service(spec: &PodSpec, index: usize, vip: IpAddr, backend: Option<IpAddr>) -> Value {
    let mut ports = Vec::new();
    for proto in PROTOCOLS {
        for port in SERVED_PORTS {
            ports.push(json!({"name": format!("service-port-{}-{port}", proto.to_lowercase()), "port": port, "targetPort": port, "protocol": proto, "nodePort": node_port(index, port)}));
        }
    }
    json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("s-{}-{}", spec.namespace, spec.name), "namespace": spec.namespace},
         "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster", "clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()], "selector": {"pod": spec.name}, "ports": ports},
         "status": {"loadBalancer": {"ingress": [{"ip": load_balancer_ip(index, Family::of(vip)).to_string()}]}}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": format!("s-{}-{}-1", spec.namespace, spec.name), "namespace": spec.namespace, "labels": {"kubernetes.io/service-name": format!("s-{}-{}", spec.namespace, spec.name)}},
         "addressType": if vip.is_ipv4() { "IPv4" } else { "IPv6" }, "endpoints": backend.map(|b| vec![json!({"addresses": [b.to_string()]})]).unwrap_or_default()}]})
}
