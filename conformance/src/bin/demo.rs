//! The agent's main job on an emulated node, no cluster needed: the pods of
//! `examples/cluster` in network namespaces (each serving its container ports), the example
//! policies of `deploy/examples`, the real `policy-agent run` enforcing them, the
//! reachability observed with real connections (next to what the model says), then
//! `policy-agent dump`.
//!
//! Run as root from the repository: `bash scripts/demo.sh`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use conformance::agent_process::{AgentProcess, agent_binary};
use conformance::netns::unique;
use conformance::topology::NodeNet;
use conformance::traffic::{probe, serve};
use policy_agent::manifests::Manifests;
use policy_agent::matrix::{Probe, compute};
use policy_model::Protocol;

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cluster = root.join("examples/cluster");
    let policies = root.join("deploy/examples");
    let (state, errors) =
        Manifests::read_dirs(&[cluster.clone(), policies.clone()]).map_err(|(d, e)| anyhow::anyhow!("{}: {e}", d.display()))?.state();
    if !errors.is_empty() {
        bail!("invalid example manifests: {errors:?}");
    }
    let node = state.nodes().next().context("examples/cluster has a Node")?;
    println!(
        "Emulating node {} ({}) with {} pods; policies from deploy/examples/\n",
        node.name,
        node.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
        state.pods().count()
    );
    let node_net = NodeNet::create(&unique("demo-n"), &node.name, &node.addresses)?;

    // Each pod: its namespace, veth and addresses, serving its container ports.
    let mut pods = Vec::new();
    for (i, pod) in state.pods().filter(|p| !p.host_network && p.node.as_deref() == Some(node.name.as_str())).enumerate() {
        let net = node_net.add_pod(&unique("demo-p"), &format!("demo{i}"), &pod.ips)?;
        let ports: BTreeSet<u16> = pod.named_ports.iter().map(|p| p.port).collect();
        let servers = serve(&net.ns, &ports.into_iter().collect::<Vec<_>>())?;
        println!(
            "  pod {:<24} {:<34} serving {}",
            pod.key.to_string(),
            pod.ips.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
            pod.named_ports.iter().map(|p| format!("{}={}/{}", p.name, p.port, p.protocol)).collect::<Vec<_>>().join(" ")
        );
        let served: BTreeSet<(u16, Protocol)> = pod.named_ports.iter().map(|p| (p.port, p.protocol)).collect();
        pods.push((pod.key.clone(), pod.ips.clone(), net, servers, served));
    }

    let mut agent = AgentProcess::start_multi(&node_net.ns, &node.name, &[&cluster, &policies], &[]).map_err(anyhow::Error::msg)?;
    agent.wait_ready(Duration::from_secs(20)).map_err(anyhow::Error::msg)?;
    println!("\npolicy-agent run is enforcing (pins in {}).\n", agent.pin_dir.display());
    // Give the sync that follows readiness a moment (interfaces are found after the first pass).
    std::thread::sleep(Duration::from_millis(500));

    let probes = [
        Probe { port: 8080, protocol: Protocol::Tcp },
        Probe { port: 5432, protocol: Protocol::Tcp },
        Probe { port: 9090, protocol: Protocol::Tcp },
        Probe { port: 9187, protocol: Protocol::Tcp },
        Probe { port: 53, protocol: Protocol::Udp },
    ];
    let model = compute(&state, &probes, None);
    let width = pods.iter().map(|p| p.0.to_string().len()).max().unwrap_or(5);
    let mut disagreements = 0;
    for p in probes {
        println!(
            "{p}  observed over IPv4 (rows: from, columns: to; . connected, X blocked, - not served or self; * differs from the model)"
        );
        print!("{:width$}", "");
        for (to, ..) in &pods {
            print!(" {:width$}", to.to_string());
        }
        println!();
        for (from, _, from_net, ..) in &pods {
            print!("{:width$}", from.to_string());
            for (to, to_ips, _, _, served) in &pods {
                if from == to || !served.contains(&(p.port, p.protocol)) {
                    print!(" {:width$}", "-");
                    continue;
                }
                let dst = to_ips.iter().find(|a| a.is_ipv4()).copied().context("IPv4 address")?;
                let got = probe(&from_net.ns, p.protocol, SocketAddr::new(dst, p.port), Duration::from_millis(400))?;
                let want = model.mark(&from.to_string(), &to.to_string(), p) == '.';
                if got != want {
                    disagreements += 1;
                }
                let mark = format!("{}{}", if got { "." } else { "X" }, if got != want { "*" } else { "" });
                print!(" {mark:width$}");
            }
            println!();
        }
        println!();
    }
    println!(
        "{}",
        if disagreements == 0 {
            "Every observed connection matches the model (policy-agent matrix).".to_string()
        } else {
            format!("{disagreements} observations differ from the model.")
        }
    );

    println!("\n=== policy-agent dump\n");
    let out = std::process::Command::new(agent_binary().map_err(anyhow::Error::msg)?)
        .arg("dump")
        .arg("--pin-dir")
        .arg(&agent.pin_dir)
        .arg("--state-file")
        .arg(&agent.state_file)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));

    // The blocked probes above, as the datapath reported them: who, to whom, which policy.
    println!("\n=== policy-agent observe --verdict denied --last 8\n");
    let out = std::process::Command::new(agent_binary().map_err(anyhow::Error::msg)?)
        .args(["observe", "--verdict", "denied", "--last", "8", "--socket"])
        .arg(agent.observe_socket())
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    agent.stop();
    if disagreements > 0 {
        bail!("the datapath disagreed with the model");
    }
    Ok(())
}
