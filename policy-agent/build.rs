//! Builds the kernel programs (`policy-ebpf`'s binary) for the BPF target with the nightly
//! toolchain and bpf-linker (`scripts/setup-ebpf.sh` installs both), into `OUT_DIR`.

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "policy-ebpf", root_dir: root, no_default_features: false, features: &["ebpf"] }],
        aya_build::Toolchain::default(),
    )
}
