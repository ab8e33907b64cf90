//! `policy-agent dump`: what the datapath enforces now, read from the pinned maps (from
//! another process while the agent runs), with names from the agent's state file.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use policy_ebpf::{Counters, CtKey, CtValue, map_names};
use serde::Serialize;

use super::{CliError, OutputFormat};
use crate::agent::state::{AgentState, DirectionState, EndpointState};
use crate::datapath::{PIN_ROOT, decode_addr, encode_addr};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the agent pinned its maps.
    #[arg(long, default_value = PIN_ROOT)]
    pub pin_dir: PathBuf,
    /// The agent's state file (names and provenance).
    #[arg(long, default_value = crate::agent::state::DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
    /// Only this pod (NAMESPACE/NAME).
    #[arg(long)]
    pub pod: Option<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
    /// The agent's observe socket, for each pod's most recent denied flows (skipped if
    /// the agent does not answer there).
    #[arg(long, default_value = crate::flows::DEFAULT_OBSERVE_SOCKET)]
    pub observe_socket: PathBuf,
}

/// Denied flows shown per pod.
const RECENT_DENIED: usize = 5;

/// The most recent denied flows the agent holds, by the pod that denied them (`None`: the
/// agent's observe socket did not answer).
fn recent_denied(socket: &Path) -> Option<std::collections::HashMap<String, Vec<crate::flows::Flow>>> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
    let req = crate::flows::Request {
        filter: crate::flows::Filter { verdict: Some("denied".into()), ..Default::default() },
        ..Default::default()
    };
    let mut line = serde_json::to_string(&req).ok()?;
    line.push('\n');
    s.write_all(line.as_bytes()).ok()?;
    let mut out: std::collections::HashMap<String, Vec<crate::flows::Flow>> = std::collections::HashMap::new();
    for l in std::io::BufReader::new(s).lines() {
        let Ok(l) = l else { break };
        if let Ok(f) = serde_json::from_str::<crate::flows::Flow>(&l) {
            let v = out.entry(f.subject.clone()).or_default();
            v.push(f);
            if v.len() > RECENT_DENIED {
                v.remove(0);
            }
        }
    }
    Some(out)
}

#[derive(Debug, Serialize)]
pub struct DumpEndpoint {
    #[serde(flatten)]
    pub state: EndpointState,
    /// The revision the kernel holds (it may differ from the state file's for a moment).
    pub kernel_revision: Option<u32>,
    pub ingress_counters: CountersView,
    pub egress_counters: CountersView,
    pub connections: usize,
    /// The most recent denied flows this pod's policies judged (from the agent's memory).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recent_denied: Vec<crate::flows::Flow>,
}

#[derive(Debug, Default, Serialize)]
pub struct CountersView {
    pub allowed_packets: u64,
    pub allowed_bytes: u64,
    pub denied_packets: u64,
    pub denied_bytes: u64,
}

impl From<Counters> for CountersView {
    fn from(c: Counters) -> CountersView {
        CountersView {
            allowed_packets: c.allowed_packets,
            allowed_bytes: c.allowed_bytes,
            denied_packets: c.denied_packets,
            denied_bytes: c.denied_bytes,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Dump {
    pub node: String,
    pub synced_at: u64,
    pub endpoints: Vec<DumpEndpoint>,
    pub connections_total: usize,
    pub rejected: Vec<String>,
}

fn open(pin_dir: &Path, name: &str) -> Result<Map, CliError> {
    let path = crate::datapath::maps_dir_in_force(pin_dir).map_err(CliError::Usage)?.join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        CliError::Usage(format!(
            "cannot open pinned map {}: {e} (is the agent running, with --pin-dir {}?)",
            path.display(),
            pin_dir.display()
        ))
    })?;
    Map::from_map_data(data).map_err(|e| CliError::Usage(format!("map {name}: {e}")))
}

pub fn read(pin_dir: &Path, state_file: &Path, only: Option<&str>) -> Result<Dump, CliError> {
    let state = AgentState::read(state_file)
        .map_err(|e| CliError::Usage(format!("cannot read the agent's state file {}: {e}", state_file.display())))?;
    let endpoints: HashMap<MapData, policy_ebpf::EndpointKey, policy_ebpf::EndpointValue> =
        HashMap::try_from(open(pin_dir, map_names::ENDPOINTS)?).map_err(|e| CliError::Usage(e.to_string()))?;
    let counters: PerCpuArray<MapData, Counters> =
        PerCpuArray::try_from(open(pin_dir, map_names::COUNTERS)?).map_err(|e| CliError::Usage(e.to_string()))?;
    let conntrack: HashMap<MapData, CtKey, CtValue> =
        HashMap::try_from(open(pin_dir, map_names::CONNTRACK)?).map_err(|e| CliError::Usage(e.to_string()))?;
    let flows: Vec<(CtKey, CtValue)> = conntrack.iter().flatten().collect();
    let sum = |id: u32, dir: u32| -> Counters {
        let mut t = Counters::default();
        if let Ok(v) = counters.get(&(id * 2 + dir), 0) {
            for c in v.iter() {
                t.allowed_packets += c.allowed_packets;
                t.allowed_bytes += c.allowed_bytes;
                t.denied_packets += c.denied_packets;
                t.denied_bytes += c.denied_bytes;
            }
        }
        t
    };
    let mut out = Vec::new();
    for ep in state.endpoints.iter().filter(|e| only.is_none_or(|p| e.pod == p)) {
        let addrs: Vec<IpAddr> = ep.addresses.iter().filter_map(|a| a.parse().ok()).collect();
        let kernel_revision =
            addrs.first().and_then(|a| endpoints.get(&policy_ebpf::EndpointKey { addr: encode_addr(*a) }, 0).ok()).map(|v| v.revision);
        let (ingress_counters, egress_counters) = match ep.datapath_id {
            Some(id) => (sum(id, 0).into(), sum(id, 1).into()),
            None => (CountersView::default(), CountersView::default()),
        };
        let connections =
            flows.iter().filter(|(k, _)| addrs.contains(&decode_addr(&k.lo_addr)) || addrs.contains(&decode_addr(&k.hi_addr))).count();
        out.push(DumpEndpoint {
            state: ep.clone(),
            kernel_revision,
            ingress_counters,
            egress_counters,
            connections,
            recent_denied: Vec::new(),
        });
    }
    Ok(Dump { node: state.node, synced_at: state.synced_at, endpoints: out, connections_total: flows.len(), rejected: state.rejected })
}

fn isolation(d: &DirectionState) -> String {
    if d.isolated {
        format!("isolated ({} polic{})", d.isolated_by.len(), if d.isolated_by.len() == 1 { "y" } else { "ies" })
    } else {
        "open".into()
    }
}

fn table(out: &mut String, name: &str, d: &DirectionState) {
    if !d.isolated {
        let _ = writeln!(out, "  {name}: open (no policy selects the pod for {name})");
        return;
    }
    let _ = writeln!(out, "  {name}: isolated by {}; anything not listed is denied", d.isolated_by.join(", "));
    let mut rows = vec![vec!["PREFIX".to_string(), "ALLOWS".to_string(), "STANDS FOR".to_string()]];
    rows.extend(d.entries.iter().map(|e| vec![e.prefix.clone(), e.allows.clone(), e.stands_for.join(", ")]));
    crate::text::columns(out, "    ", &rows);
}

impl Dump {
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "node {}: {} pods enforced, {} tracked connections", self.node, self.endpoints.len(), self.connections_total);
        let rows: Vec<[String; 8]> = self
            .endpoints
            .iter()
            .map(|e| {
                let rev = match (e.state.datapath_revision, e.kernel_revision) {
                    (Some(a), Some(b)) if a == b => a.to_string(),
                    (Some(a), Some(b)) => format!("{b} (agent: {a})"),
                    (_, Some(b)) => b.to_string(),
                    _ => "-".into(),
                };
                [
                    e.state.pod.clone(),
                    e.state.interface.clone().unwrap_or_else(|| "(not found)".into()),
                    rev,
                    if e.state.fail_closed.is_some() { "FAIL-CLOSED".into() } else { isolation(&e.state.ingress) },
                    if e.state.fail_closed.is_some() { "FAIL-CLOSED".into() } else { isolation(&e.state.egress) },
                    format!("{}/{}", e.ingress_counters.allowed_packets, e.egress_counters.allowed_packets),
                    format!("{}/{}", e.ingress_counters.denied_packets, e.egress_counters.denied_packets),
                    e.connections.to_string(),
                ]
            })
            .collect();
        let header = ["POD", "INTERFACE", "REVISION", "INGRESS", "EGRESS", "ALLOWED IN/OUT", "DENIED IN/OUT", "CONNS"];
        let summary: Vec<Vec<String>> =
            std::iter::once(header.map(String::from).to_vec()).chain(rows.into_iter().map(|r| r.to_vec())).collect();
        crate::text::columns(&mut out, "", &summary);
        for e in &self.endpoints {
            let _ = writeln!(out, "\n{}  ({})", e.state.pod, e.state.addresses.join(", "));
            if let Some(err) = &e.state.fail_closed {
                let _ = writeln!(out, "  FAIL-CLOSED: {err}");
            }
            table(&mut out, "ingress", &e.state.ingress);
            table(&mut out, "egress", &e.state.egress);
            if !e.state.audited.is_empty() {
                let _ =
                    writeln!(out, "  audited (not enforced; flows they would deny are reported as audit): {}", e.state.audited.join(", "));
            }
            if !e.recent_denied.is_empty() {
                let _ = writeln!(out, "  recent denied flows:");
                for f in &e.recent_denied {
                    let _ = writeln!(out, "    {}", f.text());
                }
            }
        }
        for r in &self.rejected {
            let _ = writeln!(out, "\nrejected: {r}");
        }
        out
    }
}

pub fn run(args: Args) -> Result<ExitCode, CliError> {
    let mut d = read(&args.pin_dir, &args.state_file, args.pod.as_deref())?;
    if let Some(mut recent) = recent_denied(&args.observe_socket) {
        for e in &mut d.endpoints {
            e.recent_denied = recent.remove(&e.state.pod).unwrap_or_default();
        }
    }
    if let Some(p) = &args.pod {
        if d.endpoints.is_empty() {
            return Err(CliError::Usage(format!("pod {p} is not enforced on node {}", d.node)));
        }
    }
    match args.output {
        OutputFormat::Text => super::emit(&d.render_text())?,
        OutputFormat::Json => super::emit_json(&d)?,
    }
    Ok(ExitCode::SUCCESS)
}
