//! Map writes per change while 8,000 pods are created, one at a time, into the compiler
//! bench's cluster (`policy_model::workload`: 100 namespaces, 2,000 policies, 100 pods on
//! the node): the delta sync (`MapSync`) against in-memory maps, or against real pinned
//! maps with `--real` (root; also times each sync), next to what the full-rewrite sync
//! wrote for the same changes (each changed endpoint's whole new table written, its old
//! one deleted, `PORTS` per endpoint with one entry per port prefix).
//!
//! Run: `cargo run --release -p policy-agent --example sync_writes [-- --real]`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use policy_agent::datapath::{Datapath, MapSizes, MapSync, Maps, ModelMaps, SyncReport, peer_entries, port_set_entries};
use policy_model::workload::Workload;
use policy_model::{Change, EndpointTables, NodeCompiler, ObjectKey, PeerTable, Protocol};
use serde_json::json;

/// Entries the full-rewrite layout wrote for one table (`PEERS` + per-endpoint `PORTS`).
fn old_layout_entries(t: &EndpointTables) -> usize {
    let mut n = 0;
    for (table, dir) in [(&t.ingress, 0), (&t.egress, 1)] {
        if !table.isolated {
            continue;
        }
        n += peer_entries(table, dir).len();
        n += old_port_entries(table);
    }
    n
}

fn old_port_entries(table: &PeerTable) -> usize {
    table
        .port_sets
        .iter()
        .filter(|s| !s.is_all())
        .map(|s| Protocol::ALL.iter().map(|p| s.ranges(*p).iter().map(|r| r.to_prefixes().len()).sum::<usize>()).sum::<usize>())
        .sum()
}

struct Stats(Vec<usize>);

impl Stats {
    fn line(&self, what: &str) -> String {
        let mut v = self.0.clone();
        v.sort();
        let total: usize = v.iter().sum();
        let pct = |q: f64| v.get(((v.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
        format!(
            "{what:<44} syncs {:>5}  total {:>10}  mean {:>8.1}  p50 {:>6}  p99 {:>6}  max {:>6}",
            v.len(),
            total,
            total as f64 / v.len().max(1) as f64,
            pct(0.5),
            pct(0.99),
            v.last().copied().unwrap_or(0)
        )
    }
}

fn main() {
    let real = std::env::args().any(|a| a == "--real");
    let w = Workload::default();
    let mut compiler = NodeCompiler::new(w.node.clone());
    // The cluster with its policies and the first 20 pods of each namespace (pod 0 of
    // each is on the node).
    let first = 20;
    let mut changes: Vec<Change> = (0..w.namespaces).map(|i| Change::UpsertNamespace(w.namespace(i))).collect();
    for i in 0..w.namespaces {
        for j in 0..first {
            changes.push(Change::UpsertPod(w.pod(i, j, None)));
        }
    }
    for i in 0..w.namespaces {
        changes.extend(w.policies(i, json!("http")).into_iter().map(|p| Change::UpsertPolicy(Box::new(p))));
    }
    compiler.apply(changes);

    let sizes = MapSizes::default();
    let pin_dir = std::path::PathBuf::from(format!("/sys/fs/bpf/pa-sync-writes-{}", std::process::id()));
    let mut model = ModelMaps::new(sizes);
    let mut datapath = if real {
        Some(Datapath::load(&pin_dir, &pin_dir.join("maps"), sizes, &[], None).expect("load the datapath (root, bpffs)"))
    } else {
        None
    };
    let mut sync = MapSync::new();
    let ifindex: BTreeMap<ObjectKey, u32> =
        compiler.endpoints().enumerate().map(|(i, e)| (e.tables.pod.clone(), 1_000_000 + i as u32)).collect();
    let mut longest = Duration::ZERO;
    let mut sync_all = |compiler: &NodeCompiler, sync: &mut MapSync, model: &mut ModelMaps, longest: &mut Duration| -> SyncReport {
        let mut report = SyncReport::default();
        for ep in compiler.endpoints() {
            sync.set_target(&ep.tables.pod, &ep.tables, ifindex[&ep.tables.pod], &sizes).expect("endpoint id");
        }
        let maps: &mut dyn Maps = match datapath.as_mut() {
            Some(d) => d,
            None => model,
        };
        let t = Instant::now();
        sync.run(maps, None, &mut report);
        *longest = (*longest).max(t.elapsed());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        report
    };
    let r = sync_all(&compiler, &mut sync, &mut model, &mut longest);
    let largest = compiler.endpoints().map(|e| e.tables.entry_count()).max().unwrap_or(0);
    let largest_ports =
        compiler.endpoints().map(|e| old_port_entries(&e.tables.ingress) + old_port_entries(&e.tables.egress)).max().unwrap_or(0);
    println!(
        "initial sync: {} endpoints, {} entries written ({} PEERS, {} PORTS in the maps); largest table {largest} peer entries, {largest_ports} port entries in the old layout",
        compiler.endpoints().count(),
        r.written_entries,
        sync.entry_counts().0,
        sync.entry_counts().1
    );
    longest = Duration::ZERO;

    let mut tables: BTreeMap<ObjectKey, EndpointTables> = compiler.endpoints().map(|e| (e.tables.pod.clone(), e.tables.clone())).collect();
    let mut before = Vec::new();
    let mut after = Vec::new();
    let mut endpoint_writes = 0;
    let mut changed_endpoints = 0;
    let started = Instant::now();
    for j in first..w.pods_per_namespace {
        for i in 0..w.namespaces {
            let report = compiler.apply([Change::UpsertPod(w.pod(i, j, None))]);
            if report.changed.is_empty() && report.added.is_empty() {
                continue;
            }
            // The full rewrite: the changed endpoints' new tables written, old ones deleted.
            let mut old_cost = 0;
            for pod in report.changed.iter().chain(&report.added) {
                let new = &compiler.endpoint(pod).expect("changed endpoint").tables;
                old_cost += old_layout_entries(new) + tables.get(pod).map_or(0, old_layout_entries);
                tables.insert(pod.clone(), new.clone());
            }
            changed_endpoints += report.changed.len();
            let r = sync_all(&compiler, &mut sync, &mut model, &mut longest);
            before.push(old_cost);
            after.push(r.written_entries + r.deleted_entries);
            endpoint_writes += r.endpoint_writes;
        }
    }
    println!(
        "8,000 pods created one at a time ({:.1} s): {} changes touched local tables ({changed_endpoints} endpoint updates)",
        started.elapsed().as_secs_f64(),
        before.len()
    );
    println!("{}", Stats(before).line("full rewrite (entries written + deleted)"));
    println!("{}", Stats(after).line("delta (entries written + deleted)"));
    println!("endpoint writes (revision bumps, flags): {endpoint_writes}");
    if real {
        println!("longest sync (real maps): {:.1} ms", longest.as_secs_f64() * 1000.0);
    }

    // The full cluster's tables (for map sizes).
    let peer_count = |t: &EndpointTables| {
        [(&t.ingress, 0), (&t.egress, 1)].iter().filter(|(p, _)| p.isolated).map(|(p, d)| peer_entries(p, *d).len()).sum::<usize>()
    };
    let new_ports = |t: &EndpointTables| {
        let sets: std::collections::BTreeSet<_> =
            t.ingress.port_sets.iter().chain(&t.egress.port_sets).filter(|s| !s.is_all() && !s.is_empty()).map(port_set_entries).collect();
        sets.iter().map(Vec::len).sum::<usize>()
    };
    let (largest_peers, largest) = compiler.endpoints().map(|e| (peer_count(&e.tables), e.tables.pod.clone())).max().unwrap();
    println!(
        "full cluster: largest table {largest_peers} PEERS entries ({largest}); port entries per table at most {} (old layout: {}); in the maps: {} PEERS, {} PORTS",
        compiler.endpoints().map(|e| new_ports(&e.tables)).max().unwrap_or(0),
        compiler.endpoints().map(|e| old_port_entries(&e.tables.ingress) + old_port_entries(&e.tables.egress)).max().unwrap_or(0),
        sync.entry_counts().0,
        sync.entry_counts().1,
    );

    // Every odd port on TCP, UDP and SCTP.
    let mut total = 0;
    for proto in Protocol::ALL {
        let mut set = policy_model::PortSet::empty();
        for p in (1..=65535u16).step_by(2) {
            set.insert(proto, policy_model::PortRange::single(p));
        }
        let n = port_set_entries(&set).len();
        let old: usize = set.ranges(proto).iter().map(|r| r.to_prefixes().len()).sum();
        println!("every odd port on {proto}: {n} PORTS entries for all pods (old layout: {old} per pod and direction)");
        total += n;
    }
    println!("every odd port on TCP+UDP+SCTP: {total} PORTS entries");
    drop(datapath);
    if real {
        let _ = std::fs::remove_dir_all(&pin_dir);
    }
}
