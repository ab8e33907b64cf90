//! The common packet, on a short path of its own: a TCP or UDP packet over IPv4 (no
//! options, not a fragment) or IPv6 (no extension headers), whose headers are in the
//! linear data, on an interface whose pod `IFACES` knows, and which the full path would
//! pass without a lookup: a TCP packet of an endpoint that nothing isolates (`untracked`),
//! or a packet of a flow this CPU confirmed in the current tick (`cached`).
//!
//! Why apart: on real traffic the kernel's own code evicts ours between two packets, so a
//! run costs about one cache miss per line of code it runs through. The full path, with
//! its fallbacks (`bpf_skb_load_bytes` for non-linear data, VLAN tags, extension headers,
//! ICMP) between the common instructions, spreads an established packet over some 60
//! lines; this path reads only the bytes it needs, straight from the packet, and is laid
//! out first and alone. Anything else it leaves to the full path, which starts over, so
//! what a packet is answered does not depend on which path answered it: this one only
//! ever passes a packet the full path would pass, with the same count.

use aya_ebpf::programs::TcContext;
use policy_ebpf::*;

use super::packet::{L4, PROTO_TCP, PROTO_UDP, Packet, TCP_FIN, TCP_RST, TCP_SYN, ct_key, mapped_v4, put};
use super::verdict::count;
use super::{IFACES, NEEDS_TRACKING, Scratch, cached, same_addr, slot_index, tick};

const ETH_LEN: usize = 14;
/// IPv4 without options: the 20-byte header, then the ports.
const V4_PORTS: usize = ETH_LEN + 20;
/// IPv6 without extension headers: the 40-byte header, then the ports.
const V6_PORTS: usize = ETH_LEN + 40;
/// The TCP flags byte, from the start of the TCP header.
const TCP_FLAGS: usize = 13;

/// The fields of the packet that the common case reads.
struct Headers {
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
    protocol: u8,
    /// 0 for UDP.
    tcp_flags: u8,
}

/// What [`probe`] found.
pub(super) enum Probe {
    /// The packet passes, and is counted: the full path would answer the same.
    Passed,
    /// A TCP or UDP packet of the pod (from it at its egress hook, to it at its ingress
    /// hook), parsed into `Scratch::packet`, that neither `untracked` nor `cached` passes:
    /// the full path goes on from its connection tracking, for this endpoint.
    Judge(EndpointValue),
    /// Any other packet: the full path parses it from the start.
    Other,
}

/// The common path, at the hook of the pod whose host veth is `ifindex`: its egress
/// (`pod_egress`, the pod sent the packet) or its ingress (`pod_ingress`). Changes
/// nothing but `s.key` and, for `Judge`, `s.packet`, which the full path writes afresh
/// anyway.
#[inline(always)]
pub(super) fn probe(ctx: &TcContext, s: &mut Scratch, egress: bool, ifindex: u32) -> Probe {
    let Some(h) = headers(ctx) else { return Probe::Other };
    let Some(v) = IFACES.get(ifindex) else { return Probe::Other };
    if v.ifindex != ifindex || ifindex == 0 || v.flags & ENDPOINT_FAIL_CLOSED != 0 {
        return Probe::Other;
    }
    // The pod's own address: its source (anti-spoofing) or its destination; anything else
    // is for the full path to drop or pass.
    let addr = if egress { &h.src } else { &h.dst };
    let ours = (v.flags & IFACE_HAS_V4 != 0 && same_addr(addr, &v.v4)) || (v.flags & IFACE_HAS_V6 != 0 && same_addr(addr, &v.v6));
    if !ours {
        return Probe::Other;
    }
    let ep = EndpointValue { id: v.id, revision: v.revision, ifindex, flags: v.flags & 0xffff };
    let direction = if egress { DIRECTION_EGRESS } else { DIRECTION_INGRESS };
    // `untracked`: nothing isolates the endpoint, and the TCP packet neither opens nor
    // closes its flow.
    if ep.flags & NEEDS_TRACKING == 0 && h.protocol == PROTO_TCP && h.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        count(&ep, direction, true, ctx.len());
        return Probe::Passed;
    }
    let src_is_lo = ct_key(&mut s.key, &h.src, h.sport, &h.dst, h.dport, h.protocol);
    let slot = &s.flows[slot_index(&s.key)];
    if cached(slot, &s.key, h.tcp_flags, &ep, egress, src_is_lo, tick()) {
        count(&ep, direction, true, ctx.len());
        return Probe::Passed;
    }
    fill(&mut s.packet, &h);
    Probe::Judge(ep)
}

/// Writes `h` into `p` as `packet::parse` would have.
#[inline(always)]
fn fill(p: &mut Packet, h: &Headers) {
    p.src = h.src;
    p.dst = h.dst;
    put(&mut p.protocol, h.protocol);
    put(&mut p.l4, L4::Ports);
    put(&mut p.tcp_flags, h.tcp_flags);
    put(&mut p.sport, h.sport);
    put(&mut p.dport, h.dport);
    put(&mut p.related_tracked, false);
    put(&mut p.echo_request, false);
    put(&mut p.icmp, 0);
}

/// The headers of a TCP or UDP packet of the common shape (see the module), read from the
/// linear data; `None` for any other packet.
#[inline(always)]
fn headers(ctx: &TcContext) -> Option<Headers> {
    let start = ctx.data();
    let end = ctx.data_end();
    // The shortest packet of interest: IPv4 and the two ports.
    if start + V4_PORTS + 4 > end {
        return None;
    }
    let b = |off: usize| -> u8 {
        // SAFETY: every offset read is below a length just checked against `data_end` (the
        // verifier checks it again); a byte has no alignment.
        unsafe { *((start + off) as *const u8) }
    };
    let ethertype = (b(12), b(13));
    let (src, dst, protocol, ports) = if ethertype == (0x08, 0x00) {
        // Version 4, header length 5 words (no options); no fragment offset (a first
        // fragment, or none, carries the ports).
        if b(ETH_LEN) != 0x45 || b(ETH_LEN + 6) & 0x1f != 0 || b(ETH_LEN + 7) != 0 {
            return None;
        }
        let src = mapped_v4([b(ETH_LEN + 12), b(ETH_LEN + 13), b(ETH_LEN + 14), b(ETH_LEN + 15)]);
        let dst = mapped_v4([b(ETH_LEN + 16), b(ETH_LEN + 17), b(ETH_LEN + 18), b(ETH_LEN + 19)]);
        (src, dst, b(ETH_LEN + 9), V4_PORTS)
    } else if ethertype == (0x86, 0xdd) {
        // Version 6; the next header must be the transport's (no extension headers).
        if start + V6_PORTS + 4 > end || b(ETH_LEN) >> 4 != 6 {
            return None;
        }
        (v6_addr(ctx, ETH_LEN + 8)?, v6_addr(ctx, ETH_LEN + 24)?, b(ETH_LEN + 6), V6_PORTS)
    } else {
        return None;
    };
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return None;
    }
    let sport = u16::from_be_bytes([b(ports), b(ports + 1)]);
    let dport = u16::from_be_bytes([b(ports + 2), b(ports + 3)]);
    let mut tcp_flags = 0;
    if protocol == PROTO_TCP {
        if start + ports + TCP_FLAGS + 1 > end {
            return None;
        }
        tcp_flags = b(ports + TCP_FLAGS);
    }
    Some(Headers { src, dst, sport, dport, protocol, tcp_flags })
}

/// The IPv6 address at `off` of the linear data, as two 64-bit words.
#[inline(always)]
fn v6_addr(ctx: &TcContext, off: usize) -> Option<Addr> {
    let start = ctx.data();
    if start + off + 16 > ctx.data_end() {
        return None;
    }
    let word = |at: usize| -> u64 {
        // SAFETY: within the 16 bytes just checked against `data_end`; read bytewise
        // (unaligned).
        let b = unsafe { ((start + off + at) as *const [u8; 8]).read_unaligned() };
        u64::from_ne_bytes(b)
    };
    let words = [word(0), word(8)];
    // SAFETY: `Addr` is 16 bytes with 8-byte alignment; any bit pattern is valid.
    Some(unsafe { core::mem::transmute::<[u64; 2], Addr>(words) })
}
