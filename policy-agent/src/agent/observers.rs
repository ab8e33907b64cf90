//! What watches a sync: the state file that `dump` reads, and the metrics. Each is told
//! about every sync that touched the datapath, and never changes it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use policy_model::{NodeCompiler, ObjectKey};
use tracing::warn;

use super::metrics::{FlowLabels, MapLabels, Shared, TrafficLabels};
use super::state::EndpointState;
use crate::datapath::{EndpointStatus, Enforcer, PodInterface, SyncReport};
use crate::tables_view::endpoint_view;

/// One sync, as the observers see it.
pub struct Synced<'a> {
    pub node: &'a str,
    pub compiler: &'a NodeCompiler,
    pub enforcer: &'a Enforcer,
    pub interfaces: &'a BTreeMap<ObjectKey, PodInterface>,
    pub report: &'a SyncReport,
    /// From the batch of changes to the maps holding them.
    pub took: Duration,
}

pub trait SyncObserver: Send {
    fn synced(&mut self, s: &Synced<'_>);
}

/// Publishes what is enforced to the state file (for `dump`).
pub struct StateFile {
    pub path: std::path::PathBuf,
}

impl SyncObserver for StateFile {
    fn synced(&mut self, s: &Synced<'_>) {
        let w = StateWriter { node: s.node, compiler: s.compiler, enforcer: s.enforcer, interfaces: s.interfaces };
        if let Err(e) = w.write(&self.path) {
            warn!(path = %self.path.display(), error = %e, "cannot write the state file");
        }
    }
}

/// Sync-time gauges: endpoints, fail-closed ones, map entries, rejected objects.
pub struct SyncMetrics {
    pub shared: Shared,
}

impl SyncObserver for SyncMetrics {
    fn synced(&mut self, s: &Synced<'_>) {
        let endpoint_count = s.compiler.endpoints().count();
        let fail_closed = s
            .compiler
            .endpoints()
            .filter(|e| matches!(s.enforcer.sync.status(&e.tables.pod), Some(EndpointStatus::FailClosed { .. })))
            .count();
        let m = self.shared.metrics.lock().expect("metrics lock");
        m.reconcile_seconds.observe(s.took.as_secs_f64());
        m.rejected_objects.set(s.compiler.rejected().count() as i64);
        m.endpoints.set(endpoint_count as i64);
        m.fail_closed_endpoints.set(fail_closed as i64);
        m.too_big_endpoints.set(s.enforcer.sync.too_big_count() as i64);
        m.map_write_errors.inner().store(s.enforcer.sync.write_errors, Ordering::Relaxed);
        m.migration_failures.inner().store(s.enforcer.migration_failures, Ordering::Relaxed);
        m.migration_pending.set(s.enforcer.migrating() as i64);
        let (peers, ports) = s.enforcer.sync.entry_counts();
        m.map_entries.get_or_create(&MapLabels { map: "peers".into() }).set(peers as i64);
        m.map_entries.get_or_create(&MapLabels { map: "ports".into() }).set(ports as i64);
    }
}

/// Keeps the flow names current: each endpoint's tables by revision (the provenance of
/// what its table decides), interface names, and the flow metrics' label sets of pods
/// that are no longer on the node removed (cardinality stays that of the local pods).
pub struct FlowNames {
    pub flows: crate::flows::Flows,
    pub shared: Shared,
}

impl SyncObserver for FlowNames {
    fn synced(&mut self, s: &Synced<'_>) {
        let mut ids = std::collections::HashSet::new();
        let mut local = std::collections::BTreeSet::new();
        {
            let mut names = self.flows.names.lock().unwrap_or_else(|p| p.into_inner());
            for ep in s.compiler.endpoints() {
                local.insert((ep.tables.pod.namespace.to_string(), ep.tables.pod.name.to_string()));
                if let Some((id, rev)) = s.enforcer.sync.id_and_revision(&ep.tables.pod) {
                    ids.insert(id);
                    names.update_endpoint(id, rev, &ep.tables);
                }
            }
            names.retain_endpoints(&ids);
            names.set_interfaces(s.interfaces.values().map(|i| (i.ifindex, i.name.clone())));
        }
        let m = self.shared.metrics.lock().expect("metrics lock");
        let mut gone = Vec::new();
        let mut seen = self.shared.flow_label_sets.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|l: &FlowLabels| {
            let keep = local.contains(&(l.namespace.clone(), l.pod.clone()));
            if !keep {
                gone.push(l.clone());
            }
            keep
        });
        for l in gone {
            m.flow_verdicts.remove(&l);
        }
    }
}

/// Per-pod packet and byte counters, read from the datapath once a second.
#[derive(Default)]
pub struct TrafficCounters {
    last: BTreeMap<(String, &'static str, &'static str), (u64, u64)>,
}

impl TrafficCounters {
    pub fn update(&mut self, shared: &Shared, enforcer: &Enforcer, compiler: &NodeCompiler) {
        let m = shared.metrics.lock().expect("metrics lock");
        let st = enforcer.datapath.flow_stats();
        m.flow_events.inner().store(st.emitted, Ordering::Relaxed);
        m.flow_events_suppressed.inner().store(st.suppressed, Ordering::Relaxed);
        m.flow_events_ring_full.inner().store(st.ring_full, Ordering::Relaxed);
        for ep in compiler.endpoints() {
            let pod = ep.tables.pod.to_string();
            let Some((id, _)) = enforcer.sync.id_and_revision(&ep.tables.pod) else { continue };
            let c = enforcer.datapath.counters(id);
            for (dir, counters) in [("ingress", c[0]), ("egress", c[1])] {
                for (verdict, packets, bytes) in [
                    ("allowed", counters.allowed_packets, counters.allowed_bytes),
                    ("denied", counters.denied_packets, counters.denied_bytes),
                ] {
                    let key = (pod.clone(), dir, verdict);
                    let (lp, lb) = self.last.get(&key).copied().unwrap_or((0, 0));
                    let labels = TrafficLabels { pod: pod.clone(), direction: dir.into(), verdict: verdict.into() };
                    // Counters only go up; a reset map (new endpoint id) starts again from 0.
                    m.packets.get_or_create(&labels).inc_by(packets.saturating_sub(lp));
                    m.bytes.get_or_create(&labels).inc_by(bytes.saturating_sub(lb));
                    self.last.insert(key, (packets, bytes));
                }
            }
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The state file's content ([`state::AgentState`]), serialized one endpoint at a time straight
/// to the file: with a hundred pods and their provenance it is megabytes of text, which
/// need not all be in memory at once.
struct StateWriter<'a> {
    node: &'a str,
    compiler: &'a NodeCompiler,
    enforcer: &'a Enforcer,
    interfaces: &'a BTreeMap<ObjectKey, PodInterface>,
}

impl StateWriter<'_> {
    fn endpoint(&self, ep: &policy_model::Endpoint) -> EndpointState {
        let mut s = EndpointState::from_view(&endpoint_view(ep));
        let pod = &ep.tables.pod;
        s.interface = self.interfaces.get(pod).map(|i| i.name.clone());
        if let Some((id, rev)) = self.enforcer.sync.id_and_revision(pod) {
            s.datapath_id = Some(id);
            s.datapath_revision = Some(rev);
        }
        if let Some(crate::datapath::EndpointStatus::FailClosed { error }) = self.enforcer.sync.status(pod) {
            s.fail_closed = Some(error.clone());
        }
        s
    }

    fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        serde_json::to_writer(&mut out, self).map_err(std::io::Error::other)?;
        out.flush()?;
        drop(out);
        std::fs::rename(tmp, path)
    }
}

/// The same fields, in the same order, as [`state::AgentState`], which reads it back.
impl serde::Serialize for StateWriter<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Endpoints<'a, 'b>(&'a StateWriter<'b>);
        impl serde::Serialize for Endpoints<'_, '_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq(self.0.compiler.endpoints().map(|ep| self.0.endpoint(ep)))
            }
        }
        let mut st = serializer.serialize_struct("AgentState", 4)?;
        st.serialize_field("node", self.node)?;
        st.serialize_field("synced_at", &now_secs())?;
        st.serialize_field("endpoints", &Endpoints(self))?;
        st.serialize_field("rejected", &self.compiler.rejected().map(|r| r.to_string()).collect::<Vec<_>>())?;
        st.end()
    }
}
