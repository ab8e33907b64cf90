//! The fuzz generator without root: determinism, valid policies, the case-file round trip,
//! and the model-level runner agreeing with the expectations the generator wrote.

use conformance::case::{Case, Expect, Reachability};
use conformance::cluster::{Families, expand_placeholders};
use conformance::fuzz::{FuzzRun, generate, run_fuzz};
use conformance::model::{ModelCluster, run_case};
use conformance::runner::RunOptions;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy_model::Policy;

const FAMILIES: [Families; 3] = [Families::Ipv4, Families::Ipv6, Families::Dual];

fn cases(seed: u64, n: u64, families: Families) -> Vec<Case> {
    (0..n).map(|i| generate(seed, i, families)).collect()
}

#[test]
fn a_seed_gives_the_same_cases_and_another_seed_others() {
    for families in FAMILIES {
        let a = cases(7, 20, families);
        assert_eq!(a, cases(7, 20, families));
        assert_ne!(a, cases(8, 20, families));
        // Case i does not depend on the cases generated before it.
        assert_eq!(generate(7, 13, families), a[13]);
    }
}

/// A fixed case's text, so that a change of algorithm (or of the RNG's output) shows up
/// as a failure rather than silently giving CI's seed other cases.
#[test]
fn the_generator_is_stable() {
    let case = generate(1, 1, Families::Ipv4);
    let text = case.to_yaml();
    assert!(text.starts_with("name: fuzz-ipv4-s1-1\n"), "{text}");
    assert!(text.contains("cidr: ${net:x/a:0}\n"), "{text}");
    assert!(text.contains("- ${net:x/b:29}\n"), "{text}");
    assert_eq!(case.steps.len(), 2);
    assert_eq!(case.steps[0].apply.len(), 3);
}

#[test]
fn generated_policies_are_valid_after_expansion() {
    for families in FAMILIES {
        for case in cases(11, 200, families) {
            let mut cluster = ModelCluster::new(&case.pod_names(), families);
            for (si, step) in case.steps.iter().enumerate() {
                assert!(cluster.apply_step(step).is_empty(), "{} step {si}", case.name);
                for manifest in step.apply.iter().chain(&step.update) {
                    let mut v = manifest.clone();
                    expand_placeholders(&mut v, &cluster.pods, families.primary()).unwrap();
                    let np: NetworkPolicy = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{}: {e}: {v}", case.name));
                    if let Err(e) = Policy::from_k8s(&np) {
                        panic!("{}: invalid policy: {e}\n{v:#}", case.name);
                    }
                }
            }
        }
    }
}

#[test]
fn case_files_round_trip() {
    for families in FAMILIES {
        for case in cases(3, 50, families) {
            let text = case.to_yaml();
            let back = Case::parse(&case.name, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(back, case, "{text}");
        }
    }
}

/// The generator exercises what it claims to: every family of the brief appears in 200
/// cases (a broken weight table would otherwise go unnoticed).
#[test]
fn the_cyclonus_families_all_appear() {
    let text: String = cases(5, 200, Families::Ipv4).iter().map(Case::to_yaml).collect();
    for needle in [
        "podSelector: {}",
        "matchLabels:",
        "operator: In\n",
        "operator: NotIn",
        "operator: Exists",
        "operator: DoesNotExist",
        "- Ingress\n      - Egress",
        "namespaceSelector:",
        "ipBlock:",
        "except:",
        "${host:",
        "port: serve-",
        "endPort:",
        "protocol: SCTP",
        "protocol: UDP",
        "ingress: []",
        "egress: []",
        "- {}",
        "update:",
        "delete:",
        "labelNamespace:",
        "labelPod:",
        ": null",
    ] {
        assert!(text.contains(needle), "no {needle:?} in 200 generated cases");
    }
    // Some steps expect blocked cells and some connected ones.
    let cells: Vec<Expect> = cases(5, 50, Families::Ipv4)
        .iter()
        .flat_map(|c| c.steps.iter().flat_map(|s| s.probes.iter()))
        .flat_map(|p| Reachability::parse(&p.expect).unwrap().cells.into_iter().flatten())
        .collect();
    assert!(cells.contains(&Expect::Blocked) && cells.contains(&Expect::Connected));
}

/// The model-level runner (the same loading and matrix path as `policy-agent matrix`, which
/// also checks the compiled tables against the reference) agrees with the expectations the
/// generator computed with the reference evaluator.
#[test]
fn the_model_runner_agrees_with_the_generated_expectations() {
    for families in FAMILIES {
        for case in cases(21, 100, families) {
            let outcome = run_case(&case, families);
            assert!(outcome.passed(), "{}\n{}\n{}", case.name, outcome.report(), case.to_yaml());
        }
    }
}

/// `run_fuzz` reports a disagreement as a failing case and writes a case file that loads
/// back to the same case.
#[test]
fn a_disagreement_is_written_as_a_case_file() {
    let dir = tempfile::tempdir().unwrap();
    let fuzz = FuzzRun { seed: 4, indices: 0..3, out: dir.path().to_path_buf(), emit: false, cluster_policies: false };
    let opts = RunOptions { deadline: std::time::Duration::from_secs(1), ..RunOptions::new(Families::Ipv4) };
    // A "datapath" that flips the first checked cell of case 1's first probe.
    let (passed, failed) = run_fuzz(&fuzz, opts, |case, opts| {
        let mut outcome = run_case(case, opts.families);
        if case.name.ends_with("-1") {
            let p = &mut outcome.probes[0];
            let (i, j) = (0, 1);
            p.observed.cells[i][j] = match p.expected.cells[i][j] {
                Expect::Connected => Expect::Blocked,
                _ => Expect::Connected,
            };
            p.wrong.push((p.expected.pods[i].clone(), p.expected.pods[j].clone()));
        }
        Ok(outcome)
    });
    assert_eq!((passed, failed), (2, 1));
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1);
    let loaded = Case::load(&files[0]).unwrap();
    assert_eq!(loaded, generate(4, 1, Families::Ipv4));
}

fn cnp_cases(seed: u64, n: u64, families: Families) -> Vec<Case> {
    (0..n).map(|i| conformance::fuzz::generate_with(seed, i, families, 1, true)).collect()
}

/// With `--cluster-policies`: both tiers, every action and peer kind, ports, named ports
/// and ranges, updates and deletes of ClusterNetworkPolicies appear, and every generated
/// one passes validation (a refused one would only test the refusal).
#[test]
fn cluster_policy_cases_cover_the_api_and_are_valid() {
    let all = cnp_cases(9, 200, Families::Dual);
    let text: String = all.iter().map(Case::to_yaml).collect();
    for needle in [
        "kind: ClusterNetworkPolicy",
        "tier: Admin",
        "tier: Baseline",
        "action: Accept",
        "action: Deny",
        "action: Pass",
        "namespaces:",
        "pods:",
        "networks:",
        "destinationPort:",
        "range:",
        "destinationNamedPort:",
        "kind: NetworkPolicy",
    ] {
        assert!(text.contains(needle), "no {needle:?} in 200 generated cases");
    }
    assert!(all.iter().any(|c| c.steps.iter().any(|s| s.delete.iter().any(|d| !d.contains('/')))), "no ClusterNetworkPolicy deleted");
    for families in FAMILIES {
        for case in cnp_cases(11, 100, families) {
            let mut cluster = ModelCluster::new(&case.pod_names(), families);
            for (si, step) in case.steps.iter().enumerate() {
                assert!(cluster.apply_step(step).is_empty(), "{} step {si}", case.name);
                for manifest in step.apply.iter().chain(&step.update).filter(|m| m["kind"] == "ClusterNetworkPolicy") {
                    let mut v = manifest.clone();
                    expand_placeholders(&mut v, &cluster.pods, families.primary()).unwrap();
                    let cnp: policy_model::cnp::ClusterNetworkPolicy = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{}: {e}: {v}", case.name));
                    if let Err(e) = policy_model::cnp::ClusterPolicy::from_manifest(&cnp) {
                        panic!("{}: invalid ClusterNetworkPolicy: {e}\n{v:#}", case.name);
                    }
                }
            }
        }
    }
}

/// The model-level runner (compiled tables, checked against the reference) agrees with
/// the expectations the generator computed, with ClusterNetworkPolicies in the mix.
#[test]
fn the_model_runner_agrees_with_generated_cluster_policy_cases() {
    for families in FAMILIES {
        for case in cnp_cases(21, 100, families) {
            let outcome = run_case(&case, families);
            assert!(outcome.passed(), "{}\n{}\n{}", case.name, outcome.report(), case.to_yaml());
        }
    }
}
