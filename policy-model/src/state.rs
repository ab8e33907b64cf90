//! The cluster as the model sees it, with the indices evaluation and compilation need.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::audit::View;
use crate::cnp::ClusterPolicy;
use crate::labels::Labels;
use crate::objects::{NAMESPACE_NAME_LABEL, Namespace, Node, ObjectKey, Pod};
use crate::policy::{Direction, NamespaceScope, Peer, Policy};

/// Who holds an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressOwner<'a> {
    /// A (non-hostNetwork) pod.
    Pod(&'a Pod),
    /// A node: its own addresses, and those of its hostNetwork pods.
    Node(&'a str),
    /// Anything else: outside the cluster, or a pod we do not know (yet).
    External,
}

/// Who claims one address. Almost always one pod or one node: sorted vectors, which cost
/// what they hold (a one-element BTreeSet allocates a whole node, ~0.5 KiB, per address).
#[derive(Debug, Default, Clone)]
struct AddressHolders {
    pods: SortedVec<ObjectKey>,
    nodes: SortedVec<String>,
}

/// A small sorted set: almost always empty or one element, held inline then (a one-element
/// Vec costs a heap allocation per address).
#[derive(Debug, Clone, Default)]
enum SortedVec<T> {
    #[default]
    Empty,
    One(T),
    Many(Vec<T>),
}

impl<T: Ord> SortedVec<T> {
    fn insert(&mut self, v: T) {
        *self = match std::mem::take(self) {
            SortedVec::Empty => SortedVec::One(v),
            SortedVec::One(x) if x == v => SortedVec::One(x),
            SortedVec::One(x) => SortedVec::Many(if x < v { vec![x, v] } else { vec![v, x] }),
            SortedVec::Many(mut all) => {
                if let Err(i) = all.binary_search(&v) {
                    all.insert(i, v);
                }
                SortedVec::Many(all)
            }
        };
    }

    fn remove(&mut self, v: &T) {
        *self = match std::mem::take(self) {
            SortedVec::One(x) if x == *v => SortedVec::Empty,
            SortedVec::Many(mut all) => {
                if let Ok(i) = all.binary_search(v) {
                    all.remove(i);
                }
                all.into_iter().collect()
            }
            other => other,
        };
    }

    fn first(&self) -> Option<&T> {
        match self {
            SortedVec::Empty => None,
            SortedVec::One(x) => Some(x),
            SortedVec::Many(all) => all.first(),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, SortedVec::Empty)
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn as_slice(&self) -> &[T] {
        match self {
            SortedVec::Empty => &[],
            SortedVec::One(x) => std::slice::from_ref(x),
            SortedVec::Many(all) => all,
        }
    }
}

impl<T: Ord> FromIterator<T> for SortedVec<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> SortedVec<T> {
        let mut v: Vec<T> = iter.into_iter().collect();
        v.sort();
        v.dedup();
        match v.len() {
            0 => SortedVec::Empty,
            1 => SortedVec::One(v.pop().expect("one")),
            _ => SortedVec::Many(v),
        }
    }
}

/// Namespaces, pods, policies and nodes, keyed and indexed.
#[derive(Debug, Default, Clone)]
pub struct ClusterState {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<ObjectKey, Pod>,
    policies: BTreeMap<ObjectKey, Policy>,
    nodes: BTreeMap<String, Node>,
    /// Every address, with every pod and node that claims it. Claims by several pods happen
    /// briefly when an address is reused; the first pod (by namespace/name) wins, the same
    /// for the evaluator and the compiler.
    addresses: HashMap<IpAddr, AddressHolders, foldhash::fast::RandomState>,
    /// Addresses that two pods or more claim. Usually none: then every pod owns all of its
    /// addresses, and [`Self::owned_ips`] needs no lookup (one per peer address was an
    /// eighth of a compile).
    contested: usize,
    /// Namespaces that hold pods, with their pod count: namespace selectors must see a
    /// namespace whose object we have not (yet) seen.
    pod_namespaces: BTreeMap<String, usize>,
    /// hostNetwork pods: their addresses are their node's.
    host_network_pods: BTreeSet<ObjectKey>,
    /// ClusterNetworkPolicies, by name (cluster-scoped).
    cluster_policies: BTreeMap<String, ClusterPolicy>,
    /// Node labels, kept apart from [`Node`] (which other code builds literally); read by
    /// ClusterNetworkPolicy `nodes` peers.
    node_labels: BTreeMap<String, Labels>,
    /// The node audits every policy (`--enforcement audit`; [`crate::audit`]).
    audit_all: bool,
    /// Which policies evaluation and compilation see ([`crate::audit::View`]).
    view: View,
}

impl ClusterState {
    pub fn new() -> ClusterState {
        ClusterState::default()
    }

    // ---- reads ----

    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values()
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name)
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values()
    }

    pub fn pod(&self, key: &ObjectKey) -> Option<&Pod> {
        self.pods.get(key)
    }

    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }

    pub fn policy(&self, key: &ObjectKey) -> Option<&Policy> {
        self.policies.get(key)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Pods of one namespace, in name order.
    pub fn pods_in(&self, namespace: &str) -> impl Iterator<Item = &Pod> {
        let start = ObjectKey::new(namespace, "");
        self.pods.range(start..).take_while(move |(k, _)| *k.namespace == *namespace).map(|(_, p)| p)
    }

    /// Policies of one namespace, in name order.
    pub fn policies_in(&self, namespace: &str) -> impl Iterator<Item = &Policy> {
        let start = ObjectKey::new(namespace, "");
        self.policies.range(start..).take_while(move |(k, _)| *k.namespace == *namespace).map(|(_, p)| p)
    }

    /// A namespace's labels; a namespace we have not seen still has its name label, which
    /// the control plane guarantees.
    pub fn namespace_labels(&self, namespace: &str) -> std::borrow::Cow<'_, Labels> {
        match self.namespaces.get(namespace) {
            Some(ns) => std::borrow::Cow::Borrowed(&ns.labels),
            None => std::borrow::Cow::Owned(Labels::from([(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string())])),
        }
    }

    /// Who holds `addr`. A pod wins over a node claim.
    pub fn owner(&self, addr: IpAddr) -> AddressOwner<'_> {
        let Some(h) = self.addresses.get(&addr) else {
            return AddressOwner::External;
        };
        if let Some(p) = h.pods.first().and_then(|k| self.pods.get(k)) {
            return AddressOwner::Pod(p);
        }
        match h.nodes.first() {
            Some(n) => AddressOwner::Node(n),
            None => AddressOwner::External,
        }
    }

    /// Every non-hostNetwork pod holding `addr`, the owner first: ownership moves among
    /// them as they come and go.
    pub fn pod_holders(&self, addr: IpAddr) -> impl Iterator<Item = &Pod> {
        self.addresses.get(&addr).map(|h| h.pods.as_slice()).unwrap_or(&[]).iter().filter_map(|k| self.pods.get(k))
    }

    /// Whether a node (a Node's address, or a hostNetwork pod's) holds `addr`.
    pub fn node_holds(&self, addr: IpAddr) -> bool {
        self.addresses.get(&addr).is_some_and(|h| !h.nodes.is_empty())
    }

    /// Whether node `node` (its Node's addresses, or a hostNetwork pod on it) claims
    /// `addr`, owned or not.
    pub fn node_claims(&self, addr: IpAddr, node: &str) -> bool {
        self.addresses.get(&addr).is_some_and(|h| h.nodes.as_slice().iter().any(|n| n == node))
    }

    /// The pod that owns `addr`, if any.
    pub fn pod_at(&self, addr: IpAddr) -> Option<&Pod> {
        match self.owner(addr) {
            AddressOwner::Pod(p) => Some(p),
            _ => None,
        }
    }

    /// The addresses `pod` is reachable at as a peer: the ones it owns.
    pub fn owned_ips<'a>(&'a self, pod: &'a Pod) -> impl Iterator<Item = IpAddr> + 'a {
        pod.ips.iter().copied().filter(move |ip| self.owns(pod, *ip))
    }

    /// [`Self::owned_ips`] of a pod borrowed from this state (`peer_pods`, `pods_in`): with
    /// no contested address, all of its addresses, without a lookup each.
    pub(crate) fn peer_ips<'a>(&'a self, pod: &'a Pod) -> impl Iterator<Item = IpAddr> + 'a {
        debug_assert!(self.pods.get(&pod.key).is_some_and(|p| std::ptr::eq(p, pod)), "{} is not borrowed from the state", pod.key);
        let uncontested = self.contested == 0 && !pod.host_network;
        pod.ips.iter().copied().filter(move |ip| uncontested || self.owns(pod, *ip))
    }

    /// Whether `pod` owns `addr`. The first holder owns an address (`owner`). Holders are
    /// exactly the pods in `self.pods` (upsert_pod/remove_pod), so comparing keys is
    /// enough, and interned keys compare by pointer.
    fn owns(&self, pod: &Pod, addr: IpAddr) -> bool {
        self.addresses.get(&addr).and_then(|h| h.pods.first()).is_some_and(|k| *k == pod.key)
    }

    /// The addresses traffic from node `name` comes from: the Node's addresses and its
    /// hostNetwork pods' addresses.
    pub fn node_addresses(&self, name: &str) -> BTreeSet<IpAddr> {
        let mut out: BTreeSet<IpAddr> = self.nodes.get(name).map(|n| n.addresses.iter().copied().collect()).unwrap_or_default();
        for p in self.host_network_pods().filter(|p| p.node.as_deref() == Some(name)) {
            out.extend(p.ips.iter().copied());
        }
        out.retain(|ip| matches!(self.owner(*ip), AddressOwner::Node(n) if n == name));
        out
    }

    /// Whether `policy` selects `pod` as a target (hostNetwork pods never are).
    pub fn selects(&self, policy: &Policy, pod: &Pod) -> bool {
        !pod.host_network && policy.key.namespace == pod.key.namespace && policy.pod_selector.matches(&pod.labels)
    }

    /// Policies that isolate `pod` in `direction`, in key order (in the enforced view,
    /// audited ones are left out).
    pub fn isolating_policies<'a>(&'a self, pod: &'a Pod, direction: Direction) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies_in(&pod.key.namespace)
            .filter(move |p| p.rules(direction).is_some() && self.selects(p, pod) && (self.view == View::Audit || !self.is_audited(p)))
    }

    // ---- audit mode (crate::audit) ----

    /// Whether `policy` is audited: by its annotation, its namespace's, or the node's.
    pub fn is_audited(&self, policy: &Policy) -> bool {
        self.audit_all
            || policy.enforcement.is_audit()
            || self.namespaces.get(&*policy.key.namespace).is_some_and(|ns| ns.enforcement.is_audit())
    }

    /// Whether the node audits every policy.
    pub fn audit_all(&self) -> bool {
        self.audit_all
    }

    pub fn set_audit_all(&mut self, on: bool) {
        self.audit_all = on;
    }

    pub fn view(&self) -> View {
        self.view
    }

    pub fn set_view(&mut self, view: View) {
        self.view = view;
    }

    /// Runs `f` on the state in `view`, then restores the view it was in.
    pub fn with_view<R>(&mut self, view: View, f: impl FnOnce(&ClusterState) -> R) -> R {
        let before = std::mem::replace(&mut self.view, view);
        let out = f(self);
        self.view = before;
        out
    }

    /// The ClusterNetworkPolicies evaluation sees: all of them, except in the enforced
    /// view of a node that audits every policy (none then).
    pub fn judging_cluster_policies(&self) -> impl Iterator<Item = &ClusterPolicy> {
        let hidden = self.audit_all && self.view == View::Enforced;
        self.cluster_policies.values().filter(move |_| !hidden)
    }

    /// Whether any policy is audited (then the audit view may differ from the enforced one).
    pub fn has_audited(&self) -> bool {
        (self.audit_all && !self.cluster_policies.is_empty()) || self.policies.values().any(|p| self.is_audited(p))
    }

    /// Whether a pod peer (`Peer::Pods`) of a policy in `policy_ns` matches `pod`.
    pub fn pod_peer_matches(&self, policy_ns: &str, namespaces: &NamespaceScope, pods: &crate::labels::Selector, pod: &Pod) -> bool {
        if pod.host_network {
            return false;
        }
        // The pod's own labels first: no lookup, and most peers fail there (every pod
        // upsert asks this of every policy in use on the node).
        pods.matches(&pod.labels)
            && match namespaces {
                NamespaceScope::PolicyNamespace => *pod.key.namespace == *policy_ns,
                NamespaceScope::Matching(sel) => sel.matches(&self.namespace_labels(&pod.key.namespace)),
            }
    }

    /// Namespaces a peer's scope covers (including ones only known through their pods).
    pub fn scoped_namespaces<'a>(&'a self, policy_ns: &'a str, scope: &'a NamespaceScope) -> Vec<&'a str> {
        match scope {
            NamespaceScope::PolicyNamespace => vec![policy_ns],
            NamespaceScope::Matching(sel) => {
                let mut names: BTreeSet<&str> = self.namespaces.keys().map(String::as_str).collect();
                names.extend(self.pod_namespaces.keys().map(String::as_str));
                names.into_iter().filter(|n| sel.matches(&self.namespace_labels(n))).collect()
            }
        }
    }

    /// Pods a `Peer::Pods` of a policy in `policy_ns` selects.
    pub fn peer_pods<'a>(&'a self, policy_ns: &'a str, peer: &'a Peer) -> Vec<&'a Pod> {
        let Peer::Pods { namespaces, pods } = peer else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for ns in self.scoped_namespaces(policy_ns, namespaces) {
            out.extend(self.pods_in(ns).filter(|p| !p.host_network && pods.matches(&p.labels)));
        }
        out
    }

    /// ClusterNetworkPolicies in name order.
    pub fn cluster_policies(&self) -> impl Iterator<Item = &ClusterPolicy> {
        self.cluster_policies.values()
    }

    pub fn cluster_policy(&self, name: &str) -> Option<&ClusterPolicy> {
        self.cluster_policies.get(name)
    }

    /// A node's labels (empty for a node we have no labels for).
    pub fn node_labels(&self, name: &str) -> std::borrow::Cow<'_, Labels> {
        match self.node_labels.get(name) {
            Some(l) => std::borrow::Cow::Borrowed(l),
            None => std::borrow::Cow::Owned(Labels::new()),
        }
    }

    /// Every node that may own addresses: Node objects and the nodes of hostNetwork pods.
    pub fn node_names(&self) -> BTreeSet<&str> {
        let mut names: BTreeSet<&str> = self.nodes.keys().map(String::as_str).collect();
        names.extend(self.host_network_pods().filter_map(|p| p.node.as_deref()));
        names
    }

    fn host_network_pods(&self) -> impl Iterator<Item = &Pod> {
        self.host_network_pods.iter().filter_map(|k| self.pods.get(k))
    }

    // ---- writes ----

    pub fn upsert_namespace(&mut self, ns: Namespace) -> Option<Namespace> {
        self.namespaces.insert(ns.name.clone(), ns)
    }

    pub fn remove_namespace(&mut self, name: &str) -> Option<Namespace> {
        self.namespaces.remove(name)
    }

    pub fn upsert_policy(&mut self, policy: Policy) -> Option<Policy> {
        self.policies.insert(policy.key.clone(), policy)
    }

    pub fn remove_policy(&mut self, key: &ObjectKey) -> Option<Policy> {
        self.policies.remove(key)
    }

    pub fn upsert_cluster_policy(&mut self, policy: ClusterPolicy) -> Option<ClusterPolicy> {
        self.cluster_policies.insert(policy.name.clone(), policy)
    }

    pub fn remove_cluster_policy(&mut self, name: &str) -> Option<ClusterPolicy> {
        self.cluster_policies.remove(name)
    }

    /// Sets a node's labels (independent of its [`Node`] object; empty labels forget them).
    pub fn set_node_labels(&mut self, name: &str, labels: Labels) -> Option<Labels> {
        if labels.is_empty() { self.node_labels.remove(name) } else { self.node_labels.insert(name.to_string(), labels) }
    }

    pub fn upsert_pod(&mut self, pod: Pod) -> Option<Pod> {
        let old = self.remove_pod(&pod.key.clone());
        for ip in &pod.ips {
            let h = self.addresses.entry(*ip).or_default();
            if pod.host_network {
                if let Some(n) = &pod.node {
                    h.nodes.insert(n.clone());
                }
            } else {
                let before = h.pods.len();
                h.pods.insert(pod.key.clone());
                if before == 1 && h.pods.len() == 2 {
                    self.contested += 1;
                }
            }
        }
        *self.pod_namespaces.entry(pod.key.namespace.to_string()).or_default() += 1;
        if pod.host_network {
            self.host_network_pods.insert(pod.key.clone());
        }
        self.pods.insert(pod.key.clone(), pod);
        old
    }

    pub fn remove_pod(&mut self, key: &ObjectKey) -> Option<Pod> {
        let old = self.pods.remove(key)?;
        self.host_network_pods.remove(key);
        if let Some(n) = self.pod_namespaces.get_mut(&*key.namespace) {
            *n -= 1;
            if *n == 0 {
                self.pod_namespaces.remove(&*key.namespace);
            }
        }
        for ip in &old.ips {
            if let Some(h) = self.addresses.get_mut(ip) {
                let before = h.pods.len();
                h.pods.remove(key);
                if before == 2 && h.pods.len() == 1 {
                    self.contested -= 1;
                }
                if old.host_network {
                    self.recompute_node_claims(*ip);
                }
            }
            self.drop_if_unclaimed(*ip);
        }
        Some(old)
    }

    pub fn upsert_node(&mut self, node: Node) -> Option<Node> {
        let old = self.nodes.insert(node.name.clone(), node.clone());
        if let Some(o) = &old {
            for ip in &o.addresses {
                self.recompute_node_claims(*ip);
                self.drop_if_unclaimed(*ip);
            }
        }
        for ip in &node.addresses {
            self.addresses.entry(*ip).or_default().nodes.insert(node.name.clone());
        }
        old
    }

    pub fn remove_node(&mut self, name: &str) -> Option<Node> {
        let old = self.nodes.remove(name)?;
        for ip in &old.addresses {
            self.recompute_node_claims(*ip);
            self.drop_if_unclaimed(*ip);
        }
        Some(old)
    }

    fn recompute_node_claims(&mut self, ip: IpAddr) {
        let mut nodes = BTreeSet::new();
        for n in self.nodes.values().filter(|n| n.addresses.contains(&ip)) {
            nodes.insert(n.name.clone());
        }
        nodes.extend(self.host_network_pods().filter(|p| p.ips.contains(&ip)).filter_map(|p| p.node.clone()));
        if let Some(h) = self.addresses.get_mut(&ip) {
            h.nodes = nodes.into_iter().collect();
        }
    }

    fn drop_if_unclaimed(&mut self, ip: IpAddr) {
        if self.addresses.get(&ip).is_some_and(|h| h.pods.is_empty() && h.nodes.is_empty()) {
            self.addresses.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str) -> Pod {
        Pod {
            key: ObjectKey::new("ns", name),
            labels: Labels::new(),
            ips: vec![ip.parse().unwrap()],
            node: Some("n1".into()),
            host_network: false,
            named_ports: vec![],
        }
    }

    /// What each pod's peer addresses are, read as `compile` reads them.
    fn peer_ips(state: &ClusterState) -> Vec<(String, Vec<IpAddr>)> {
        state.pods().map(|p| (p.key.name.to_string(), state.peer_ips(p).collect())).collect()
    }

    #[test]
    fn a_reused_address_belongs_to_its_first_holder_until_it_goes() {
        let mut s = ClusterState::new();
        s.upsert_pod(pod("b", "10.0.0.1"));
        s.upsert_pod(pod("c", "10.0.0.2"));
        assert_eq!(peer_ips(&s), vec![("b".into(), vec!["10.0.0.1".parse().unwrap()]), ("c".into(), vec!["10.0.0.2".parse().unwrap()])]);
        // a takes b's address while b still holds it: a (first by name) owns it.
        s.upsert_pod(pod("a", "10.0.0.1"));
        assert_eq!(s.contested, 1);
        let got = peer_ips(&s);
        assert_eq!(got[0], ("a".into(), vec!["10.0.0.1".parse().unwrap()]));
        assert_eq!(got[1], ("b".into(), vec![]));
        // a moves on: b owns its address again, and nothing is contested.
        s.upsert_pod(pod("a", "10.0.0.3"));
        assert_eq!(s.contested, 0);
        assert_eq!(peer_ips(&s)[1], ("b".into(), vec!["10.0.0.1".parse().unwrap()]));
        s.upsert_pod(pod("d", "10.0.0.2"));
        s.remove_pod(&ObjectKey::new("ns", "c"));
        assert_eq!(s.contested, 0);
        assert_eq!(peer_ips(&s).iter().map(|(_, ips)| ips.len()).sum::<usize>(), 3);
    }
}
