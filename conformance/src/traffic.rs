//! Real traffic: servers that answer TCP, UDP and SCTP (raw protocol-132 packets: there
//! is no SCTP kernel module, and nothing here may load one), and clients that probe them
//! the way `agnhost connect` does (UDP and SCTP need the server's reply).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use policy_model::Protocol;
use socket2::{Domain, Protocol as SockProtocol, SockAddr, Socket, Type};

use crate::netns::{Netns, NetnsError, NetnsHandle};

const IPPROTO_SCTP: i32 = 132;
const POLL: Duration = Duration::from_millis(20);

/// Servers running in a pod; stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn dual_stack(domain_type: Type, protocol: Option<SockProtocol>, port: u16) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, domain_type, protocol)?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SockAddr::from(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)))?;
    Ok(s)
}

/// Starts TCP, UDP and SCTP servers on `ports` in `ns` (both families).
pub fn serve(ns: &Netns, ports: &[u16]) -> Result<Servers, NetnsError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for &port in ports {
        let st = stop.clone();
        handles.push(ns.spawn(move || tcp_server(port, st))?);
        let st = stop.clone();
        handles.push(ns.spawn(move || udp_server(port, st))?);
    }
    for v6 in [false, true] {
        let st = stop.clone();
        let ports = ports.to_vec();
        handles.push(ns.spawn(move || sctp_server(v6, ports, st))?);
    }
    // Wait until the sockets exist.
    std::thread::sleep(Duration::from_millis(50));
    Ok(Servers { stop, handles })
}

fn tcp_server(port: u16, stop: Arc<AtomicBool>) {
    let s = dual_stack(Type::STREAM, None, port).expect("tcp bind");
    s.listen(128).expect("listen");
    let l: TcpListener = s.into();
    l.set_nonblocking(true).expect("nonblocking");
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            // Each connection on its own thread: one whose close a policy change dropped
            // would otherwise hold the loop for the read timeout while the accept queue
            // fills and new connections time out.
            Ok((mut c, _)) => {
                // A byte back for every byte read, until the client closes (a probe
                // after one) or goes quiet (a connection a case keeps across steps, or one
                // a policy cut).
                std::thread::spawn(move || {
                    let _ = c.set_nonblocking(false);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut b = [0u8; 1];
                    while let Ok(1) = c.read(&mut b) {
                        if c.write_all(b"k").is_err() {
                            break;
                        }
                    }
                });
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn udp_server(port: u16, stop: Arc<AtomicBool>) {
    let s: UdpSocket = dual_stack(Type::DGRAM, None, port).expect("udp bind").into();
    s.set_read_timeout(Some(POLL * 5)).expect("timeout");
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(b"pod\n", from);
        }
    }
}

/// An SCTP packet: common header and one chunk (INIT or INIT ACK), CRC32c filled in.
pub fn sctp_packet(sport: u16, dport: u16, chunk_type: u8, tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(if chunk_type == 1 { 0 } else { tag }).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&[chunk_type, 0, 0, 20]);
    p.extend_from_slice(&tag.to_be_bytes()); // initiate tag
    p.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&tag.to_be_bytes()); // initial TSN
    let crc = crc32c::crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

fn raw_sctp(v6: bool) -> std::io::Result<Socket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    Socket::new(domain, Type::RAW, Some(SockProtocol::from(IPPROTO_SCTP)))
}

/// The SCTP part of a received raw packet (IPv4 raw sockets include the IP header).
fn sctp_payload(buf: &[u8], v6: bool) -> Option<&[u8]> {
    let off = if v6 { 0 } else { ((*buf.first()? & 0x0f) as usize) * 4 };
    let p = buf.get(off..)?;
    (p.len() >= 12).then_some(p)
}

fn recv_raw(s: &Socket, buf: &mut [u8]) -> std::io::Result<(usize, SockAddr)> {
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and `recv_from` only writes
    // initialised bytes into the buffer.
    let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
    s.recv_from(uninit)
}

fn sctp_server(v6: bool, ports: Vec<u16>, stop: Arc<AtomicBool>) {
    let s = raw_sctp(v6).expect("raw SCTP socket");
    s.set_read_timeout(Some(POLL * 5)).expect("timeout");
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = recv_raw(&s, &mut buf) else {
            continue;
        };
        let Some(p) = sctp_payload(&buf[..n], v6) else {
            continue;
        };
        let (sport, dport) = (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]));
        if p.get(12) != Some(&1) || !ports.contains(&dport) {
            continue; // only answer INITs to our ports
        }
        let tag = u32::from_be_bytes([p[16], p[17], p[18], p[19]]);
        let _ = s.send_to(&sctp_packet(dport, sport, 2, tag), &from);
    }
}

/// One probe from `ns` to `dst`: connected (true) or not within `timeout`.
pub fn probe(ns: &Netns, protocol: Protocol, dst: SocketAddr, timeout: Duration) -> Result<bool, NetnsError> {
    probe_in(&ns.handle(), protocol, dst, timeout)
}

/// [`probe`] through a handle (for threads that do not own the namespace).
pub fn probe_in(ns: &NetnsHandle, protocol: Protocol, dst: SocketAddr, timeout: Duration) -> Result<bool, NetnsError> {
    ns.run(move || match protocol {
        Protocol::Tcp => probe_tcp(None, dst, timeout),
        Protocol::Udp => probe_udp(dst, timeout),
        Protocol::Sctp => probe_sctp(dst, timeout),
    })
}

/// How a probe ended: the upstream ClusterNetworkPolicy suite accepts only a drop (the
/// client times out) as "blocked"; a refusal (RST, ICMP unreachable) fails it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeEnd {
    Connected,
    /// Nothing came back within the timeout.
    Dropped,
    /// The network or the server said no (RST, ICMP port/host unreachable).
    Refused,
}

/// [`probe_in`], telling a drop from a refusal. SCTP is probed with raw packets that see
/// no refusal (the kernel has no SCTP stack to answer ABORT), so it reports drops only.
pub fn probe_end_in(ns: &NetnsHandle, protocol: Protocol, dst: SocketAddr, timeout: Duration) -> Result<ProbeEnd, NetnsError> {
    use std::io::ErrorKind;
    let refused = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset | ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable
        )
    };
    ns.run(move || match protocol {
        Protocol::Tcp => match TcpStream::connect_timeout(&dst, timeout) {
            Err(e) if refused(&e) => ProbeEnd::Refused,
            Err(_) => ProbeEnd::Dropped,
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(timeout));
                let mut b = [0u8; 1];
                match s.write_all(b"h").and_then(|_| s.read(&mut b)) {
                    Ok(1) => ProbeEnd::Connected,
                    Err(e) if refused(&e) => ProbeEnd::Refused,
                    _ => ProbeEnd::Dropped,
                }
            }
        },
        Protocol::Udp => {
            let bind: SocketAddr = if dst.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
            let Ok(s) = UdpSocket::bind(bind) else { return ProbeEnd::Dropped };
            let _ = s.set_read_timeout(Some(timeout));
            // A connected socket: an ICMP port unreachable comes back as ECONNREFUSED.
            if s.connect(dst).and_then(|_| s.send(b"hostname\n")).is_err() {
                return ProbeEnd::Refused;
            }
            let mut buf = [0u8; 64];
            match s.recv(&mut buf) {
                Ok(n) if n > 0 => ProbeEnd::Connected,
                Err(e) if refused(&e) => ProbeEnd::Refused,
                _ => ProbeEnd::Dropped,
            }
        }
        Protocol::Sctp => {
            if probe_sctp(dst, timeout) {
                ProbeEnd::Connected
            } else {
                ProbeEnd::Dropped
            }
        }
    })
}

/// A TCP probe from a chosen source address (which must be on an interface of `ns`).
pub fn probe_tcp_from(ns: &Netns, src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<bool, NetnsError> {
    ns.run(move || probe_tcp(Some(src), dst, timeout))
}

/// [`probe_tcp_from`] through a handle (for threads that do not own the namespace).
pub fn probe_tcp_from_in(ns: &NetnsHandle, src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<bool, NetnsError> {
    ns.run(move || probe_tcp(Some(src), dst, timeout))
}

fn probe_tcp(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> bool {
    let connected = match src {
        None => TcpStream::connect_timeout(&dst, timeout),
        Some(src) => (|| {
            let s = Socket::new(if dst.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 }, Type::STREAM, None)?;
            s.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
            s.connect_timeout(&SockAddr::from(dst), timeout)?;
            Ok::<TcpStream, std::io::Error>(s.into())
        })(),
    };
    let Ok(mut s) = connected else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let mut b = [0u8; 1];
    s.write_all(b"h").is_ok() && matches!(s.read(&mut b), Ok(1))
}

fn probe_udp(dst: SocketAddr, timeout: Duration) -> bool {
    let bind: SocketAddr = if dst.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let Ok(s) = UdpSocket::bind(bind) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    if s.send_to(b"hostname\n", dst).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.recv_from(&mut buf), Ok((n, from)) if n > 0 && from == dst)
}

fn probe_sctp(dst: SocketAddr, timeout: Duration) -> bool {
    let v6 = dst.is_ipv6();
    let Ok(s) = raw_sctp(v6) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let sport = 20_000 + (std::process::id() as u16 % 10_000) + (Instant::now().elapsed().subsec_nanos() % 1000) as u16;
    let tag = 0x5c7b_0000 | sport as u32;
    let to = SockAddr::from(SocketAddr::new(dst.ip(), 0));
    if s.send_to(&sctp_packet(sport, dst.port(), 1, tag), &to).is_err() {
        return false;
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let Ok((n, from)) = recv_raw(&s, &mut buf) else {
            continue;
        };
        if from.as_socket().map(|a| a.ip()) != Some(dst.ip()) {
            continue;
        }
        if let Some(p) = sctp_payload(&buf[..n], v6) {
            let (ps, pd) = (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]));
            if ps == dst.port() && pd == sport && p.get(12) == Some(&2) {
                return true;
            }
        }
    }
    false
}

/// Servers for load: `threads` blocking accept/recv loops on `port` (TCP: 1-byte
/// exchange, close; UDP: echo), stopped on drop.
pub fn serve_load(ns: &Netns, port: u16, threads: usize) -> Result<Servers, NetnsError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    ns.run(move || {
        let tcp = dual_stack(Type::STREAM, None, port).expect("tcp bind");
        tcp.listen(1024).expect("listen");
        tcp.set_read_timeout(Some(POLL * 5)).expect("timeout");
        let udp = dual_stack(Type::DGRAM, None, port).expect("udp bind");
        udp.set_read_timeout(Some(POLL * 5)).expect("timeout");
        tx.send((tcp, udp)).expect("send sockets");
    })?;
    let (tcp, udp) = rx.recv().expect("sockets");
    let tcp: TcpListener = tcp.into();
    let udp: UdpSocket = udp.into();
    let mut handles = Vec::new();
    for _ in 0..threads {
        let (l, st) = (tcp.try_clone().expect("clone"), stop.clone());
        handles.push(std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                if let Ok((mut c, _)) = l.accept() {
                    let mut b = [0u8; 1];
                    if c.read(&mut b).is_ok() {
                        let _ = c.write_all(&b);
                    }
                }
            }
        }));
        let (u, st) = (udp.try_clone().expect("clone"), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, from)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(&buf[..n], from);
                }
            }
        }));
    }
    Ok(Servers { stop, handles })
}

/// A TCP sink for bulk transfers on `port`: every connection gets one byte (so
/// [`probe`] sees a working server), then is read until the peer closes. Stopped on drop.
pub fn serve_sink(ns: &Netns, port: u16) -> Result<Servers, NetnsError> {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let handle = ns.spawn(move || {
        let l: TcpListener = dual_stack(Type::STREAM, None, port).and_then(|s| s.listen(128).map(|_| s)).expect("tcp sink").into();
        l.set_nonblocking(true).expect("nonblocking");
        let mut readers = Vec::new();
        while !st.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut c, _)) => {
                    let st = st.clone();
                    readers.push(std::thread::spawn(move || {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(POLL * 5));
                        if c.write_all(b"k").is_err() {
                            return;
                        }
                        let mut buf = vec![0u8; 256 * 1024];
                        loop {
                            match c.read(&mut buf) {
                                Ok(0) => return,
                                Ok(_) => {}
                                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                                    if st.load(Ordering::Relaxed) {
                                        return;
                                    }
                                }
                                Err(_) => return,
                            }
                        }
                    }));
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
        for r in readers {
            let _ = r.join();
        }
    })?;
    std::thread::sleep(Duration::from_millis(50));
    Ok(Servers { stop, handles: vec![handle] })
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP/ICMPv6 echo from `ns` to `dst`: true if the reply comes back within `timeout`.
pub fn ping(ns: &NetnsHandle, dst: IpAddr, timeout: Duration) -> Result<bool, NetnsError> {
    ns.run(move || {
        let v6 = dst.is_ipv6();
        let (domain, proto, req, rep) = if v6 { (Domain::IPV6, 58, 128u8, 129u8) } else { (Domain::IPV4, 1, 8u8, 0u8) };
        let Ok(s) = Socket::new(domain, Type::RAW, Some(SockProtocol::from(proto))) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
        let id = (std::process::id() as u16) ^ 0x5a5a;
        let mut pkt = vec![req, 0, 0, 0, (id >> 8) as u8, id as u8, 0, 1, b'p', b'a'];
        if !v6 {
            let c = inet_checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
        }
        if s.send_to(&pkt, &SockAddr::from(SocketAddr::new(dst, 0))).is_err() {
            return false;
        }
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            let Ok((n, from)) = recv_raw(&s, &mut buf) else { continue };
            if from.as_socket().map(|a| a.ip()) != Some(dst) {
                continue;
            }
            let off = if v6 { 0 } else { ((buf[0] & 0x0f) as usize) * 4 };
            if n >= off + 8 && buf[off] == rep && u16::from_be_bytes([buf[off + 4], buf[off + 5]]) == id {
                return true;
            }
        }
        false
    })
}

/// What a UDP datagram to `dst` gets back: a reply, a refusal (an ICMP port-unreachable
/// error came back), or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpOutcome {
    Reply,
    Refused,
    Silence,
}

pub fn udp_outcome(ns: &NetnsHandle, dst: SocketAddr, timeout: Duration) -> Result<UdpOutcome, NetnsError> {
    ns.run(move || {
        let bind: SocketAddr = if dst.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
        let Ok(s) = UdpSocket::bind(bind) else { return UdpOutcome::Silence };
        let _ = s.set_read_timeout(Some(timeout));
        // Connected, so an ICMP error is reported to this socket.
        if s.connect(dst).is_err() || s.send(b"hostname\n").is_err() {
            return UdpOutcome::Silence;
        }
        let mut buf = [0u8; 64];
        match s.recv(&mut buf) {
            Ok(_) => UdpOutcome::Reply,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => UdpOutcome::Refused,
            Err(_) => UdpOutcome::Silence,
        }
    })
}

/// A TCP connection to `dst` that completes the 1-byte exchange, then ends with a reset
/// (linger 0) instead of a FIN. Returns the local port.
pub fn tcp_exchange_then_reset(ns: &NetnsHandle, dst: SocketAddr, timeout: Duration) -> Result<Option<u16>, NetnsError> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&dst, timeout).ok()?;
        let _ = s.set_read_timeout(Some(timeout));
        let mut b = [0u8; 1];
        if s.write_all(b"h").is_err() || !matches!(s.read(&mut b), Ok(1)) {
            return None;
        }
        let port = s.local_addr().ok()?.port();
        let sock = Socket::from(s);
        let _ = sock.set_linger(Some(Duration::ZERO));
        drop(sock);
        Some(port)
    })
}
