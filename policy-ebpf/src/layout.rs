//! Versioned map layouts.
//!
//! Maps outlive the agent (they are pinned), so an agent meets maps that another build
//! made. `LAYOUT_VERSION` names the layout this build's programs and agent use; the agent
//! pins its maps in a directory named after it, and migrates maps of any other layout
//! (`policy-agent/src/datapath/migrate.rs`).
//!
//! `layouts/v<N>.txt` records each version's fingerprint: every shared type's size,
//! alignment and fields (name, type, offset), the maps (name, kind, key and value types,
//! pinned or not, as the kernel programs declare them) and the constants that give the
//! bytes their meaning. A test compares the current fingerprint with the recorded one of
//! `LAYOUT_VERSION`: any change to the layout fails it until the version is bumped and the
//! new fingerprint recorded. The agent compares recorded fingerprints to know what it can
//! carry over from maps of another version (e.g. connection tracking).

/// The layout of this build's maps. Bump it (and record `layouts/v<N>.txt`, and add it
/// to [`LAYOUTS`]) whenever the layout test says so.
///
/// - 1: `PEERS`/`PORTS` keys carry `revision << 1 | direction`; `PORTS` per endpoint,
///   one port prefix per entry.
/// - 2: `PEERS` keys carry the direction only (tables change in place); `PORTS` global,
///   content-addressed, keyed by port block with a 64-port bitmap value.
/// - 3: `PA_CONNTRACK_PREV` (unpinned): the previous maps' connection tracking, read and
///   written through while a migration swaps links (connection tracking unchanged);
///   `PORTS` keys with protocol `PORT_PROTOCOL_OTHER` say whether a port set allows
///   protocols without ports (tables decided by ClusterNetworkPolicies).
/// - 4: flow events: `PA_FLOWS` (ring buffer of `FlowEvent`) and `PA_FLOW_STATS` (per-CPU
///   rate limit and counters), both pinned with the generation's maps. Every other map
///   and type is layout 3's, so connection tracking and pending judgments are shared with
///   layout 3 programs during a migration.
/// - 5: audit mode: endpoint flags `ENDPOINT_AUDIT_INGRESS`/`_EGRESS`, audit tables in
///   `PEERS` under directions `DIRECTION_AUDIT_*`, and `FLOW_VERDICT_AUDIT`. Types and maps
///   are layout 4's: connection tracking and pending judgments are shared with layout 4
///   programs during a migration (which makes a new generation: layout 4 programs would
///   ignore the audit flags, and a layout 4 agent would not know the audit entries).
/// - 6: the node exemption for the node's own stack only: `PEERS` entries of the node's
///   addresses carry `PEER_OWN_NODE` beside the policies' answer (layout 5 entries of
///   them allow everything); connection tracking flags `CT_FROM_NODE` and
///   `CT_CLIENT_IN_NAT` (a NodePort client in `nat_addr`). Types and maps are layout 5's:
///   connection tracking and pending judgments are shared with layout 5 programs during a
///   migration, which ignore the two new flags (a flow they judge is judged as before).
/// - 7: `SERVICES` values say which protocols wait for DNAT: `SERVICE_DEFER_ALL` (1, what
///   every earlier layout wrote) or `SERVICE_DEFER_TCP` (a Service with endpoints on node
///   addresses, whose TCP flows are judged at the reply from the node's socket when the
///   backend is this node; the program reads the replying socket's address). Types and
///   maps are layout 6's: connection tracking and pending judgments are shared with layout
///   6 programs during a migration, which defer every protocol of both values.
/// - 8: connection tracking flags `CT_TCP_FIN_ORIG` and `CT_TCP_FIN_REPLY` (which ends
///   sent a FIN); `CT_TCP_CLOSING` (the short timeout) is set at the second FIN, not the
///   first (a half-closed flow of pods that nothing isolates does not refresh its entry:
///   their hooks skip connection tracking for most TCP packets), or at the first for an
///   entry whose replies no hook sees (`CT_ONE_WAY`). Types and maps are
///   layout 7's: connection tracking and pending judgments are shared with layout 7
///   programs during a migration, which ignore the two flags and set `CT_TCP_CLOSING`
///   at the first FIN (a flow they see close is closed as before).
/// - 9: `SERVICES` value `SERVICE_BEFORE_DNAT`: a Service address inside a configured
///   Service range whose endpoints include one that is neither a pod nor a node is judged
///   before translation, as its address would be without the range. Types and maps are
///   layout 8's: connection tracking and pending judgments are shared with layout 8
///   programs during a migration, which defer every protocol for it (as layout 8 did).
pub const LAYOUT_VERSION: u32 = 9;

/// The recorded fingerprint of every layout version (the last is `LAYOUT_VERSION`'s).
pub const LAYOUTS: &[(u32, &str)] = &[
    (1, include_str!("../layouts/v1.txt")),
    (2, include_str!("../layouts/v2.txt")),
    (3, include_str!("../layouts/v3.txt")),
    (4, include_str!("../layouts/v4.txt")),
    (5, include_str!("../layouts/v5.txt")),
    (6, include_str!("../layouts/v6.txt")),
    (7, include_str!("../layouts/v7.txt")),
    (8, include_str!("../layouts/v8.txt")),
    (9, include_str!("../layouts/v9.txt")),
];

/// The recorded fingerprint of a layout version, if this build knows it.
pub fn recorded(version: u32) -> Option<&'static str> {
    LAYOUTS.iter().find(|(v, _)| *v == version).map(|(_, f)| *f)
}

/// Whether `items` (type, map or constant names: a line's second word) are described the
/// same way in the fingerprints of versions `a` and `b`. False if either version is
/// unknown or an item is missing from either.
pub fn same_items(a: u32, b: u32, items: &[&str]) -> bool {
    let (Some(fa), Some(fb)) = (recorded(a), recorded(b)) else {
        return false;
    };
    let line = |f: &'static str, item: &str| f.lines().find(|l| l.split_whitespace().nth(1) == Some(item));
    items.iter().all(|item| match (line(fa, item), line(fb, item)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;

    use core::mem::{align_of, offset_of, size_of};
    use std::format;
    use std::string::{String, ToString};
    use std::vec::Vec;

    use super::*;
    use crate::*;

    fn field_type<T, F>(_: fn(&T) -> &F) -> (&'static str, usize) {
        (core::any::type_name::<F>(), size_of::<F>())
    }

    macro_rules! ty {
        ($out:ident, $t:ident { $($f:tt),* $(,)? }) => {{
            let mut s = format!("type {} size={} align={}", stringify!($t), size_of::<$t>(), align_of::<$t>());
            let mut sum = 0;
            $(
                let (name, size) = field_type(|x: &$t| &x.$f);
                sum += size;
                s += &format!(" {}:{}@{}", stringify!($f), name, offset_of!($t, $f));
            )*
            assert_eq!(sum, size_of::<$t>(), "{}: list every field (and no implicit padding)", stringify!($t));
            $out.push(s);
        }};
    }

    macro_rules! consts {
        ($out:ident, $($c:ident),* $(,)?) => {
            $( $out.push(format!("const {} {}", stringify!($c), $c)); )*
        };
    }

    /// The maps the kernel programs declare (every file under `src/kernel/`): name, kind
    /// with key and value types, pinned or not.
    fn kernel_maps() -> Vec<String> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/kernel");
        let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let mut out = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let mut rest = text.as_str();
            while let Some(i) = rest.find("#[map(name = \"") {
                rest = &rest[i + 14..];
                let name = &rest[..rest.find('"').unwrap()];
                let decl = &rest[rest.find("static ").unwrap()..];
                let decl = decl[..decl.find(';').unwrap()].split_whitespace().collect::<Vec<_>>().join(" ");
                let kind = &decl[decl.find(": ").unwrap() + 2..decl.find(" = ").unwrap()];
                let pinned = if decl.contains("::pinned(") { "pinned" } else { "unpinned" };
                out.push(format!("map {name} {kind} {pinned}"));
            }
        }
        out.sort();
        out
    }

    fn current() -> String {
        let mut out: Vec<String> = Vec::new();
        ty!(out, Addr { 0 });
        ty!(out, EndpointKey { addr });
        ty!(out, EndpointValue { id, revision, ifindex, flags });
        ty!(out, IfaceValue { id, revision, flags, ifindex, v4, v6 });
        ty!(out, PeerKey { endpoint, direction, addr });
        ty!(out, PeerValue { port_set, flags });
        ty!(out, PortKey { port_set, protocol, _pad, port });
        ty!(out, CtKey { lo_addr, hi_addr, lo_port, hi_port, protocol, _pad });
        ty!(out, CtValue { last_seen_ns, src_rev, dst_rev, nat_addr, nat_port, flags, _pad });
        ty!(out, PendingKey { addr, port, protocol, _pad });
        ty!(out, Counters { allowed_packets, allowed_bytes, denied_packets, denied_bytes });
        ty!(
            out,
            FlowEvent { time_ns, src, dst, endpoint, revision, ifindex, port_set, sport, dport, protocol, direction, verdict, decided }
        );
        ty!(out, FlowStats { tat_ns, emitted, suppressed, ring_full });
        consts!(
            out,
            ENDPOINT_INGRESS_ISOLATED,
            ENDPOINT_EGRESS_ISOLATED,
            ENDPOINT_FAIL_CLOSED,
            ENDPOINT_AUDIT_INGRESS,
            ENDPOINT_AUDIT_EGRESS,
            IFACE_HAS_V4,
            IFACE_HAS_V6,
            DIRECTION_INGRESS,
            DIRECTION_EGRESS,
            DIRECTION_AUDIT,
            DIRECTION_AUDIT_INGRESS,
            DIRECTION_AUDIT_EGRESS,
            PEER_KEY_FIXED_BITS,
            PEER_ALL,
            PEER_OWN_NODE,
            NO_PORT_SET,
            PORT_KEY_FIXED_BITS,
            PORT_BLOCK_BITS,
            PORT_PROTOCOL_OTHER,
            CT_NOT_LOCAL,
            CT_ORIG_IS_LO,
            CT_VIA_SERVICE,
            CT_TCP_CLOSING,
            CT_TCP_RESET,
            CT_FROM_NODE,
            CT_CLIENT_IN_NAT,
            CT_TCP_FIN_ORIG,
            CT_TCP_FIN_REPLY,
            CT_ONE_WAY,
            SERVICE_DEFER_ALL,
            SERVICE_DEFER_TCP,
            SERVICE_BEFORE_DNAT,
            FLOW_VERDICT_ALLOWED,
            FLOW_VERDICT_DENIED,
            FLOW_VERDICT_AUDIT,
            FLOW_DECIDED_NOT_ISOLATED,
            FLOW_DECIDED_PEER_ALL,
            FLOW_DECIDED_PORTS,
            FLOW_DECIDED_NO_PEER,
            FLOW_DECIDED_PORT_DENIED,
            FLOW_DECIDED_FAIL_CLOSED,
            FLOW_RING_BYTES,
        );
        out.extend(kernel_maps());
        let mut text = out.join("\n");
        text.push('\n');
        text
    }

    /// Fails on any change of the shared layout that is not a new version.
    #[test]
    fn the_layout_is_the_recorded_one_of_layout_version() {
        let now = current();
        let recorded = recorded(LAYOUT_VERSION).unwrap_or("");
        if now != recorded {
            let diff: Vec<String> = recorded
                .lines()
                .filter(|l| !now.lines().any(|n| n == *l))
                .map(|l| format!("- {l}"))
                .chain(now.lines().filter(|l| !recorded.lines().any(|r| r == *l)).map(|l| format!("+ {l}")))
                .collect();
            panic!(
                "the map layout differs from the one recorded for LAYOUT_VERSION {v}:\n{diff}\n\n\
                 Maps pinned by an older agent must not be read with the new layout: bump LAYOUT_VERSION to {n} \
                 (policy-ebpf/src/layout.rs), record this fingerprint as policy-ebpf/layouts/v{n}.txt and add it to \
                 LAYOUTS (keep v{v}.txt). The agent then migrates maps of layout {v} on start.\n\
                 The new fingerprint:\n{now}",
                v = LAYOUT_VERSION,
                n = LAYOUT_VERSION + 1,
                diff = diff.join("\n"),
            );
        }
    }

    #[test]
    fn versions_are_recorded_in_order_and_differ() {
        let versions: Vec<u32> = LAYOUTS.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, (1..=LAYOUT_VERSION).collect::<Vec<_>>(), "every version from 1 to LAYOUT_VERSION, in order");
        for w in LAYOUTS.windows(2) {
            assert_ne!(w[0].1, w[1].1, "v{} records the same layout as v{}: no bump was needed", w[1].0, w[0].0);
        }
        assert!(same_items(LAYOUT_VERSION, LAYOUT_VERSION, &["CtKey", "CtValue", "PA_CONNTRACK"]));
        assert!(!same_items(LAYOUT_VERSION, LAYOUT_VERSION + 1, &["CtKey"]));
        assert!(!same_items(LAYOUT_VERSION, LAYOUT_VERSION, &["NoSuchType"]));
        let _ = "".to_string();
    }
}
