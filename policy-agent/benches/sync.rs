//! What one pod coming and going costs the agent on a node whose cluster has 100
//! ClusterNetworkPolicies and no NetworkPolicy (`policy_model::workload`: 10,000 pods, 100
//! of them local): Baseline peers that cover every pod give each subject's tables an entry
//! per pod, so the pod is an entry in each of them. Compiling (`NodeCompiler::apply`), then
//! planning and writing the changed tables' map entries (`MapSync::set_target` and `run`,
//! into in-memory maps).
//!
//! `cargo bench -p policy-agent --bench sync`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use policy_agent::datapath::{MapSizes, MapSync, ModelMaps, SyncReport};
use policy_model::workload::Workload;
use policy_model::{Change, NodeCompiler, ObjectKey};

struct Node {
    compiler: NodeCompiler,
    sync: MapSync,
    maps: ModelMaps,
    sizes: MapSizes,
    ifindex: Vec<ObjectKey>,
}

impl Node {
    /// The cluster compiled and its maps written.
    fn new() -> Node {
        let w = Workload::default();
        let mut compiler = NodeCompiler::new(w.node.clone());
        let mut changes: Vec<Change> = w.changes().into_iter().filter(|c| !matches!(c, Change::UpsertPolicy(_))).collect();
        changes.extend(w.cluster_policies(0).into_iter().map(|p| Change::UpsertClusterPolicy(Box::new(p))));
        compiler.apply(changes);
        let sizes = MapSizes { peer_entries: 4_000_000, ..MapSizes::default() };
        let mut node = Node { compiler, sync: MapSync::new(), maps: ModelMaps::new(sizes), sizes, ifindex: Vec::new() };
        node.ifindex = node.compiler.endpoints().map(|e| e.tables.pod.clone()).collect();
        let pods = node.ifindex.clone();
        node.write(&pods);
        node
    }

    /// Sets the targets of `pods` and writes them.
    fn write(&mut self, pods: &[ObjectKey]) {
        for pod in pods {
            let ep = self.compiler.endpoint(pod).expect("an endpoint");
            let ifindex = 100 + self.ifindex.iter().position(|k| k == pod).expect("known") as u32;
            self.sync.set_target(pod, &ep.tables, ifindex, &self.sizes).expect("fits");
        }
        let mut report = SyncReport::default();
        self.sync.run(&mut self.maps, None, &mut report);
        assert!(report.errors.is_empty() && !report.more_work, "{:?}", report.errors);
    }

    fn apply(&mut self, change: Change) {
        let report = self.compiler.apply([change]);
        self.write(&report.changed);
    }
}

fn bench(c: &mut Criterion) {
    let mut node = Node::new();
    // A pod on another node (its address unused: pod 150 of the last namespace).
    let pod = Workload::default().pod(99, 150, None);
    let mut g = c.benchmark_group("100 cluster policies, no NetworkPolicy");
    g.sample_size(10);
    g.bench_function("pod added, then deleted: compile and write the maps", |b| {
        b.iter(|| {
            node.apply(Change::UpsertPod(pod.clone()));
            node.apply(Change::DeletePod(pod.key.clone()));
            black_box(node.maps.writes)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
