//! A flow with names: what the agent makes of one kernel `FlowEvent`, as the flow log,
//! `observe` and the observe socket carry it (one JSON object per line, these field names).

use serde::{Deserialize, Serialize};

/// One judged new flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// RFC 3339, UTC, microseconds: when the kernel judged it.
    pub time: String,
    /// The same, as nanoseconds since the Unix epoch (for `--since`).
    pub time_unix_ns: u64,
    pub node: String,
    /// `allowed`, `denied`, or `audit` (allowed, and audited policies would have denied
    /// it: they come first in `policies`, with role `audited`).
    pub verdict: String,
    /// `ingress` or `egress`, of the local pod that judged (`subject`).
    pub direction: String,
    /// The local pod whose policies judged the flow (`namespace/name`).
    pub subject: String,
    pub source: End,
    pub destination: End,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, or `proto-N`.
    pub protocol: String,
    /// ICMP and ICMPv6: the message's type and code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<Icmp>,
    /// The interface the packet was on (the pod's host-side veth, or a node device).
    pub interface: Interface,
    /// What in the subject's table decided: `not_isolated`, `rule` (an entry allowed it),
    /// `no_rule` (isolated, and nothing allows this peer), `port_not_allowed` (rules allow
    /// this peer, not this port or protocol), `fail_closed` (the pod's tables could not be
    /// written).
    pub decided_by: String,
    /// The decision in words.
    pub reason: String,
    /// The policies and rules that decided (see [`PolicyRef`]).
    pub policies: Vec<PolicyRef>,
    /// The subject's table revision the kernel judged with; `tables_exact` false if the
    /// agent no longer had that revision's provenance and named the current one.
    pub revision: u32,
    pub tables_exact: bool,
}

/// One end of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// `pod`, `node` or `world`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// For `node`: the node's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub ip: String,
    /// TCP, UDP, SCTP: the port; else absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl End {
    /// `ns/pod:port`, `node NAME`, or the address.
    pub fn label(&self) -> String {
        let who = match (self.kind.as_str(), &self.namespace, &self.pod, &self.node) {
            ("pod", Some(ns), Some(pod), _) => format!("{ns}/{pod}"),
            ("node", _, _, Some(n)) => format!("node:{n}"),
            _ => self.ip.clone(),
        };
        match self.port {
            Some(p) if who.contains(':') && self.kind == "world" => format!("[{who}]:{p}"),
            Some(p) => format!("{who}:{p}"),
            None => who,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Icmp {
    #[serde(rename = "type")]
    pub kind: u8,
    pub code: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A policy (and rule) that took part in the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    /// `NetworkPolicy` or `ClusterNetworkPolicy`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// `isolates` (a NetworkPolicy that selects the subject in this direction: with no
    /// rule allowing the flow, that is why it is denied), `allows` (a rule that allows
    /// this peer), a ClusterNetworkPolicy rule's action (`accept`, `deny`, `pass`), or
    /// `audited` (an audited policy that applies: verdict `audit`).
    pub role: String,
    /// The rule's index in the policy's rules of this direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// ClusterNetworkPolicy: tier, priority and the rule's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_name: Option<String>,
}

impl PolicyRef {
    pub fn label(&self) -> String {
        let name = match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        };
        let kind = if self.kind == "ClusterNetworkPolicy" { "cnp " } else { "" };
        match self.rule {
            Some(r) => format!("{kind}{name} rule #{r}"),
            None => format!("{kind}{name}"),
        }
    }
}

impl Flow {
    /// One line for an operator:
    /// `12:01:02.345678  shop/frontend:43512 -> shop/db:5432 TCP  DENIED  (ingress of shop/db: ...)`.
    pub fn text(&self) -> String {
        let clock = self.time.split('T').nth(1).unwrap_or(&self.time).trim_end_matches('Z');
        let icmp = self.icmp.map(|i| format!(" type {} code {}", i.kind, i.code)).unwrap_or_default();
        format!(
            "{clock}  {} -> {} {}{icmp}  {}  ({} of {}: {})",
            self.source.label(),
            self.destination.label(),
            self.protocol,
            self.verdict.to_uppercase(),
            self.direction,
            self.subject,
            self.reason
        )
    }
}

/// `2026-11-30T12:01:02.345678Z` for nanoseconds since the Unix epoch.
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z", rem / 3600, (rem / 60) % 60, rem % 60)
}

/// A flow record for tests: `subject`'s ingress, denied, from a world address, naming
/// `policies` (JSON [`PolicyRef`]s).
#[cfg(test)]
pub(crate) fn sample(subject: &str, policies: serde_json::Value) -> Flow {
    let end = serde_json::json!({"kind": "world", "ip": "192.0.2.1"});
    serde_json::from_value(serde_json::json!({
        "time": "2026-11-30T12:00:00.000000Z", "time_unix_ns": 0, "node": "n1", "verdict": "denied",
        "direction": "ingress", "subject": subject, "source": end, "destination": end, "protocol": "TCP",
        "interface": {"index": 7}, "decided_by": "no_rule", "reason": "", "policies": policies,
        "revision": 1, "tables_exact": true,
    }))
    .expect("a flow record")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        // 2026-11-30T12:01:02.345678Z
        assert_eq!(rfc3339(1_796_040_062_345_678_000), "2026-11-30T12:01:02.345678Z");
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000000Z");
    }
}
