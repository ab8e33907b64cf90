//! Parsing: Ethernet (one VLAN tag), IPv4, IPv6 with a bounded walk of extension headers,
//! then TCP/UDP/SCTP ports or ICMP/ICMPv6. Reads go through `bpf_skb_load_bytes`
//! (`TcContext::load`), which is safe on non-linear packets and needs no verifier-visible
//! bounds arithmetic.

use aya_ebpf::programs::TcContext;
use policy_ebpf::{Addr, CtKey};

use super::cold;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// What the L4 part is, for the verdict.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP, UDP or SCTP: ports are valid.
    Ports,
    /// ICMP/ICMPv6 echo: `sport` = `dport` = identifier (for connection tracking only).
    Echo,
    /// ICMP/ICMPv6 error; `related` is the flow the quoted packet belongs to.
    Error,
    /// IPv6 neighbour discovery and MLD: always passes.
    Neighbor,
    /// Anything else, and non-first fragments: no ports.
    Other,
}

#[repr(C)]
pub struct Packet {
    pub src: Addr,
    pub dst: Addr,
    pub protocol: u8,
    pub l4: L4,
    pub tcp_flags: u8,
    /// Host order.
    pub sport: u16,
    pub dport: u16,
    /// For `L4::Error`: the quoted flow is tracked (looked up while parsing, so the
    /// 40-byte key never sits on the stack beside the packet).
    pub related_tracked: bool,
    /// For `L4::Echo`: the packet is a request (else a reply).
    pub echo_request: bool,
    /// ICMP and ICMPv6: type << 8 | code (for flow events).
    pub icmp: u16,
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// Reads a `T` at `off`: straight from the packet when it is in the linear part (the
/// common case, no helper call), else through `bpf_skb_load_bytes`.
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if core::mem::size_of::<T>() > 1 && off <= 4096 && start + off + core::mem::size_of::<T>() <= end {
        // SAFETY: the range [start + off, start + off + size_of::<T>()) lies within the
        // packet's linear data, as just checked (and as the verifier checks again); `T` is
        // plain bytes, read unaligned.
        return Ok(unsafe { ((start + off) as *const T).read_unaligned() });
    }
    ctx.load::<T>(off).map_err(|_| ())
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// `::ffff:a.b.c.d`, built as two 64-bit words (a byte-wise build compiles to a memset
/// call, which BPF runs as a byte loop).
#[inline(always)]
pub fn mapped_v4(a: [u8; 4]) -> Addr {
    let words = [0u64, u64::from_ne_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]])];
    // SAFETY: `Addr` is 16 bytes with 8-byte alignment; any bit pattern is valid.
    unsafe { core::mem::transmute::<[u64; 2], Addr>(words) }
}

/// A scalar store LLVM may not merge with its neighbours into a `memset` (see
/// `mapped_v4`). Only for scalars: a volatile store of an array is a memset again.
#[inline(always)]
pub fn put<T: Copy>(dst: &mut T, value: T) {
    // SAFETY: `dst` is a valid, aligned, exclusive reference.
    unsafe { core::ptr::write_volatile(dst, value) }
}

/// Writes `value` over `*dst` as 64-bit words. A plain assignment of a struct through a
/// raw pointer (a map value, a ring buffer record) compiles to a call of `memmove`, which
/// BPF runs as a byte loop in a subprogram.
///
/// # Safety
/// `dst` must be valid for writes of a `T`, 8-byte aligned; `T`'s size must be a multiple
/// of 8 (checked at compile time) and every bit pattern of its words valid.
#[inline(always)]
pub unsafe fn put_words<T: Copy>(dst: *mut T, value: &T) {
    const { assert!(core::mem::size_of::<T>() % 8 == 0) };
    let (d, s) = (dst as *mut u64, value as *const T as *const u64);
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        // SAFETY: word `i` of a `T` at each end (the caller's promise for `dst`; `value`
        // is a reference to a `T`, whose size is a multiple of 8), read unaligned.
        unsafe { core::ptr::write_volatile(d.add(i), s.add(i).read_unaligned()) };
        i += 1;
    }
}

/// Zeroes padding bytes one scalar store at a time.
#[inline(always)]
pub fn zero_bytes<const N: usize>(a: &mut [u8; N]) {
    let mut i = 0;
    while i < N {
        put(&mut a[i], 0);
        i += 1;
    }
}

/// Zeroes an address with two 64-bit stores.
#[inline(always)]
pub fn zero_addr(a: &mut Addr) {
    // SAFETY: `Addr` is 16 bytes with 8-byte alignment, so it is two u64s.
    let w = unsafe { &mut *(a as *mut Addr as *mut [u64; 2]) };
    put(&mut w[0], 0);
    put(&mut w[1], 0);
}

/// Parses the packet at `ctx` into `p` (`quoted` is scratch space for an ICMP error's
/// quoted flow). `Ok(false)`: not IP (ARP and the like), which passes. `Err`: truncated
/// or malformed.
#[inline(always)]
pub fn parse(ctx: &TcContext, p: &mut Packet, quoted: &mut CtKey) -> Result<bool, ()> {
    let mut l3 = 14usize;
    let mut ethertype = be16(load(ctx, 12)?);
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        cold();
        ethertype = be16(load(ctx, 16)?);
        l3 = 18;
    }
    put(&mut p.l4, L4::Other);
    put(&mut p.tcp_flags, 0);
    put(&mut p.sport, 0);
    put(&mut p.dport, 0);
    put(&mut p.related_tracked, false);
    put(&mut p.echo_request, false);
    put(&mut p.icmp, 0);
    match ethertype {
        ETH_P_IP => parse_v4(ctx, l3, p, quoted).map(|_| true),
        ETH_P_IPV6 => parse_v6(ctx, l3, p, quoted).map(|_| true),
        _ => {
            cold();
            Ok(false)
        }
    }
}

#[inline(always)]
fn is_tracked(key: &CtKey) -> bool {
    super::ct_entry(key).is_some()
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, l3: usize, p: &mut Packet, quoted: &mut CtKey) -> Result<(), ()> {
    let hdr: [u8; 20] = load(ctx, l3)?;
    if hdr[0] >> 4 != 4 {
        cold();
        return Err(());
    }
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        cold();
        return Err(());
    }
    let frag_off = be16([hdr[6], hdr[7]]) & 0x1fff;
    p.src = mapped_v4([hdr[12], hdr[13], hdr[14], hdr[15]]);
    p.dst = mapped_v4([hdr[16], hdr[17], hdr[18], hdr[19]]);
    p.protocol = hdr[9];
    if frag_off != 0 {
        // A non-first fragment carries no L4 header.
        cold();
        return Ok(());
    }
    parse_l4(ctx, l3 + ihl, p, false, quoted)
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, l3: usize, p: &mut Packet, quoted: &mut CtKey) -> Result<(), ()> {
    let fixed: [u8; 8] = load(ctx, l3)?;
    if fixed[0] >> 4 != 6 {
        cold();
        return Err(());
    }
    p.src = Addr(load(ctx, l3 + 8)?);
    p.dst = Addr(load(ctx, l3 + 24)?);
    p.protocol = fixed[6];
    let mut off = l3 + 40;
    // A bounded walk: hop-by-hop, routing, destination options, fragment, AH.
    for _ in 0..6 {
        match p.protocol {
            0 | 43 | 60 => {
                cold();
                let h: [u8; 2] = load(ctx, off)?;
                p.protocol = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            44 => {
                cold();
                let h: [u8; 4] = load(ctx, off)?;
                p.protocol = h[0];
                off += 8;
                if be16([h[2], h[3]]) >> 3 != 0 {
                    return Ok(());
                }
            }
            51 => {
                cold();
                let h: [u8; 2] = load(ctx, off)?;
                p.protocol = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            _ => break,
        }
    }
    parse_l4(ctx, off, p, true, quoted)
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, l4: usize, p: &mut Packet, v6: bool, quoted: &mut CtKey) -> Result<(), ()> {
    match p.protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            let ports: [u8; 4] = load(ctx, l4)?;
            p.sport = be16([ports[0], ports[1]]);
            p.dport = be16([ports[2], ports[3]]);
            p.l4 = L4::Ports;
            if p.protocol == PROTO_TCP {
                // Two bytes (data offset, flags): a 1-byte direct read compiles to a bounds
                // check the verifier does not accept.
                let b: [u8; 2] = load(ctx, l4 + 12)?;
                p.tcp_flags = b[1];
            }
        }
        PROTO_ICMP if !v6 => {
            cold();
            let h: [u8; 8] = load(ctx, l4)?;
            p.icmp = (h[0] as u16) << 8 | h[1] as u16;
            match h[0] {
                8 | 0 => {
                    p.l4 = L4::Echo;
                    p.echo_request = h[0] == 8;
                    let id = be16([h[4], h[5]]);
                    p.sport = id;
                    p.dport = id;
                }
                3 | 11 | 12 => {
                    p.l4 = L4::Error;
                    p.related_tracked = quoted_v4(ctx, l4 + 8, quoted).unwrap_or(false);
                }
                _ => {}
            }
        }
        PROTO_ICMPV6 if v6 => {
            cold();
            let h: [u8; 8] = load(ctx, l4)?;
            p.icmp = (h[0] as u16) << 8 | h[1] as u16;
            match h[0] {
                128 | 129 => {
                    p.l4 = L4::Echo;
                    p.echo_request = h[0] == 128;
                    let id = be16([h[4], h[5]]);
                    p.sport = id;
                    p.dport = id;
                }
                1..=4 => {
                    p.l4 = L4::Error;
                    p.related_tracked = quoted_v6(ctx, l4 + 8, quoted).unwrap_or(false);
                }
                130..=137 | 143 => p.l4 = L4::Neighbor,
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}

/// Whether the flow of the packet an ICMP error quotes is tracked.
#[inline(always)]
fn quoted_v4(ctx: &TcContext, off: usize, key: &mut CtKey) -> Result<bool, ()> {
    let hdr: [u8; 20] = load(ctx, off)?;
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    let proto = hdr[9];
    let (sport, dport) = quoted_ports(ctx, off + ihl, proto)?;
    let src = mapped_v4([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let dst = mapped_v4([hdr[16], hdr[17], hdr[18], hdr[19]]);
    ct_key(key, &src, sport, &dst, dport, proto);
    Ok(is_tracked(key))
}

#[inline(always)]
fn quoted_v6(ctx: &TcContext, off: usize, key: &mut CtKey) -> Result<bool, ()> {
    let fixed: [u8; 8] = load(ctx, off)?;
    let src = Addr(load(ctx, off + 8)?);
    let dst = Addr(load(ctx, off + 24)?);
    let proto = fixed[6];
    let (sport, dport) = quoted_ports(ctx, off + 40, proto)?;
    ct_key(key, &src, sport, &dst, dport, proto);
    Ok(is_tracked(key))
}

#[inline(always)]
fn quoted_ports(ctx: &TcContext, off: usize, proto: u8) -> Result<(u16, u16), ()> {
    match proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            let ports: [u8; 4] = load(ctx, off)?;
            Ok((be16([ports[0], ports[1]]), be16([ports[2], ports[3]])))
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let h: [u8; 8] = load(ctx, off)?;
            let id = be16([h[4], h[5]]);
            Ok((id, id))
        }
        _ => Err(()),
    }
}

#[inline(always)]
fn words(a: &Addr) -> [u64; 2] {
    // SAFETY: `Addr` is 16 bytes with 8-byte alignment, so it reads as two u64s.
    unsafe { *(a as *const Addr as *const [u64; 2]) }
}

/// Whether end `(a, ap)` sorts before `(b, bp)`: any fixed total order works, as long as
/// both directions of a flow agree (here: the addresses' native 64-bit words).
#[inline(always)]
fn before(a: &Addr, ap: u16, b: &Addr, bp: u16) -> bool {
    let (x, y) = (words(a), words(b));
    if x[0] != y[0] {
        return x[0] < y[0];
    }
    if x[1] != y[1] {
        return x[1] < y[1];
    }
    ap <= bp
}

/// Writes the canonical connection-tracking key of a flow into `key`; returns whether
/// `(src, sport)` is the `lo` end.
#[inline(always)]
pub fn ct_key(key: &mut CtKey, src: &Addr, sport: u16, dst: &Addr, dport: u16, protocol: u8) -> bool {
    let src_is_lo = before(src, sport, dst, dport);
    if src_is_lo {
        key.lo_addr = *src;
        key.hi_addr = *dst;
        key.lo_port = sport;
        key.hi_port = dport;
    } else {
        key.lo_addr = *dst;
        key.hi_addr = *src;
        key.lo_port = dport;
        key.hi_port = sport;
    }
    put(&mut key.protocol, protocol);
    zero_bytes(&mut key._pad);
    src_is_lo
}
