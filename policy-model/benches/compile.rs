//! Compiler benchmark: 10,000 pods in 100 namespaces, 2,000 policies of realistic shapes,
//! 100 pods on the node. Measures a full compile, one pod label change, one policy change,
//! and (printed once) the compiled state's memory.
//!
//! Run: `cargo bench -p policy-model --bench compile`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use policy_model::workload::Workload;
use policy_model::{Change, Namespace, NodeCompiler};
use serde_json::json;

/// Counts live heap bytes, to report the compiled state's memory.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; we only add the size
// to (or subtract it from) a counter, which has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System.alloc` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with layout `l`; `new` is non-zero per the
        // GlobalAlloc contract.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn workload() -> Workload {
    Workload::default()
}

fn cluster() -> Vec<Change> {
    workload().changes()
}

fn full_compile() -> NodeCompiler {
    let mut c = NodeCompiler::new(workload().node);
    let r = c.apply(cluster());
    assert_eq!(r.added.len(), 100);
    assert!(r.rejected.is_empty());
    c
}

fn bench(cr: &mut Criterion) {
    let changes = cluster();
    let before = LIVE.load(Ordering::Relaxed);
    let compiled = full_compile();
    let after = LIVE.load(Ordering::Relaxed);
    let entries: usize = compiled.endpoints().map(|e| e.tables.entry_count()).sum();
    let max_entries = compiled.endpoints().map(|e| e.tables.entry_count()).max().unwrap_or(0);
    println!(
        "workload: {} objects; compiled state (cluster state + tables of {} endpoints, {entries} entries, at most {max_entries} per endpoint): {:.1} MiB",
        changes.len(),
        compiled.endpoints().count(),
        (after - before) as f64 / (1024.0 * 1024.0),
    );
    drop(changes);

    let mut g = cr.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("full compile (10k pods, 2k policies, 100 local)", |b| b.iter(|| black_box(full_compile())));
    g.finish();

    let mut g = cr.benchmark_group("incremental");
    let mut c = full_compile();
    // A pod in ns-003 that app-to-app and same-namespace peers of the local pod there see.
    let mut flip = false;
    g.bench_function("pod label change", |b| {
        b.iter(|| {
            flip = !flip;
            let app = if flip { "app-7" } else { "app-1" };
            let r = c.apply([Change::UpsertPod(workload().pod(3, 11, Some(app)))]);
            assert!(r.recompiled >= 1);
            black_box(r)
        })
    });
    let mut flip = false;
    g.bench_function("policy change", |b| {
        b.iter(|| {
            flip = !flip;
            let port = if flip { json!(8081) } else { json!("http") };
            let p = workload().policies(0, port).into_iter().find(|p| p.metadata.name.as_deref() == Some("app-0")).unwrap();
            let r = c.apply([Change::UpsertPolicy(Box::new(p))]);
            black_box(r)
        })
    });
    g.finish();
    bench_cluster_policies(cr);
}

/// The same cluster with 100 ClusterNetworkPolicies in both tiers.
fn bench_cluster_policies(cr: &mut Criterion) {
    let full = || tiered(true);
    let before = LIVE.load(Ordering::Relaxed);
    let compiled = full();
    let after = LIVE.load(Ordering::Relaxed);
    let entries: usize = compiled.endpoints().map(|e| e.tables.entry_count()).sum();
    println!(
        "with 100 cluster policies: compiled state ({entries} entries, rule cache included): {:.1} MiB",
        (after - before) as f64 / (1024.0 * 1024.0)
    );
    drop(compiled);
    let mut g = cr.benchmark_group("with 100 cluster policies");
    g.sample_size(10);
    g.bench_function("full compile (10k pods, 2k policies, 100 CNPs, 100 local)", |b| b.iter(|| black_box(full())));
    let mut c = full();
    let mut flip = false;
    g.bench_function("cluster policy change, every pod's (100 local subjects)", |b| {
        b.iter(|| {
            flip = !flip;
            let p = workload().cluster_policies(u16::from(flip)).swap_remove(0);
            let r = c.apply([Change::UpsertClusterPolicy(Box::new(p))]);
            assert_eq!(r.recompiled, 100);
            black_box(r)
        })
    });
    changes_of_one_team_and_one_pod(&mut g, &mut c);
    g.finish();

    // Without NetworkPolicies the Baseline tier decides, and its default-deny peers cover
    // every pod: each subject's table gets an entry per pod.
    let mut g = cr.benchmark_group("with 100 cluster policies and no NetworkPolicy");
    g.sample_size(10);
    g.bench_function("full compile", |b| b.iter(|| black_box(tiered(false))));
    let mut c = tiered(false);
    let entries: usize = c.endpoints().map(|e| e.tables.entry_count()).sum();
    println!("with 100 cluster policies and no NetworkPolicy: {entries} entries");
    changes_of_one_team_and_one_pod(&mut g, &mut c);
    g.finish();
}

/// The cluster with the 100 ClusterNetworkPolicies, compiled; with or without its
/// NetworkPolicies.
fn tiered(network_policies: bool) -> NodeCompiler {
    let mut c = NodeCompiler::new(workload().node);
    let mut changes: Vec<Change> = cluster().into_iter().filter(|c| network_policies || !matches!(c, Change::UpsertPolicy(_))).collect();
    changes.extend(workload().cluster_policies(0).into_iter().map(|p| Change::UpsertClusterPolicy(Box::new(p))));
    let r = c.apply(changes);
    assert_eq!(r.added.len(), 100);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    c
}

/// A change to one team's cluster policy (10 local subjects), then to one pod's labels.
fn changes_of_one_team_and_one_pod(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, c: &mut NodeCompiler) {
    let mut flip = false;
    g.bench_function("cluster policy change, one team's (10 local subjects)", |b| {
        b.iter(|| {
            flip = !flip;
            let p = workload().cluster_policies(u16::from(flip)).swap_remove(3);
            let r = c.apply([Change::UpsertClusterPolicy(Box::new(p))]);
            assert_eq!(r.recompiled, 10);
            black_box(r)
        })
    });
    // Namespace ns-005 (team t5, env dev): its env is read by an Admin policy's peers
    // (`no-dev`) whose subjects are no local pod; the other label by nothing.
    for (label, values) in [("env", ["dev", "staging"]), ("owner", ["a", "b"])] {
        let mut flip = false;
        g.bench_function(format!("namespace label change ({label})"), |b| {
            b.iter(|| {
                flip = !flip;
                let labels = [("team".to_string(), "t5".to_string()), (label.to_string(), values[usize::from(flip)].to_string())];
                let r = c.apply([Change::UpsertNamespace(Namespace::new(Workload::namespace_name(5), labels.into()))]);
                black_box(r)
            })
        });
    }
    let mut flip = false;
    g.bench_function("pod label change", |b| {
        b.iter(|| {
            flip = !flip;
            let app = if flip { "app-7" } else { "app-1" };
            black_box(c.apply([Change::UpsertPod(workload().pod(3, 11, Some(app)))]))
        })
    });
    // A new pod on another node (its address unused: pod 150 of the last namespace), then
    // gone: the churn every cluster has. Both changes in one iteration.
    let pod = workload().pod(99, 150, None);
    g.bench_function("pod added, then deleted", |b| {
        b.iter(|| {
            black_box(c.apply([Change::UpsertPod(pod.clone())]));
            black_box(c.apply([Change::DeletePod(pod.key.clone())]))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
