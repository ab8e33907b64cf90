//! Services and their EndpointSlices, for the datapath's placement of egress checks: a
//! Service address whose endpoints are all pods is judged after DNAT, against the backend
//! (`SERVICES` map). One with an endpoint that is not a pod (the `kubernetes` Service's
//! API server, an external endpoint) is judged before translation, because its backend may
//! be this node itself, where no egress hook runs after DNAT.

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

    /// The Service addresses whose egress judgment waits for DNAT: those whose endpoints
    /// are all pods of `state`.
    pub fn deferred(&self, state: &ClusterState) -> BTreeSet<Prefix> {
        let mut endpoints: BTreeMap<&ObjectKey, Vec<IpAddr>> = BTreeMap::new();
        for (service, addresses) in self.slices.values() {
            endpoints.entry(service).or_default().extend(addresses.iter().copied());
        }
        let mut out = BTreeSet::new();
        for (service, vips) in &self.cluster_ips {
            let eps = endpoints.get(service).map(Vec::as_slice).unwrap_or_default();
            if !eps.is_empty() && eps.iter().all(|a| state.pod_at(*a).is_some()) {
                out.extend(vips.iter().map(|v| Prefix::host(*v)));
            }
        }
        out
    }
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
        let d: Vec<String> = s.deferred(&state).iter().map(|p| p.to_string()).collect();
        assert_eq!(d, ["10.96.0.10/32", "fd10:96::10/128"]);
        // A mixed Service (one endpoint outside the pods) is judged before translation.
        s.apply([ServiceChange::UpsertSlice { slice: k("web-3"), service: k("web"), addresses: vec!["192.168.5.5".parse().unwrap()] }]);
        assert!(s.deferred(&state).is_empty());
        s.apply([ServiceChange::DeleteSlice(k("web-3"))]);
        assert_eq!(s.deferred(&state).len(), 2);
        s.apply([ServiceChange::DeleteService(k("web"))]);
        assert!(s.deferred(&state).is_empty());
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
