//! The state file: what the agent enforces, in words (pod names, provenance), written
//! atomically after every sync, so that `dump` (another process) can put names on what it
//! reads from the pinned maps.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::tables_view::{DirectionView, EndpointView};

pub const DEFAULT_STATE_FILE: &str = "/run/policy-agent/state.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    pub node: String,
    /// Seconds since the Unix epoch of the last sync.
    pub synced_at: u64,
    pub endpoints: Vec<EndpointState>,
    /// Objects refused (invalid), one line each.
    pub rejected: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointState {
    pub pod: String,
    pub addresses: Vec<String>,
    pub interface: Option<String>,
    /// Datapath id and revision, as in the maps; `None` until the pod's interface is found.
    pub datapath_id: Option<u32>,
    pub datapath_revision: Option<u32>,
    /// Why the pod is fail-closed, if it is.
    pub fail_closed: Option<String>,
    pub ingress: DirectionState,
    pub egress: DirectionState,
    /// Audited policies that apply to the pod and change its tables (audit mode: not
    /// enforced; new flows they would deny are reported with verdict `audit`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audited: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirectionState {
    pub isolated: bool,
    pub isolated_by: Vec<String>,
    pub entries: Vec<EntryState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryState {
    pub prefix: String,
    pub allows: String,
    pub stands_for: Vec<String>,
}

impl DirectionState {
    pub fn from_view(d: &DirectionView) -> DirectionState {
        DirectionState {
            isolated: d.isolated,
            isolated_by: d.isolated_by.iter().map(|k| k.to_string()).collect(),
            entries: d
                .entries
                .iter()
                .map(|e| EntryState {
                    prefix: e.prefix.to_string(),
                    allows: e.allows_text(),
                    stands_for: e.stands_for.iter().map(|o| o.to_string()).collect(),
                })
                .collect(),
        }
    }
}

impl EndpointState {
    pub fn from_view(v: &EndpointView) -> EndpointState {
        EndpointState {
            pod: v.pod.to_string(),
            addresses: v.addresses.iter().map(|a| a.to_string()).collect(),
            interface: None,
            datapath_id: None,
            datapath_revision: None,
            fail_closed: None,
            ingress: DirectionState::from_view(&v.ingress),
            egress: DirectionState::from_view(&v.egress),
            audited: v
                .audit
                .iter()
                .flat_map(|a| a.audited.iter().map(|k| k.to_string()))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        }
    }
}

impl AgentState {
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).expect("state serializes"))?;
        std::fs::rename(tmp, path)
    }

    pub fn read(path: &Path) -> std::io::Result<AgentState> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}
