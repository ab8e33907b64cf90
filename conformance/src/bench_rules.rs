//! The datapath benchmark's policy, generated once and written in three forms: the
//! NetworkPolicies the agent enforces, an `iptables-restore` ruleset in the style
//! kube-router generates, and an nftables ruleset with sets. The three allow the same
//! flows, so the benchmark compares mechanisms, not policies.
//!
//! The policy selects two pods: the server's ingress and the client's egress each get `n`
//! rules. The first `n - 1` do not match the benchmark's traffic and mix the shapes real
//! policies have: pod peers (/32), CIDRs with excepts, and port ranges. The last rule is
//! the one that matches: the other pod, on the benchmark's ports.

use std::net::Ipv4Addr;

use policy_model::{Change, ObjectKey, Pod};
use serde_json::{Value, json};

/// The namespace of every pod and policy.
pub const NAMESPACE: &str = "x";
/// The node the peer pods live on (they have no interface on the emulated node).
pub const PEER_NODE: &str = "node-2";
/// TCP connections and UDP request/response go to this port; bulk TCP to the next one.
pub const RR_PORT: u16 = 8080;
pub const BULK_PORT: u16 = 8081;
/// The iptables chains and the nftables table, all in the node's namespace.
pub const IPT_FORWARD: &str = "PA-BENCH-FORWARD";
pub const IPT_SERVER_IN: &str = "PA-BENCH-SERVER-IN";
pub const IPT_CLIENT_OUT: &str = "PA-BENCH-CLIENT-OUT";
pub const NFT_TABLE: &str = "pa_bench";
/// The mark an except chain sets when its CIDR rule allows (kube-router's 0x10000).
const ALLOW_MARK: &str = "0x10000/0x10000";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn k8s(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
    fn lower(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One protocol and a port or an inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub proto: Proto,
    pub first: u16,
    pub last: u16,
}

/// An IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    /// The inclusive range of addresses, as integers.
    fn range(self) -> (u32, u32) {
        let start = u32::from(self.addr);
        let size = if self.len == 0 { u32::MAX } else { (1u32 << (32 - self.len)) - 1 };
        (start, start | size)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A pod, selected by its label `peer=<label>` (or `pod=<label>` for the bench's own pods).
    Pod { label_key: &'static str, label: String, ip: Ipv4Addr },
    /// An ipBlock.
    Block { cidr: Cidr, except: Vec<Cidr> },
}

impl Peer {
    fn k8s(&self) -> Value {
        match self {
            Peer::Pod { label_key, label, .. } => json!({"podSelector": {"matchLabels": {*label_key: label}}}),
            Peer::Block { cidr, except } if except.is_empty() => json!({"ipBlock": {"cidr": cidr.to_string()}}),
            Peer::Block { cidr, except } => {
                json!({"ipBlock": {"cidr": cidr.to_string(), "except": except.iter().map(Cidr::to_string).collect::<Vec<_>>()}})
            }
        }
    }

    /// The addresses this peer stands for, as disjoint inclusive ranges (excepts subtracted).
    pub fn ranges(&self) -> Vec<(u32, u32)> {
        match self {
            Peer::Pod { ip, .. } => vec![(u32::from(*ip), u32::from(*ip))],
            Peer::Block { cidr, except } => {
                let mut out = vec![cidr.range()];
                for e in except {
                    let (es, ee) = e.range();
                    out = out
                        .into_iter()
                        .flat_map(|(s, t)| {
                            let mut keep = Vec::new();
                            if ee < s || es > t {
                                keep.push((s, t));
                            } else {
                                if es > s {
                                    keep.push((s, es - 1));
                                }
                                if ee < t {
                                    keep.push((ee + 1, t));
                                }
                            }
                            keep
                        })
                        .collect();
                }
                out
            }
        }
    }
}

/// One NetworkPolicy rule: one peer, one or more port specs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub peer: Peer,
    pub ports: Vec<Ports>,
}

/// The whole policy for `n` rules per side.
#[derive(Debug, Clone)]
pub struct BenchPolicy {
    pub client: Ipv4Addr,
    pub server: Ipv4Addr,
    /// The server's ingress rules (peers are sources).
    pub ingress: Vec<Rule>,
    /// The client's egress rules (peers are destinations).
    pub egress: Vec<Rule>,
}

/// The pod peer of filler rule `i` (only every third rule has one).
fn peer_pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64 + (i / 62_500) as u8, ((i / 250) % 250) as u8, (1 + i % 250) as u8)
}

/// Filler rule `i`: never matches the benchmark's pods (10.244.0.0/16) or ports.
fn filler(i: usize) -> Rule {
    // A /24 of its own in 10.0.0.0–10.239.255.255.
    let b = Ipv4Addr::new(10, ((i / 256) % 240) as u8, (i % 256) as u8, 0);
    match i % 3 {
        // A pod peer on a single port.
        0 => Rule {
            peer: Peer::Pod { label_key: "peer", label: format!("p{i}"), ip: peer_pod_ip(i) },
            ports: vec![Ports { proto: Proto::Tcp, first: 9000 + (i % 100) as u16, last: 9000 + (i % 100) as u16 }],
        },
        // A CIDR with two excepts, on a single port.
        1 => Rule {
            peer: Peer::Block {
                cidr: Cidr { addr: b, len: 24 },
                except: vec![
                    Cidr { addr: Ipv4Addr::from(u32::from(b) | 16), len: 28 },
                    Cidr { addr: Ipv4Addr::from(u32::from(b) | 128), len: 26 },
                ],
            },
            ports: vec![Ports { proto: Proto::Tcp, first: 443 + (i % 7) as u16, last: 443 + (i % 7) as u16 }],
        },
        // A CIDR on a port range (endPort), alternating TCP and UDP.
        _ => {
            let first = 20_000 + (i % 100) as u16 * 10;
            Rule {
                peer: Peer::Block { cidr: Cidr { addr: b, len: 24 }, except: vec![] },
                ports: vec![Ports { proto: if i % 2 == 0 { Proto::Tcp } else { Proto::Udp }, first, last: first + 9 }],
            }
        }
    }
}

impl BenchPolicy {
    /// `n` (≥ 1) rules on the server's ingress and on the client's egress, the matching one last.
    pub fn generate(n: usize, client: Ipv4Addr, server: Ipv4Addr) -> BenchPolicy {
        assert!(n >= 1, "at least the matching rule");
        assert!(n <= 61_440, "one /24 per filler rule in 10.0.0.0–10.239.255.255");
        let matching = |label: &str, ip: Ipv4Addr| Rule {
            peer: Peer::Pod { label_key: "pod", label: label.to_string(), ip },
            ports: vec![
                Ports { proto: Proto::Tcp, first: RR_PORT, last: BULK_PORT },
                Ports { proto: Proto::Udp, first: RR_PORT, last: RR_PORT },
            ],
        };
        let side = |last: Rule| -> Vec<Rule> { (0..n - 1).map(filler).chain(std::iter::once(last)).collect() };
        BenchPolicy { client, server, ingress: side(matching("client", client)), egress: side(matching("server", server)) }
    }

    /// The model's pods that the pod peers select (on another node). Labels `peer=p<i>`.
    pub fn peer_pods(&self) -> Vec<Pod> {
        let mut pods = std::collections::BTreeMap::new();
        for rule in self.ingress.iter().chain(&self.egress) {
            if let Peer::Pod { label_key: "peer", label, ip } = &rule.peer {
                pods.entry(label.clone()).or_insert_with(|| Pod {
                    key: ObjectKey::new(NAMESPACE, format!("peer-{label}")),
                    labels: [("peer".to_string(), label.clone())].into(),
                    ips: vec![(*ip).into()],
                    node: Some(PEER_NODE.into()),
                    host_network: false,
                    named_ports: vec![],
                });
            }
        }
        pods.into_values().collect()
    }

    /// The two NetworkPolicies (server ingress, client egress) as model changes.
    pub fn network_policies(&self) -> Vec<Change> {
        self.policies_named("", json!({}))
    }

    /// Copies of [`BenchPolicy::network_policies`] (same rules, names `bench-*-audit`)
    /// annotated `policy-agent.io/enforcement: audit`: beside the enforced ones, each side
    /// gets an audit table as big as its enforced table, which a new flow the enforced one
    /// allows is looked up in too.
    pub fn audited_copies(&self) -> Vec<Change> {
        self.policies_named("-audit", json!({"policy-agent.io/enforcement": "audit"}))
    }

    fn policies_named(&self, suffix: &str, annotations: Value) -> Vec<Change> {
        let rules = |rules: &[Rule], peer_key: &str| -> Vec<Value> {
            rules
                .iter()
                .map(|r| {
                    let ports: Vec<Value> = r
                        .ports
                        .iter()
                        .map(|p| {
                            if p.first == p.last {
                                json!({"protocol": p.proto.k8s(), "port": p.first})
                            } else {
                                json!({"protocol": p.proto.k8s(), "port": p.first, "endPort": p.last})
                            }
                        })
                        .collect();
                    json!({peer_key: [r.peer.k8s()], "ports": ports})
                })
                .collect()
        };
        let np = |name: &str, spec: Value| -> Change {
            Change::UpsertPolicy(Box::new(
                serde_json::from_value(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": format!("{name}{suffix}"), "namespace": NAMESPACE, "annotations": annotations}, "spec": spec}))
                .expect("a valid NetworkPolicy"),
            ))
        };
        vec![
            np(
                "bench-server",
                json!({"podSelector": {"matchLabels": {"pod": "server"}}, "policyTypes": ["Ingress"], "ingress": rules(&self.ingress, "from")}),
            ),
            np(
                "bench-client",
                json!({"podSelector": {"matchLabels": {"pod": "client"}}, "policyTypes": ["Egress"], "egress": rules(&self.egress, "to")}),
            ),
        ]
    }

    /// An `iptables-restore` input (it replaces the filter table) in kube-router's style:
    /// FORWARD jumps to a chain per pod and direction; each starts by accepting
    /// RELATED,ESTABLISHED, then has one rule per peer and port spec, in order, and ends
    /// with REJECT. A rule that allows RETURNs (on to the other pod's chain, then FORWARD's
    /// ACCEPT policy). A CIDR with excepts jumps to a chain of its own that RETURNs for the
    /// excepts and otherwise sets kube-router's allow mark, checked before the REJECT.
    pub fn iptables_restore(&self) -> String {
        let mut chains = vec![IPT_FORWARD.to_string(), IPT_SERVER_IN.to_string(), IPT_CLIENT_OUT.to_string()];
        let mut rules = vec![
            format!("-A FORWARD -j {IPT_FORWARD}"),
            format!("-A {IPT_FORWARD} -d {}/32 -j {IPT_SERVER_IN}", self.server),
            format!("-A {IPT_FORWARD} -s {}/32 -j {IPT_CLIENT_OUT}", self.client),
        ];
        for (chain, side, addr_flag, tag) in [(IPT_SERVER_IN, &self.ingress, "-s", "I"), (IPT_CLIENT_OUT, &self.egress, "-d", "E")] {
            rules.push(format!("-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"));
            rules.push(format!("-A {chain} -j MARK --set-xmark 0x0/0x10000"));
            for (i, rule) in side.iter().enumerate() {
                let (peer, target) = match &rule.peer {
                    Peer::Pod { ip, .. } => (format!("{ip}/32"), "RETURN".to_string()),
                    Peer::Block { cidr, except } if except.is_empty() => (cidr.to_string(), "RETURN".to_string()),
                    Peer::Block { cidr, except } => {
                        let sub = format!("PA-BENCH-EXC-{tag}{i}");
                        chains.push(sub.clone());
                        for e in except {
                            rules.push(format!("-A {sub} {addr_flag} {e} -j RETURN"));
                        }
                        rules.push(format!("-A {sub} -j MARK --set-xmark {ALLOW_MARK}"));
                        (cidr.to_string(), sub)
                    }
                };
                for p in &rule.ports {
                    let (proto, ports) =
                        (p.proto.lower(), if p.first == p.last { p.first.to_string() } else { format!("{}:{}", p.first, p.last) });
                    rules.push(format!("-A {chain} {addr_flag} {peer} -p {proto} -m {proto} --dport {ports} -j {target}"));
                }
            }
            rules.push(format!("-A {chain} -m mark --mark {ALLOW_MARK} -j RETURN"));
            rules.push(format!("-A {chain} -j REJECT"));
        }
        let mut out = String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        for c in &chains {
            out.push_str(&format!(":{c} - [0:0]\n"));
        }
        for r in &rules {
            out.push_str(r);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
        out
    }

    /// An `nft -f` input: table `ip pa_bench`, a forward chain that accepts established and
    /// related first, then jumps to a chain per pod and direction, each one lookup in an
    /// interval set of `address . protocol . port` (CIDRs with their excepts subtracted,
    /// port ranges as ranges), RETURN on a hit, else reject.
    pub fn nft_ruleset(&self) -> String {
        let elements = |side: &[Rule]| -> String {
            let mut els = Vec::new();
            for rule in side {
                for (s, t) in rule.peer.ranges() {
                    let addr = if s == t { Ipv4Addr::from(s).to_string() } else { format!("{}-{}", Ipv4Addr::from(s), Ipv4Addr::from(t)) };
                    for p in &rule.ports {
                        let ports = if p.first == p.last { p.first.to_string() } else { format!("{}-{}", p.first, p.last) };
                        els.push(format!("{addr} . {} . {ports}", p.proto.lower()));
                    }
                }
            }
            els.join(",\n      ")
        };
        format!(
            "table ip {NFT_TABLE} {{
  set server_in {{
    type ipv4_addr . inet_proto . inet_service
    flags interval
    elements = {{ {server_in} }}
  }}
  set client_out {{
    type ipv4_addr . inet_proto . inet_service
    flags interval
    elements = {{ {client_out} }}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    ip daddr {server} jump server_in
    ip saddr {client} jump client_out
  }}
  chain server_in {{
    ip saddr . meta l4proto . th dport @server_in return
    reject
  }}
  chain client_out {{
    ip daddr . meta l4proto . th dport @client_out return
    reject
  }}
}}
",
            server_in = elements(&self.ingress),
            client_out = elements(&self.egress),
            server = self.server,
            client = self.client,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::{Netns, unique};

    fn policy(n: usize) -> BenchPolicy {
        BenchPolicy::generate(n, "10.244.0.10".parse().unwrap(), "10.244.0.11".parse().unwrap())
    }

    #[test]
    fn every_form_has_n_rules_per_side_with_the_matching_one_last() {
        for n in [1, 10, 1_000] {
            let p = policy(n);
            assert_eq!((p.ingress.len(), p.egress.len()), (n, n));
            assert!(matches!(&p.ingress[n - 1].peer, Peer::Pod { label, .. } if label == "client"));
            // One iptables rule per peer and port spec: n - 1 fillers, two for the matching rule.
            let ipt = p.iptables_restore();
            for (chain, matching) in [(IPT_SERVER_IN, "-s 10.244.0.10/32"), (IPT_CLIENT_OUT, "-d 10.244.0.11/32")] {
                let peer_rules: Vec<&str> =
                    ipt.lines().filter(|l| l.starts_with(&format!("-A {chain} ")) && l.contains(" --dport ")).collect();
                assert_eq!(peer_rules.len(), n + 1, "{chain}");
                assert!(peer_rules[n - 1].contains(matching) && peer_rules[n].contains(matching), "{chain}: matching rule last");
                let all: Vec<&str> = ipt.lines().filter(|l| l.starts_with(&format!("-A {chain} "))).collect();
                assert!(all[0].contains("--ctstate RELATED,ESTABLISHED -j ACCEPT"));
                assert_eq!(*all.last().unwrap(), format!("-A {chain} -j REJECT"));
            }
            // Excepts are subtracted in the nft sets: a /24 minus a /28 and a /26 is 3 ranges.
            let elements: usize = p.ingress.iter().map(|r| r.peer.ranges().len() * r.ports.len()).sum();
            let nft = p.nft_ruleset();
            assert_eq!(nft.matches(" . tcp . ").count() + nft.matches(" . udp . ").count(), 2 * elements);
        }
        let block = &policy(3).ingress[1].peer;
        assert_eq!(block.ranges(), vec![(0x0a00_0100, 0x0a00_010f), (0x0a00_0120, 0x0a00_017f), (0x0a00_01c0, 0x0a00_01ff)]);
    }

    #[test]
    fn pod_peers_are_pods_of_another_node() {
        let p = policy(10);
        let pods = p.peer_pods();
        assert_eq!(pods.len(), 3); // fillers 0–8: pod peers are 0, 3 and 6
        assert!(pods.iter().all(|pod| pod.node.as_deref() == Some(PEER_NODE)));
    }

    /// The kernel takes both rulesets (checked without committing, in a throwaway namespace).
    #[test]
    fn the_kernel_accepts_both_rulesets() {
        let ns = Netns::create(&unique("pab")).expect("netns (root)");
        let p = policy(1_000);
        let dir = tempfile::tempdir().unwrap();
        let nft = dir.path().join("rules.nft");
        std::fs::write(&nft, p.nft_ruleset()).unwrap();
        ns.exec("nft", &["-c", "-f", nft.to_str().unwrap()]).expect("nft -c accepts the ruleset");
        let ipt = dir.path().join("rules.ipt");
        std::fs::write(&ipt, p.iptables_restore()).unwrap();
        ns.exec("iptables-restore", &["--test", ipt.to_str().unwrap()]).expect("iptables-restore --test accepts the ruleset");
    }
}
