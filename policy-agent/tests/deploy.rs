//! deploy/: the manifests are valid Kubernetes objects, the RBAC rules are exactly what
//! the code uses, the DaemonSet's flags exist, and the kustomization lists everything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use policy_agent::agent::kube_source::WATCHED_KINDS;
use policy_agent::agent::permissions::API_ACCESS;
use policy_agent::cli::Cli;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Parses as `T` and checks nothing is lost on the way back: a misspelled or misplaced
/// field (which k8s-openapi would silently ignore) fails here.
fn typed<T: DeserializeOwned + Serialize>(path: &Path) -> T {
    let raw = yaml(path);
    let obj: T = serde_json::from_value(raw.clone()).unwrap_or_else(|e| panic!("{}: not a valid object: {e}", path.display()));
    let back = serde_json::to_value(&obj).unwrap();
    assert_eq!(back, raw, "{}: fields were dropped or changed when read as a Kubernetes object", path.display());
    obj
}

#[test]
fn every_manifest_is_a_valid_object() {
    let d = deploy();
    typed::<Namespace>(&d.join("namespace.yaml"));
    typed::<ServiceAccount>(&d.join("serviceaccount.yaml"));
    typed::<ClusterRole>(&d.join("clusterrole.yaml"));
    typed::<ClusterRoleBinding>(&d.join("clusterrolebinding.yaml"));
    typed::<DaemonSet>(&d.join("daemonset.yaml"));
    typed::<Service>(&d.join("service-metrics.yaml"));
    let mut examples = 0;
    for entry in std::fs::read_dir(d.join("examples")).unwrap() {
        let p = entry.unwrap().path();
        let np: NetworkPolicy = typed(&p);
        policy_model::Policy::from_k8s(&np).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        examples += 1;
    }
    assert!(examples >= 5);
}

#[test]
fn rbac_is_exactly_what_the_agent_uses() {
    let role: ClusterRole = typed(&deploy().join("clusterrole.yaml"));
    let mut in_yaml = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        for g in rule.api_groups.unwrap_or_default() {
            for r in rule.resources.clone().unwrap_or_default() {
                in_yaml.insert((g.clone(), r, verbs.clone()));
            }
        }
    }
    let in_code: BTreeSet<(String, String, Vec<String>)> = API_ACCESS
        .iter()
        .map(|(g, r, v)| {
            let mut verbs: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            verbs.sort();
            (g.to_string(), r.to_string(), verbs)
        })
        .collect();
    assert_eq!(in_yaml, in_code, "deploy/clusterrole.yaml must grant exactly permissions::API_ACCESS");
    for kind in WATCHED_KINDS {
        assert!(
            API_ACCESS.iter().any(|(_, r, v)| *r == kind && ["get", "list", "watch"].iter().all(|x| v.contains(x))),
            "the agent watches {kind} but API_ACCESS does not allow it"
        );
    }
    let binding: ClusterRoleBinding = typed(&deploy().join("clusterrolebinding.yaml"));
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
}

#[test]
fn daemonset_flags_exist_and_ports_agree() {
    let ds: DaemonSet = typed(&deploy().join("daemonset.yaml"));
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    // NODE_NAME comes from the downward API; here it is given as the flag it stands for.
    let argv: Vec<String> =
        ["policy-agent".to_string()].into_iter().chain(args.clone()).chain(["--node-name".into(), "test-node".into()]).collect();
    Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("the DaemonSet's args do not parse: {e}"));
    let env = c.env.clone().unwrap();
    assert!(env.iter().any(|e| e.name == "NODE_NAME"
        && e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).is_some_and(|f| f.field_path == "spec.nodeName")));
    let metrics_port: i32 = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-addr="))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("--metrics-addr");
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, metrics_port);
    for probe in [c.liveness_probe.as_ref().unwrap(), c.readiness_probe.as_ref().unwrap()] {
        let get = probe.http_get.as_ref().unwrap();
        assert_eq!(get.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(metrics_port));
    }
    let caps = c.security_context.as_ref().unwrap().capabilities.as_ref().unwrap().add.clone().unwrap();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"]);
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(false));
}

#[test]
fn kustomization_lists_every_manifest() {
    let k = yaml(&deploy().join("kustomization.yaml"));
    let listed: BTreeSet<String> = k["resources"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let files: BTreeSet<String> = std::fs::read_dir(deploy())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
}
