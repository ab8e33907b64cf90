//! Flow events: one `FlowEvent` per new flow a table judged, into the `FLOWS` ring buffer.
//!
//! Called after the verdict, never before: an event can neither delay a packet nor change
//! its verdict. Which events are on (denied ones by default; allowed ones never, one in N
//! or always) and the rate limit are globals the agent sets at load, so the verifier drops
//! the branches that are off (denied-only: the allowed path costs nothing). A per-CPU rate
//! limit (GCRA: one timestamp per CPU, no atomics) bounds the cost of a flood; what it
//! drops, and what a full ring buffer drops, is counted per CPU in `FLOW_STATS`.

use aya_ebpf::Global;
use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use aya_ebpf::macros::map;
use aya_ebpf::maps::{PerCpuArray, RingBuf};
use policy_ebpf::*;

use super::packet::{L4, PROTO_ICMP, PROTO_ICMPV6, Packet, put_words};
use super::verdict::{Judgment, judge_tables};

#[map(name = "PA_FLOWS")]
static FLOWS: RingBuf = RingBuf::pinned(FLOW_RING_BYTES, 0);
#[map(name = "PA_FLOW_STATS")]
static FLOW_STATS: PerCpuArray<FlowStats> = PerCpuArray::pinned(1, 0);

#[unsafe(no_mangle)]
static PA_FLOW_DENIED: Global<u8> = Global::new(1);
#[unsafe(no_mangle)]
static PA_FLOW_ALLOWED_EVERY: Global<u32> = Global::new(0);
/// Default: 1,000 events/s per CPU (the agent sets the node's rate over its CPUs).
#[unsafe(no_mangle)]
static PA_FLOW_COST_NS: Global<u64> = Global::new(1_000_000);
#[unsafe(no_mangle)]
static PA_FLOW_BURST_NS: Global<u64> = Global::new(100_000_000);

/// Reports the judgment `j` of `p`'s new flow by endpoint `ep` (its `direction`), on
/// interface `ifindex`, if that kind of event is on and the rate limit allows. `remote`
/// and `port` are what `j` looked up: a flow `j` allows is looked up in the endpoint's
/// audit table too when it has one (`ENDPOINT_AUDIT_*`), and reported as
/// `FLOW_VERDICT_AUDIT` if that table denies it (with denied events: `PA_FLOW_DENIED`).
#[inline(always)]
pub fn emit(p: &Packet, ep: &EndpointValue, ifindex: u32, direction: u32, j: &Judgment, remote: &Addr, port: u16, node_stack: bool) {
    if j.allowed {
        let audit = if direction == DIRECTION_INGRESS { ENDPOINT_AUDIT_INGRESS } else { ENDPOINT_AUDIT_EGRESS };
        if ep.flags & audit != 0 {
            let a = judge_tables(ep, direction | DIRECTION_AUDIT, remote, p.protocol, port, p.l4 == L4::Ports, node_stack);
            if !a.allowed {
                if PA_FLOW_DENIED.load() != 0 {
                    write(p, ep, ifindex, direction, FLOW_VERDICT_AUDIT, &a, remote);
                }
                return;
            }
        }
        let every = PA_FLOW_ALLOWED_EVERY.load();
        if every == 0 {
            return;
        }
        // SAFETY: a helper without arguments.
        if every > 1 && unsafe { bpf_get_prandom_u32() } % every != 0 {
            return;
        }
        write(p, ep, ifindex, direction, FLOW_VERDICT_ALLOWED, j, remote);
    } else if PA_FLOW_DENIED.load() != 0 {
        write(p, ep, ifindex, direction, FLOW_VERDICT_DENIED, j, remote);
    }
}

/// Writes one event, within the CPU's rate limit.
#[inline(always)]
fn write(p: &Packet, ep: &EndpointValue, ifindex: u32, direction: u32, verdict: u8, j: &Judgment, remote: &Addr) {
    let Some(stats) = FLOW_STATS.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's slot: no other CPU writes it, and programs do not nest on a CPU.
    let stats = unsafe { &mut *stats };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // GCRA: an event is due every `cost` ns; up to `burst` ns of them may be taken early.
    let tat = if stats.tat_ns > now { stats.tat_ns } else { now };
    if tat - now > PA_FLOW_BURST_NS.load() {
        stats.suppressed += 1;
        return;
    }
    stats.tat_ns = tat + PA_FLOW_COST_NS.load();
    let Some(mut entry) = FLOWS.reserve::<FlowEvent>(0) else {
        stats.ring_full += 1;
        return;
    };
    let e = entry.as_mut_ptr();
    let (sport, dport) = if p.protocol == PROTO_ICMP || p.protocol == PROTO_ICMPV6 {
        (p.icmp, if p.l4 == L4::Echo { p.dport } else { 0 })
    } else {
        (p.sport, p.dport)
    };
    // SAFETY: `e` points to the ring buffer record just reserved, sized and aligned for a
    // `FlowEvent` (8-byte aligned by the kernel); every field is written before the
    // record is submitted, and nothing else sees it before then.
    unsafe {
        (*e).time_ns = now;
        // An ingress judgment by a client other than either address (one the node
        // translated: `CT_CLIENT_IN_NAT`) reports that client as the source.
        let src = if direction == DIRECTION_INGRESS && !super::same_addr(remote, &p.src) && !super::same_addr(remote, &p.dst) {
            remote
        } else {
            &p.src
        };
        // As words: an `Addr` assignment into the record compiles to a `memmove` call.
        put_words(&raw mut (*e).src, src);
        put_words(&raw mut (*e).dst, &p.dst);
        (*e).endpoint = ep.id;
        (*e).revision = ep.revision;
        (*e).ifindex = ifindex;
        (*e).port_set = j.port_set;
        (*e).sport = sport;
        (*e).dport = dport;
        (*e).protocol = p.protocol;
        (*e).direction = direction as u8;
        (*e).verdict = verdict;
        (*e).decided = j.decided;
    }
    entry.submit(0);
    stats.emitted += 1;
}
