//! The kernel programs: tc classifiers on pods' host-side veths and on the node's other
//! devices. Built for bpfel-unknown-none by the agent's build script (feature `ebpf`).
#![no_std]
#![no_main]

mod kernel;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program with a reachable panic path, so this never runs.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
