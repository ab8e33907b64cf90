//! The real agent (`policy-agent run`, over manifests or an API server) running in an emulated node's network
//! namespace, as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{Netns, unique};

/// The `policy-agent` binary: `$POLICY_AGENT_BIN`, else the one cargo built next to this
/// executable (target/<profile>/policy-agent).
pub fn agent_binary() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("POLICY_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("policy-agent");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!("no policy-agent binary near {} (build it: cargo build -p policy-agent, or set POLICY_AGENT_BIN)", exe.display()))
}

pub struct AgentProcess {
    child: Option<Child>,
    pub pin_dir: PathBuf,
    pub state_file: PathBuf,
    pub log: PathBuf,
    work: PathBuf,
    keep_pins: bool,
}

/// How [`AgentProcess::start_with`] runs the agent, beyond the defaults of
/// [`AgentProcess::start`].
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Another `policy-agent` binary (e.g. an older release).
    pub binary: Option<PathBuf>,
    /// A pin directory shared with other agents (kept when this one goes: the caller
    /// removes it); by default a fresh one, removed on drop.
    pub pin_dir: Option<PathBuf>,
    /// `--max-peer-entries` and `--max-connections` (default 65536 and 16384).
    pub sizes: Option<(u32, u32)>,
    pub env: Vec<(String, String)>,
}

impl AgentProcess {
    /// Starts the agent for `node_name` in `node_ns`, reading `manifests`.
    pub fn start(node_ns: &Netns, node_name: &str, manifests: &Path, extra: &[&str]) -> Result<AgentProcess, String> {
        AgentProcess::start_multi(node_ns, node_name, &[manifests], extra)
    }

    /// [`AgentProcess::start`] over several manifest directories.
    pub fn start_multi(node_ns: &Netns, node_name: &str, manifests: &[&Path], extra: &[&str]) -> Result<AgentProcess, String> {
        AgentProcess::start_with_poll(node_ns, node_name, manifests, Some(20), extra)
    }

    /// Starts the agent for `node_name` in `node_ns`, watching the API named by
    /// `kubeconfig` (`policy-agent run --kubeconfig`).
    pub fn start_api(
        node_ns: &Netns,
        node_name: &str,
        kubeconfig: &Path,
        poll_interval_ms: Option<u64>,
        extra: &[&str],
    ) -> Result<AgentProcess, String> {
        let kubeconfig = kubeconfig.to_str().ok_or("kubeconfig path is not UTF-8")?;
        let mut args = vec!["--kubeconfig", kubeconfig];
        args.extend_from_slice(extra);
        AgentProcess::start_with_poll(node_ns, node_name, &[], poll_interval_ms, &args)
    }

    /// [`AgentProcess::start_multi`] with the agent's own `--poll-interval-ms` (`None`: its
    /// default), for measurements of the agent as deployed.
    pub fn start_with_poll(
        node_ns: &Netns,
        node_name: &str,
        manifests: &[&Path],
        poll_interval_ms: Option<u64>,
        extra: &[&str],
    ) -> Result<AgentProcess, String> {
        AgentProcess::start_with(node_ns, node_name, manifests, poll_interval_ms, extra, AgentOptions::default())
    }

    /// [`AgentProcess::start_with_poll`] with [`AgentOptions`].
    pub fn start_with(
        node_ns: &Netns,
        node_name: &str,
        manifests: &[&Path],
        poll_interval_ms: Option<u64>,
        extra: &[&str],
        opts: AgentOptions,
    ) -> Result<AgentProcess, String> {
        // This build serves flows on a socket (default under /run, shared by every agent
        // on a machine): each test agent gets its own. An older build has no such flag.
        let this_build = opts.binary.is_none();
        let bin = match opts.binary {
            Some(b) => b,
            None => agent_binary()?,
        };
        let id = unique("pa-agent-");
        let work = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
        let keep_pins = opts.pin_dir.is_some();
        let pin_dir = opts.pin_dir.unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/{id}")));
        let (peers, connections) = opts.sizes.unwrap_or((65536, 16384));
        let state_file = work.join("state.json");
        let log = work.join("agent.log");
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        // nsenter switches only the network namespace: the agent sees the machine's bpffs
        // on /sys/fs/bpf, as a DaemonSet pod does with it mounted from the host
        // (`ip netns exec` would remount /sys and hide it).
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", node_ns.name()))
            .arg(&bin)
            .args(["run", "--node-name", node_name])
            .args(poll_interval_ms.map(|ms| format!("--poll-interval-ms={ms}")))
            .args(["--max-peer-entries", &peers.to_string(), "--max-connections", &connections.to_string()])
            .args(manifests.iter().flat_map(|m| [std::ffi::OsStr::new("--manifests"), m.as_os_str()]))
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--state-file")
            .arg(&state_file)
            .args(extra)
            .args(if this_build && !extra.iter().any(|a| a.starts_with("--observe-socket")) {
                vec![std::ffi::OsString::from("--observe-socket"), work.join("observe.sock").into_os_string()]
            } else {
                Vec::new()
            })
            .envs(opts.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        let child = cmd.spawn().map_err(|e| format!("starting {}: {e}", bin.display()))?;
        Ok(AgentProcess { child: Some(child), pin_dir, state_file, log, work, keep_pins })
    }

    /// Waits until the agent published its first full sync (or exited).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.state_file.exists() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(format!("the agent exited ({status}):\n{}", self.log_text()));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("the agent was not ready after {timeout:?}:\n{}", self.log_text()))
    }

    /// The agent's process id (nsenter execs it), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where this build's agent serves flows to `policy-agent observe`.
    pub fn observe_socket(&self) -> PathBuf {
        self.work.join("observe.sock")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no clean-up of any kind (a crash, an OOM kill).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as the kubelet stops it; the pins stay.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // nsenter execs the agent, so the child is the agent itself.
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
        if !self.keep_pins {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}
