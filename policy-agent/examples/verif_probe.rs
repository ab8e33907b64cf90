fn main() {
    let mut l = aya::EbpfLoader::new();
    l.default_map_pin_directory("/sys/fs/bpf/verif-probe");
    std::fs::create_dir_all("/sys/fs/bpf/verif-probe").unwrap();
    let mut e = l.load(policy_agent::datapath::program_bytes()).unwrap();
    for n in ["pod_egress", "pod_ingress", "node_egress"] {
        let p: &mut aya::programs::SchedClassifier = e.program_mut(n).unwrap().try_into().unwrap();
        if let Err(err) = p.load() {
            let mut src: &dyn std::error::Error = &err;
            println!("{n}: {err}");
            while let Some(s) = src.source() {
                println!("  caused by: {s}");
                src = s;
            }
        }
    }
    if let Ok(s) = std::env::var("HOLD_SECS") {
        std::thread::sleep(std::time::Duration::from_secs(s.parse().unwrap()));
    }
    std::fs::remove_dir_all("/sys/fs/bpf/verif-probe").ok();
}
