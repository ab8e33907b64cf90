//! Services and their EndpointSlices, for the datapath's placement of egress checks: a
//! Service address whose endpoints are all pods is judged after DNAT, against the backend
//! (`SERVICES` map). One whose endpoints are pods and node addresses (the `kubernetes`
//! Service's API servers, host-network pods) is judged after DNAT for TCP only: its
//! backend may be this node itself, where no egress hook runs after DNAT, and only a
//! TCP flow's reply (from the node's socket, which names the backend) comes back to be
//! judged before anything reaches the client. Its other protocols, and a Service with any
//! other endpoint (an external address, which a masquerade on the way out would hide
//! from the node's devices), are judged before translation, against the Service address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use policy_model::{ClusterState, ObjectKey, Prefix};

/// A change to Services or EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceChange {
    /// A Service and its cluster IPs (empty for headless Services).
    UpsertService(ObjectKey, Vec<IpAddr>),
    DeleteService(ObjectKey),
    /// An EndpointSlice: the Service it belongs to and its endpoint addresses.
    UpsertSlice {
        slice: ObjectKey,
        service: ObjectKey,
        addresses: Vec<IpAddr>,
    },
    DeleteSlice(ObjectKey),
}

impl ServiceChange {
    pub fn from_service(s: &core::Service) -> ServiceChange {
        let key = ObjectKey::new(s.metadata.namespace.clone().unwrap_or_default(), s.metadata.name.clone().unwrap_or_default());
        let spec = s.spec.as_ref();
        let mut ips: Vec<String> = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
        if ips.is_empty() {
            ips.extend(spec.and_then(|s| s.cluster_ip.clone()));
        }
        ServiceChange::UpsertService(key, ips.iter().filter_map(|ip| ip.parse().ok()).collect())
    }

    pub fn from_slice(s: &EndpointSlice) -> Option<ServiceChange> {
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        let slice = ObjectKey::new(ns.clone(), s.metadata.name.clone().unwrap_or_default());
        let service = s.metadata.labels.as_ref()?.get("kubernetes.io/service-name")?.clone();
        let addresses = s.endpoints.iter().flat_map(|e| e.addresses.iter()).filter_map(|a| a.parse().ok()).collect();
        Some(ServiceChange::UpsertSlice { slice, service: ObjectKey::new(ns, service), addresses })
    }
}

#[derive(Debug, Default, Clone)]
pub struct Services {
    cluster_ips: BTreeMap<ObjectKey, Vec<IpAddr>>,
    slices: BTreeMap<ObjectKey, (ObjectKey, Vec<IpAddr>)>,
}

impl Services {
    pub fn apply(&mut self, changes: impl IntoIterator<Item = ServiceChange>) {
        for c in changes {
            match c {
                ServiceChange::UpsertService(k, ips) => {
                    self.cluster_ips.insert(k, ips);
                }
                ServiceChange::DeleteService(k) => {
                    self.cluster_ips.remove(&k);
                }
                ServiceChange::UpsertSlice { slice, service, addresses } => {
                    self.slices.insert(slice, (service, addresses));
                }
                ServiceChange::DeleteSlice(k) => {
                    self.slices.remove(&k);
                }
            }
        }
    }

    /// Where each Service address's egress is judged: after DNAT for every protocol, those
    /// whose endpoints are all pods of `state`; for TCP only, those whose endpoints are
    /// pods and node addresses, some of them node addresses; before translation, those
    /// with any other endpoint. An address without endpoints is in none of the sets.
    pub fn deferred(&self, state: &ClusterState) -> Deferred {
        let mut endpoints: BTreeMap<&ObjectKey, Vec<IpAddr>> = BTreeMap::new();
        for (service, addresses) in self.slices.values() {
            endpoints.entry(service).or_default().extend(addresses.iter().copied());
        }
        let mut out = Deferred::default();
        for (service, vips) in &self.cluster_ips {
            let eps = endpoints.get(service).map(Vec::as_slice).unwrap_or_default();
            let pods = eps.iter().filter(|a| state.pod_at(**a).is_some()).count();
            let nodes = eps.iter().filter(|a| state.pod_at(**a).is_none() && state.node_holds(**a)).count();
            let set = if eps.is_empty() {
                continue;
            } else if pods + nodes < eps.len() {
                &mut out.before
            } else if nodes == 0 {
                &mut out.all
            } else {
                &mut out.tcp_only
            };
            set.extend(vips.iter().map(|v| Prefix::host(*v)));
        }
        out
    }
}

/// Service addresses whose egress judgment waits for DNAT (see [`Services::deferred`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Deferred {
    /// Every protocol.
    pub all: BTreeSet<Prefix>,
    /// TCP only: other protocols are judged against the Service address.
    pub tcp_only: BTreeSet<Prefix>,
    /// None: judged before translation, against the Service address. The datapath needs
    /// these only inside a configured Service range, whose own entry defers everything.
    pub before: BTreeSet<Prefix>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_model::Pod;

    fn pod(ns: &str, name: &str, ip: &str) -> Pod {
        Pod {
            key: ObjectKey::new(ns, name),
            labels: Default::default(),
            ips: vec![ip.parse().unwrap()],
            node: Some("n".into()),
            host_network: false,
            named_ports: vec![],
        }
    }

    #[test]
    fn only_services_backed_by_pods_are_deferred() {
        let mut state = ClusterState::new();
        state.upsert_pod(pod("x", "a", "10.244.0.1"));
        state.upsert_pod(pod("x", "b", "10.244.0.2"));
        let mut s = Services::default();
        let k = |n: &str| ObjectKey::new("x", n);
        s.apply([
            ServiceChange::UpsertService(k("web"), vec!["10.96.0.10".parse().unwrap(), "fd10:96::10".parse().unwrap()]),
            ServiceChange::UpsertSlice { slice: k("web-1"), service: k("web"), addresses: vec!["10.244.0.1".parse().unwrap()] },
            ServiceChange::UpsertSlice { slice: k("web-2"), service: k("web"), addresses: vec!["10.244.0.2".parse().unwrap()] },
            // The API server behind `kubernetes` is a node address.
            ServiceChange::UpsertService(ObjectKey::new("default", "kubernetes"), vec!["10.96.0.1".parse().unwrap()]),
            ServiceChange::UpsertSlice {
                slice: ObjectKey::new("default", "kubernetes"),
                service: ObjectKey::new("default", "kubernetes"),
                addresses: vec!["10.250.0.1".parse().unwrap()],
            },
            // No endpoints yet.
            ServiceChange::UpsertService(k("empty"), vec!["10.96.0.20".parse().unwrap()]),
            // Headless.
            ServiceChange::UpsertService(k("headless"), vec![]),
            ServiceChange::UpsertSlice { slice: k("headless-1"), service: k("headless"), addresses: vec!["10.244.0.1".parse().unwrap()] },
        ]);
        let all = |s: &Services| s.deferred(&state).all.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert_eq!(all(&s), ["10.96.0.10/32", "fd10:96::10/128"]);
        // The API server is no node address the state knows: judged before translation.
        assert!(s.deferred(&state).tcp_only.is_empty());
        let before = |s: &Services| s.deferred(&state).before.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert_eq!(before(&s), ["10.96.0.1/32"]);
        // A mixed Service (one endpoint outside the pods) is judged before translation.
        s.apply([ServiceChange::UpsertSlice { slice: k("web-3"), service: k("web"), addresses: vec!["192.168.5.5".parse().unwrap()] }]);
        assert!(s.deferred(&state).all.is_empty());
        assert_eq!(before(&s), ["10.96.0.1/32", "10.96.0.10/32", "fd10:96::10/128"]);
        s.apply([ServiceChange::DeleteSlice(k("web-3"))]);
        assert_eq!(s.deferred(&state).all.len(), 2);
        s.apply([ServiceChange::DeleteService(k("web"))]);
        assert!(s.deferred(&state).all.is_empty());
    }

    #[test]
    fn services_with_node_endpoints_wait_for_dnat_over_tcp_only() {
        let mut state = ClusterState::new();
        state.upsert_pod(pod("x", "a", "10.244.0.1"));
        state.upsert_node(policy_model::Node { name: "n".into(), addresses: vec!["10.250.0.1".parse().unwrap()] });
        let mut s = Services::default();
        let api = ObjectKey::new("default", "kubernetes");
        s.apply([
            ServiceChange::UpsertService(api.clone(), vec!["10.96.0.1".parse().unwrap()]),
            ServiceChange::UpsertSlice { slice: api.clone(), service: api.clone(), addresses: vec!["10.250.0.1".parse().unwrap()] },
        ]);
        let d = s.deferred(&state);
        assert!(d.all.is_empty());
        assert_eq!(d.tcp_only.iter().map(|p| p.to_string()).collect::<Vec<_>>(), ["10.96.0.1/32"]);
        // With a pod endpoint too: still TCP only.
        let extra = ObjectKey::new("default", "kubernetes-2");
        s.apply([ServiceChange::UpsertSlice {
            slice: extra.clone(),
            service: api.clone(),
            addresses: vec!["10.244.0.1".parse().unwrap()],
        }]);
        assert_eq!(s.deferred(&state).tcp_only.len(), 1);
        // With an external endpoint: before translation.
        s.apply([ServiceChange::UpsertSlice { slice: extra, service: api, addresses: vec!["192.0.2.7".parse().unwrap()] }]);
        let d = s.deferred(&state);
        assert!(d.all.is_empty() && d.tcp_only.is_empty());
        assert_eq!(d.before.iter().map(|p| p.to_string()).collect::<Vec<_>>(), ["10.96.0.1/32"]);
    }

    #[test]
    fn reads_services_and_slices_from_the_api_shapes() {
        let svc: core::Service = serde_json::from_value(serde_json::json!({"metadata": {"name": "s", "namespace": "x"}, "spec": {"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5", "fd10:96::5"]}})).unwrap();
        assert_eq!(
            ServiceChange::from_service(&svc),
            ServiceChange::UpsertService(ObjectKey::new("x", "s"), vec!["10.96.0.5".parse().unwrap(), "fd10:96::5".parse().unwrap()])
        );
        let slice: EndpointSlice = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "s-abc", "namespace": "x", "labels": {"kubernetes.io/service-name": "s"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.0.7"]}]}),
        )
        .unwrap();
        assert_eq!(
            ServiceChange::from_slice(&slice),
            Some(ServiceChange::UpsertSlice {
                slice: ObjectKey::new("x", "s-abc"),
                service: ObjectKey::new("x", "s"),
                addresses: vec!["10.244.0.7".parse().unwrap()]
            })
        );
    }
}
