//! Developer tool: loads the kernel programs into the kernel and prints the verifier's
//! complaint if any program is refused. `HOLD_SECS=N` keeps them loaded for N seconds
//! (for `bpftool prog dump xlated name pod_egress`).
//!
//! `cargo run --release -p policy-agent --example load_programs` (as root)

fn main() {
    let pin = std::path::Path::new("/sys/fs/bpf/policy-agent-load-check");
    std::fs::create_dir_all(pin).expect("pin directory (is bpffs mounted?)");
    let mut loader = aya::EbpfLoader::new();
    loader.default_map_pin_directory(pin);
    let mut ebpf = loader.load(policy_agent::datapath::program_bytes()).expect("ELF");
    let mut failed = false;
    for name in [policy_ebpf::program_names::POD_EGRESS, policy_ebpf::program_names::POD_INGRESS, policy_ebpf::program_names::NODE_EGRESS] {
        let prog: &mut aya::programs::SchedClassifier = ebpf.program_mut(name).expect("program").try_into().expect("classifier");
        match prog.load() {
            Ok(()) => println!("{name}: accepted"),
            Err(e) => {
                failed = true;
                println!("{name}: {e}");
                let mut src: &dyn std::error::Error = &e;
                while let Some(s) = src.source() {
                    println!("  caused by: {s}");
                    src = s;
                }
            }
        }
    }
    if let Ok(s) = std::env::var("HOLD_SECS") {
        std::thread::sleep(std::time::Duration::from_secs(s.parse().expect("seconds")));
    }
    drop(ebpf);
    std::fs::remove_dir_all(pin).ok();
    std::process::exit(i32::from(failed));
}
