//! The offline commands, run as an operator runs them: the binary, a manifest directory.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {team: blue}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  nodeName: n1
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {podIPs: [{ip: 10.244.0.1}, {ip: "fd10:244::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: y, labels: {pod: b}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIPs: [{ip: 10.244.0.2}]}
"#;

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-blue, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
    - from: [{namespaceSelector: {matchLabels: {team: blue}}}]
      ports: [{port: http}]
"#;

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

fn agent(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_policy-agent")).args(args).arg("--manifests").arg(dir).output().expect("run policy-agent")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn matrix_json_has_the_documented_shape() {
    let d = dir_with(&[("cluster.yaml", CLUSTER), ("policy.yaml", POLICY)]);
    let o = agent(&["matrix", "--port", "8080/TCP", "--port", "80/UDP", "-o", "json"], d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(v.as_object().unwrap().len(), 1, "only `results` at the top level");
    // 2 pods: 4 ordered pairs; x/a has two families, y/b one: pairs with y/b share only
    // IPv4. Per probe: a->a v4+v6, a->b v4, b->a v4, b->b v4 = 5; two probes = 10.
    assert_eq!(results.len(), 10);
    for r in results {
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 6, "{r}");
        for k in ["from", "to", "port", "protocol", "family", "allowed"] {
            assert!(r.get(k).is_some(), "missing {k} in {r}");
        }
    }
    let find = |from: &str, to: &str, port: u64, proto: &str| {
        results
            .iter()
            .find(|r| r["from"] == from && r["to"] == to && r["port"] == port && r["protocol"] == proto && r["family"] == "ipv4")
            .unwrap()["allowed"]
            .as_bool()
            .unwrap()
    };
    assert!(find("y/b", "x/a", 8080, "TCP"), "named port http=8080 from team=blue");
    assert!(!find("y/b", "x/a", 80, "UDP"));
    assert!(find("x/a", "y/b", 80, "UDP"), "y/b is not isolated");
    let r0 = &results[0];
    assert!(r0["family"] == "ipv4" || r0["family"] == "ipv6");
}

#[test]
fn matrix_text_marks_cells() {
    let d = dir_with(&[("cluster.yaml", CLUSTER), ("policy.yaml", POLICY)]);
    let o = agent(&["matrix", "--port", "8080/TCP", "--port", "81/TCP"], d.path());
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(text.contains("8080/TCP"), "{text}");
    let row_b_8080 = text.lines().skip_while(|l| !l.starts_with("8080/TCP")).find(|l| l.starts_with("y/b")).unwrap();
    assert_eq!(row_b_8080.split_whitespace().collect::<Vec<_>>(), ["y/b", ".", "."]);
    let row_b_81 = text.lines().skip_while(|l| !l.starts_with("81/TCP")).find(|l| l.starts_with("y/b")).unwrap();
    assert_eq!(row_b_81.split_whitespace().collect::<Vec<_>>(), ["y/b", "X", "."]);
}

#[test]
fn default_probes_are_80_and_81_over_three_protocols() {
    let d = dir_with(&[("cluster.yaml", CLUSTER)]);
    let o = agent(&["matrix", "-o", "json"], d.path());
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let mut probes: Vec<(u64, String)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["port"].as_u64().unwrap(), r["protocol"].as_str().unwrap().to_string()))
        .collect();
    probes.sort();
    probes.dedup();
    assert_eq!(probes.len(), 6, "{probes:?}");
}

#[test]
fn invalid_objects_are_named_and_the_rest_still_evaluated() {
    let bad_policy = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad-cidr, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad-endport, namespace: x}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 90, endPort: 80}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: x}
spec: {containers: [{name: c}]}
status: {podIPs: [{ip: not-an-ip}]}
"#;
    let d =
        dir_with(&[("cluster.yaml", CLUSTER), ("policy.yaml", POLICY), ("bad.yaml", bad_policy), ("garbage.yaml", "kind: [unclosed\n")]);
    let o = agent(&["matrix", "--port", "8080/TCP", "-o", "json"], d.path());
    assert_eq!(o.status.code(), Some(1), "invalid objects: exit 1");
    let err = stderr(&o);
    assert!(err.contains("NetworkPolicy x/bad-cidr") && err.contains("spec.egress[0].to[0].ipBlock.cidr"), "{err}");
    assert!(err.contains("NetworkPolicy x/bad-endport") && err.contains("spec.ingress[0].ports[0].endPort"), "{err}");
    assert!(err.contains("Pod x/broken") && err.contains("status.podIPs[0].ip"), "{err}");
    assert!(err.contains("garbage.yaml"), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error: ")).count(), 4, "one line each: {err}");
    // The valid policy still isolates x/a; the invalid ones changed nothing.
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let r = v["results"].as_array().unwrap().iter().find(|r| r["from"] == "y/b" && r["to"] == "x/a").unwrap();
    assert_eq!(r["allowed"], true);
}

#[test]
fn explain_says_which_rule_and_why() {
    let d = dir_with(&[("cluster.yaml", CLUSTER), ("policy.yaml", POLICY)]);
    let o = agent(&["explain", "--from", "y/b", "--to", "x/a", "--port", "8080", "--protocol", "TCP"], d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let t = stdout(&o);
    assert!(t.contains("ALLOWED") && t.contains("x/from-blue ingress rule #0") && t.contains("[ALLOWS]"), "{t}");

    let o = agent(&["explain", "--from", "y/b", "--to", "x/a", "--port", "9999", "--protocol", "tcp", "-o", "json"], d.path());
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["flows"][0]["ingress"]["outcome"], "denied");
    assert_eq!(v["flows"][0]["ingress_rules"][0]["port"], false);
    assert_eq!(v["flows"][0]["ingress_rules"][0]["peer"], true);

    let o = agent(&["explain", "--from", "10.250.0.7", "--to", "x/a", "--port", "8080"], d.path());
    assert!(stdout(&o).contains("BLOCKED"), "an address outside the cluster is not team=blue");

    let o = agent(&["explain", "--from", "x/nope", "--to", "x/a", "--port", "80"], d.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("pod x/nope is not in the manifests"));
}

#[test]
fn compile_lists_the_nodes_pods_with_provenance() {
    let d = dir_with(&[("cluster.yaml", CLUSTER), ("policy.yaml", POLICY)]);
    let o = agent(&["compile", "--node", "n1", "-o", "json"], d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let eps = v["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 1, "only x/a runs on n1");
    let ingress = &eps[0]["ingress"];
    assert_eq!(ingress["isolated"], true);
    let entry = ingress["entries"].as_array().unwrap().iter().find(|e| e["prefix"] == "10.244.0.2/32").unwrap();
    assert_eq!(entry["allows"], serde_json::json!({"TCP": [{"start": 8080, "end": 8080}]}));
    assert_eq!(entry["stands_for"][0], serde_json::json!({"kind": "pod", "pod": {"namespace": "y", "name": "b"}}));

    let o = agent(&["compile", "--node", "n1"], d.path());
    let t = stdout(&o);
    assert!(
        t.contains("x/a  endpoint 1  revision 1") && t.contains("10.244.0.2/32") && t.contains("TCP 8080") && t.contains("pod y/b"),
        "{t}"
    );
}

#[test]
fn unreadable_directory_exits_2() {
    let o = Command::new(env!("CARGO_BIN_EXE_policy-agent")).args(["matrix", "--manifests", "/nonexistent/dir"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read manifests from /nonexistent/dir"));
}

/// `--enforcement audit` on the offline commands, as on `run`: the enforced tables and
/// verdicts allow everything, and `compile` shows the audit table that holds the policy.
#[test]
fn the_offline_commands_take_the_node_enforcement() {
    let d = dir_with(&[("cluster.yaml", CLUSTER), ("policy.yaml", POLICY)]);
    let o = agent(&["compile", "--node", "n1", "--enforcement", "audit", "-o", "json"], d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let ep = &v["endpoints"][0];
    assert_eq!(ep["ingress"]["isolated"], false, "audited: nothing is enforced");
    let audit = ep["audit"].as_array().unwrap();
    assert_eq!(audit.len(), 1, "{ep:#}");
    assert_eq!(audit[0]["audited"][0], serde_json::json!({"namespace": "x", "name": "from-blue"}), "{ep:#}");
    assert_eq!(audit[0]["table"]["isolated"], true);

    // x/a admits only team=blue on 8080: enforced, y/b -> x/a:80 is blocked; audited, allowed.
    let b_to_a = |extra: &[&str]| {
        let mut args = vec!["matrix", "--port", "80/TCP", "-o", "json"];
        args.extend_from_slice(extra);
        let o = agent(&args, d.path());
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        v["results"].as_array().unwrap().iter().find(|r| r["from"] == "y/b" && r["to"] == "x/a" && r["family"] == "ipv4").unwrap()["allowed"].clone()
    };
    assert_eq!(b_to_a(&[]), false, "enforced: x/a admits only 8080");
    assert_eq!(b_to_a(&["--enforcement", "audit"]), true, "audited: nothing is enforced");
}

/// `explain --node-port` judges each backend by the client's own address, with the policy
/// of the datapath test `a_node_port_client_is_judged_by_its_own_address_not_the_masquerade`
/// (same verdicts: 198.51.100.10 allowed, .11 excepted, the node itself exempt).
#[test]
fn explain_judges_a_node_port_client_by_its_own_address() {
    const OBJECTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.250.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
status: {podIPs: [{ip: 10.244.0.11}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec: {type: NodePort, selector: {pod: b}, ports: [{port: 8080, targetPort: http, nodePort: 30080}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress]
  ingress: [{from: [{ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.11/32]}}]}]
"#;
    let d = dir_with(&[("objects.yaml", OBJECTS)]);
    let explain = |from: &str| {
        let o = agent(&["explain", "--from", from, "--node-port", "30080", "-o", "json"], d.path());
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["service"], serde_json::json!({"namespace": "x", "name": "web"}), "{v:#}");
        assert_eq!(v["backends"], serde_json::json!([{"pod": {"namespace": "x", "name": "b"}, "port": 80}]), "{v:#}");
        v["allowed"].as_bool().unwrap()
    };
    assert!(explain("198.51.100.10"), "an allowed client");
    assert!(!explain("198.51.100.11"), "the excepted client");
    assert!(explain("10.250.0.1"), "the node itself");
    let o = agent(&["explain", "--from", "198.51.100.11", "--node-port", "30080"], d.path());
    let text = stdout(&o);
    assert!(
        text.contains("198.51.100.11 -> NodePort 30080/TCP of Service x/web (port 8080, externalTrafficPolicy Cluster): BLOCKED"),
        "{text}"
    );
    assert!(text.contains("via NodePort 30080 of Service x/web to backend x/b port 80:"), "{text}");
    let o = agent(&["explain", "--from", "198.51.100.11", "--node-port", "30081"], d.path());
    assert_eq!(o.status.code(), Some(2), "no such NodePort: a usage error");
    assert!(stderr(&o).contains("no Service in the manifests has nodePort 30081/TCP"), "{}", stderr(&o));

    // Entering at another node: Cluster masquerades the client to that node's address,
    // which the backend's node judges (no exemption: it only forwards); Local does not
    // send the connection there at all.
    let two_nodes = format!(
        "{OBJECTS}---\napiVersion: v1\nkind: Node\nmetadata: {{name: n2}}\nstatus: {{addresses: [{{type: InternalIP, address: 10.250.0.2}}]}}\n"
    );
    let d = dir_with(&[("objects.yaml", &two_nodes)]);
    let via = |node: &str, objects: &tempfile::TempDir| {
        let o = agent(&["explain", "--from", "198.51.100.10", "--node-port", "30080", "--via-node", node, "-o", "json"], objects.path());
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str::<Value>(&stdout(&o)).unwrap()
    };
    let v = via("n1", &d);
    assert_eq!((v["allowed"].as_bool(), v["explanations"][0]["judged_as"].as_str()), (Some(true), Some("198.51.100.10")), "{v:#}");
    let v = via("n2", &d);
    assert_eq!((v["allowed"].as_bool(), v["explanations"][0]["judged_as"].as_str()), (Some(false), Some("10.250.0.2")), "{v:#}");
    let o = agent(&["explain", "--from", "198.51.100.10", "--node-port", "30080", "--via-node", "n2"], d.path());
    assert!(stdout(&o).contains("on another node: masqueraded by the node the client enters, judged as 10.250.0.2"), "{}", stdout(&o));
    let local = dir_with(&[("objects.yaml", &two_nodes.replace("{type: NodePort,", "{type: NodePort, externalTrafficPolicy: Local,"))]);
    let v = via("n2", &local);
    assert_eq!((v["allowed"].as_bool(), &v["explanations"][0]["judged_as"]), (Some(false), &Value::Null), "Local: not reached: {v:#}");
    assert_eq!(via("n1", &local)["allowed"].as_bool(), Some(true));
    let o = agent(&["explain", "--from", "198.51.100.10", "--node-port", "30080", "--via-node", "n9"], d.path());
    assert_eq!(o.status.code(), Some(2), "an unknown node: a usage error");
    assert!(stderr(&o).contains("node n9 is not in the manifests"), "{}", stderr(&o));
    let o = agent(&["explain", "--from", "198.51.100.10", "--to", "x/b", "--port", "80", "--via-node", "n1"], d.path());
    assert_eq!(o.status.code(), Some(2), "--via-node without --node-port: a usage error, not ignored");
    assert!(stderr(&o).contains("--via-node goes with --node-port"), "{}", stderr(&o));
}

/// A reader of stderr that goes away (`2>&1 >/dev/null | head -1`) is no failure of the
/// command, and never a panic (exit 101): every invalid object still gets its line tried.
#[test]
fn a_closed_stderr_is_no_panic() {
    let bad: String = (0..300)
        .map(|i| format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: bad{i}, namespace: x}}\nstatus: {{podIPs: [{{ip: nope}}]}}\n---\n"))
        .collect();
    let d = dir_with(&[("cluster.yaml", CLUSTER), ("bad.yaml", &bad)]);
    for command in
        [&["matrix", "--port", "80/TCP"][..], &["compile", "--node", "n1"], &["explain", "--from", "x/a", "--to", "y/b", "--port", "80"]]
    {
        let mut child = Command::new(env!("CARGO_BIN_EXE_policy-agent"))
            .args(command)
            .arg("--manifests")
            .arg(d.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stderr.take());
        let status = child.wait().unwrap();
        assert_ne!(status.code(), Some(101), "{command:?} panicked on a closed stderr");
        assert!(status.code().is_some(), "{command:?} died of a signal: {status:?}");
    }
}

/// A FIFO named like a manifest would block the read forever: it is reported and skipped.
#[test]
fn a_fifo_among_the_manifests_is_skipped() {
    let d = dir_with(&[("cluster.yaml", CLUSTER)]);
    let fifo = d.path().join("pipe.yaml");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo (coreutils)");
    assert!(made.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_policy-agent"))
        .args(["matrix", "--port", "80/TCP", "--manifests"])
        .arg(d.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("matrix blocked on a FIFO in the manifest directory");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "an unusable file: exit 1");
    assert!(stderr(&o).contains("pipe.yaml: not a regular file"), "{}", stderr(&o));
    assert!(stdout(&o).contains("x/a"), "the rest is still evaluated: {}", stdout(&o));
}

/// A ClusterNetworkPolicy peer with no field this version knows (here misspelt) fails
/// closed, and the offline commands say so, naming the policy and the field.
#[test]
fn a_peer_that_fails_closed_is_a_warning() {
    let cnp = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: typo}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  ingress:
    - action: Deny
      from: [{namespace: {matchLabels: {team: blue}}}]
"#;
    let d = dir_with(&[("cluster.yaml", CLUSTER), ("cnp.yaml", cnp)]);
    let o = agent(&["explain", "--from", "x/a", "--to", "y/b", "--port", "80"], d.path());
    let err = stderr(&o);
    assert!(
        err.lines().any(|l| l.starts_with("warning: ") && l.contains("ClusterNetworkPolicy typo") && l.contains("spec.ingress[0].from")),
        "{err}"
    );
    assert!(stdout(&o).contains("BLOCKED"), "the Deny rule denies all traffic: {}", stdout(&o));
}

/// Objects defined twice, and an address two pods claim, are used as the model resolves
/// them (the last definition; the first holder), and said so on stderr.
#[test]
fn redefinitions_and_contested_addresses_are_warnings() {
    let again = r#"
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {pod: c}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIPs: [{ip: 10.244.0.1}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-blue, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
"#;
    let d = dir_with(&[("cluster.yaml", CLUSTER), ("policy.yaml", POLICY), ("z-again.yaml", again)]);
    let o = agent(&["matrix", "--port", "8080/TCP", "--port", "8080/TCP", "-o", "json"], d.path());
    let err = stderr(&o);
    assert!(
        err.lines().any(|l| l.starts_with("warning: ") && l.contains("NetworkPolicy x/from-blue") && l.contains("defined again")),
        "{err}"
    );
    assert!(err.lines().any(|l| l.starts_with("warning: ") && l.contains("address 10.244.0.1 is also pod x/a")), "{err}");
    assert_eq!(o.status.code(), Some(0), "warnings are no errors: {err}");
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rows = v["results"].as_array().unwrap();
    // The second from-blue (deny all ingress to x) is the one used.
    let r = rows.iter().find(|r| r["from"] == "y/b" && r["to"] == "x/a" && r["family"] == "ipv4").unwrap();
    assert_eq!(r["allowed"], false, "{r}");
    // A repeated --port is one set of results.
    let mut keys: Vec<String> = rows.iter().map(|r| format!("{}", r)).collect();
    let n = keys.len();
    keys.dedup();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "no repeated rows");
    let o = agent(&["matrix", "--port", "0/TCP"], d.path());
    assert_eq!(o.status.code(), Some(2), "port 0 is no port: {}", stderr(&o));
}
