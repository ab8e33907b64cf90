//! What the kernel says about the agent's programs, for the benches: run time and run
//! count from the BPF statistics (`BPF_ENABLE_STATS`), the verifier's instruction counts,
//! and `BPF_PROG_TEST_RUN` of one program on one packet.
//!
//! Programs are found by name among every program loaded on the host (the benches run
//! one agent at a time), so no handle has to cross from the agent's thread, or, for tests
//! that run beside other agents, by the interface they are attached to.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::time::Duration;

use aya::programs::{ProgramInfo, SchedClassifier, TcAttachType, TestRun, TestRunOptions, loaded_programs};
use policy_ebpf::program_names;

/// The agent's programs, in the order the benches print them.
pub const PROGRAMS: [&str; 4] =
    [program_names::POD_EGRESS, program_names::POD_INGRESS, program_names::NODE_EGRESS, program_names::NODE_INGRESS];

#[derive(Debug, thiserror::Error)]
pub enum ProgramsError {
    #[error("BPF statistics: {0}")]
    Stats(String),
    #[error("program {0}: not loaded")]
    Missing(&'static str),
    #[error("program {name}: {error}")]
    Program { name: &'static str, error: String },
}

/// Turns on run-time statistics for every BPF program while the handle lives (they cost
/// a clock read or two per run themselves).
pub fn enable_stats() -> Result<OwnedFd, ProgramsError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| ProgramsError::Stats(e.to_string()))
}

fn ours() -> impl Iterator<Item = (&'static str, ProgramInfo)> {
    loaded_programs().filter_map(Result::ok).filter_map(|info| {
        // With the datapath bench's floor (`pass_all`), which is measured too.
        let name = PROGRAMS.into_iter().chain([program_names::PASS_ALL]).find(|n| info.name_as_str() == Some(*n))?;
        Some((name, info))
    })
}

/// Total run time and runs of each of the agent's programs: (program id, name) → (run
/// time, runs). Two snapshots around some traffic give its cost per run.
#[derive(Debug, Clone, Default)]
pub struct RunStats(BTreeMap<(u32, &'static str), (Duration, u64)>);

impl RunStats {
    pub fn snapshot() -> RunStats {
        RunStats(ours().map(|(name, info)| ((info.id(), name), (info.run_time(), info.run_count()))).collect())
    }

    /// Per program name, since `before`: (runs, mean nanoseconds per run; NaN without runs).
    pub fn since(&self, before: &RunStats) -> BTreeMap<&'static str, (u64, f64)> {
        let mut sum: BTreeMap<&'static str, (Duration, u64)> = BTreeMap::new();
        for (key @ (_, name), (time, runs)) in &self.0 {
            let (t0, r0) = before.0.get(key).copied().unwrap_or_default();
            let e = sum.entry(name).or_default();
            e.0 += time.saturating_sub(t0);
            e.1 += runs - r0.min(*runs);
        }
        sum.into_iter().map(|(n, (t, r))| (n, (r, if r == 0 { f64::NAN } else { t.as_nanos() as f64 / r as f64 }))).collect()
    }
}

/// The verifier's count of processed instructions, per program (the largest over the
/// loaded copies), and the translated size in instructions.
pub fn instruction_counts() -> BTreeMap<&'static str, (u32, u32)> {
    let mut out: BTreeMap<&'static str, (u32, u32)> = BTreeMap::new();
    for (name, info) in ours() {
        let verified = info.verified_instruction_count().unwrap_or(0);
        let size = info.size_translated().unwrap_or(0) / 8;
        let e = out.entry(name).or_default();
        *e = (e.0.max(verified), e.1.max(size));
    }
    out
}

/// A loaded program of the agent, to run on test packets (`BPF_PROG_TEST_RUN`).
pub struct TestProgram {
    name: &'static str,
    prog: SchedClassifier,
}

impl TestProgram {
    /// The loaded program called `name`: there must be one only (another agent's, e.g.
    /// pinned by a bench that was killed, would run on its own maps instead).
    pub fn find(name: &'static str) -> Result<TestProgram, ProgramsError> {
        let mut found: Vec<ProgramInfo> = ours().filter(|(n, _)| *n == name).map(|(_, i)| i).collect();
        if found.len() > 1 {
            return Err(ProgramsError::Program {
                name,
                error: format!("{} copies are loaded: another agent's programs (look for stale pins under /sys/fs/bpf)", found.len()),
            });
        }
        let info = found.pop().ok_or(ProgramsError::Missing(name))?;
        let prog = SchedClassifier::from_program_info(info, Cow::Borrowed(name))
            .map_err(|e| ProgramsError::Program { name, error: e.to_string() })?;
        Ok(TestProgram { name, prog })
    }

    /// The agent's program attached with tcx to `interface` (of the calling thread's
    /// network namespace) at `attach_type`: `Ingress` of a pod's host veth is
    /// `pod_egress`, `Egress` is `pod_ingress`. Unlike `find`, any number of agents may
    /// run beside it.
    pub fn attached(interface: &str, attach_type: TcAttachType) -> Result<TestProgram, ProgramsError> {
        let program = |error: String| ProgramsError::Program { name: "attached", error: format!("{interface}: {error}") };
        let (_, infos) = SchedClassifier::query_tcx(interface, attach_type).map_err(|e| program(e.to_string()))?;
        let (name, info) = infos
            .into_iter()
            .find_map(|info| PROGRAMS.into_iter().find(|n| info.name_as_str() == Some(*n)).map(|n| (n, info)))
            .ok_or_else(|| program("none of the agent's programs is attached".into()))?;
        let prog = SchedClassifier::from_program_info(info, Cow::Borrowed(name))
            .map_err(|e| ProgramsError::Program { name, error: e.to_string() })?;
        Ok(TestProgram { name, prog })
    }

    /// Runs the program `repeat` times on `frame` (an Ethernet frame) as if it had come to
    /// interface `ifindex` (of the calling thread's network namespace): the program's
    /// return value, and the kernel's mean time per run.
    pub fn run(&self, frame: &[u8], ifindex: u32, repeat: u32) -> Result<(i32, Duration), ProgramsError> {
        // `struct __sk_buff` up to and including `ifindex` (offset 40); every field the
        // kernel does not accept from user space stays zero.
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(&ctx), repeat, ..Default::default() };
        let r = self.prog.test_run(opts).map_err(|e| ProgramsError::Program { name: self.name, error: e.to_string() })?;
        Ok((r.return_value as i32, r.duration))
    }
}

/// tc verdicts as the programs return them.
pub const PASS: i32 = -1;
pub const DROP: i32 = 2;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// An Ethernet frame with an IPv4 TCP segment of `flags` (checksums are not the programs'
/// business).
pub fn tcp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let t = &mut f[34..54];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    f
}
