//! All cases (conformance/cases/: the upstream ones, and the disagreements `conformance
//! fuzz` found) at model level, in IPv4, IPv6 and dual-stack.

use std::path::PathBuf;

use conformance::case::Case;
use conformance::cluster::Families;
use conformance::model::run_case;

fn case_files() -> Vec<PathBuf> {
    files_in("cases")
}

/// The upstream ClusterNetworkPolicy conformance tests (conformance/cases/cnp/).
fn cnp_case_files() -> Vec<PathBuf> {
    files_in("cases/cnp")
}

fn files_in(sub: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(sub);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("conformance/cases exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn run_all(families: Families) {
    let files = case_files();
    let upstream = files.iter().filter(|f| f.file_name().unwrap().to_string_lossy().starts_with(|c: char| c.is_ascii_digit())).count();
    assert_eq!(upstream, 48, "the 48 upstream cases");
    run_files(&files, families);
}

fn run_files(files: &[PathBuf], families: Families) {
    assert!(!files.is_empty());
    let mut failed = Vec::new();
    for f in files {
        let case = Case::load(f).unwrap_or_else(|e| panic!("{e}"));
        let outcome = run_case(&case, families);
        if outcome.passed() {
            println!("PASS {}", case.name);
        } else {
            println!("FAIL {} ({})\n{}", case.name, f.display(), outcome.report());
            failed.push(case.name.clone());
        }
    }
    println!("{} passed, {} failed", files.len() - failed.len(), failed.len());
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

#[test]
fn upstream_cases_ipv4() {
    run_all(Families::Ipv4);
}

#[test]
fn upstream_cases_ipv6() {
    run_all(Families::Ipv6);
}

#[test]
fn upstream_cases_dual_stack() {
    run_all(Families::Dual);
}

#[test]
fn cnp_cases_ipv4() {
    run_files(&cnp_case_files(), Families::Ipv4);
}

#[test]
fn cnp_cases_ipv6() {
    run_files(&cnp_case_files(), Families::Ipv6);
}
