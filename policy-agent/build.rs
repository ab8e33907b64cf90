//! Builds the kernel programs (`policy-ebpf`'s binary) for the BPF target with the nightly
//! toolchain and bpf-linker (`scripts/setup-ebpf.sh` installs both), into `OUT_DIR`.

//! `POLICY_AGENT_EBPF_TOOLCHAIN` names another nightly (e.g. a dated one, for reproducible
//! images).
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=POLICY_AGENT_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("POLICY_AGENT_EBPF_TOOLCHAIN").ok();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "policy-ebpf", root_dir: root, no_default_features: false, features: &["ebpf"] }],
        match toolchain.as_deref() {
            Some(t) => aya_build::Toolchain::Custom(t),
            None => aya_build::Toolchain::Nightly,
        },
    )
}
