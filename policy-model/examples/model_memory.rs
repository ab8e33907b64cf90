//! Heap bytes the model holds for the synthetic cluster, by part, and per extra pod.
//! `cargo run --release -p policy-model --features workload --example model_memory`
//! (a measurement, not a test).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use policy_model::NodeCompiler;
use policy_model::incremental::Change;
use policy_model::workload::Workload;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: as for `alloc`/`dealloc`.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn measure(pods_per_namespace: usize) -> (isize, isize, isize) {
    let w = Workload { pods_per_namespace, ..Workload::default() };
    let before = live();
    let mut state = policy_model::ClusterState::new();
    for c in w.changes() {
        match c {
            Change::UpsertNamespace(n) => {
                state.upsert_namespace(n);
            }
            Change::UpsertPod(p) => {
                state.upsert_pod(p);
            }
            _ => {}
        }
    }
    let state_only = live() - before;
    drop(state);
    let before = live();
    let mut c = NodeCompiler::new(w.node.clone());
    c.apply(w.changes());
    let total = live() - before;
    let (mut entries, mut origins, mut rules) = (0usize, 0usize, 0usize);
    for e in c.endpoints() {
        for t in [&e.tables.ingress, &e.tables.egress] {
            entries += t.entries.len();
            origins += t.entries.iter().map(|e| e.stands_for.len()).sum::<usize>();
            rules += t.entries.iter().map(|e| e.rules.len()).sum::<usize>();
        }
    }
    eprintln!(
        "pods {}: {entries} table entries ({} B each), {origins} origins ({} B), {rules} rule refs ({} B)",
        w.pod_count(),
        std::mem::size_of::<policy_model::PeerEntry>(),
        std::mem::size_of::<policy_model::Origin>(),
        std::mem::size_of::<policy_model::RuleRef>()
    );
    (state_only, total, w.pod_count() as isize)
}

fn main() {
    // Shared values (`policy_model::intern`) outlive a compiler: one size per process.
    if let Some(n) = std::env::args().nth(1).and_then(|a| a.parse().ok()) {
        let (s, t, p) = measure(n);
        println!("{p} {s} {t}");
        return;
    }
    let run = |n: usize| -> (isize, isize, isize) {
        let out = std::process::Command::new(std::env::current_exe().expect("exe")).arg(n.to_string()).output().expect("run");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let v: Vec<isize> = text.lines().last().unwrap_or("").split(' ').filter_map(|x| x.parse().ok()).collect();
        (v[1], v[2], v[0])
    };
    let (s0, t0, p0) = run(100);
    let (s1, t1, p1) = run(110);
    let kib = |b: isize| b as f64 / 1024.0;
    println!("pods {p0}: namespaces+pods in ClusterState {:.0} KiB; whole NodeCompiler (policies, tables) {:.0} KiB", kib(s0), kib(t0));
    println!("pods {p1}: namespaces+pods in ClusterState {:.0} KiB; whole NodeCompiler {:.0} KiB", kib(s1), kib(t1));
    let d = (p1 - p0) as f64;
    println!("per extra pod: ClusterState {:.0} B, NodeCompiler {:.0} B", (s1 - s0) as f64 / d, (t1 - t0) as f64 / d);
}
