//! Protocols and port sets.
//!
//! A [`PortSet`] is canonical (sorted, merged ranges), so two sets that allow the same
//! traffic compare equal: the compiler relies on that to deduplicate and to prune
//! redundant LPM entries.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// The protocols a NetworkPolicy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// IANA protocol number, as in the IP header.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    fn index(self) -> usize {
        match self {
            Protocol::Tcp => 0,
            Protocol::Udp => 1,
            Protocol::Sctp => 2,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    /// Exact, case-sensitive names, as the API server accepts them.
    fn from_str(s: &str) -> Result<Protocol, String> {
        match s {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(format!("unsupported protocol {s:?}: supported values: \"TCP\", \"UDP\", \"SCTP\"")),
        }
    }
}

/// The IP protocol of a flow: any IANA number, with names for the common ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpProtocol(pub u8);

impl IpProtocol {
    pub const ICMP: IpProtocol = IpProtocol(1);
    pub const TCP: IpProtocol = IpProtocol(6);
    pub const UDP: IpProtocol = IpProtocol(17);
    pub const ICMPV6: IpProtocol = IpProtocol(58);
    pub const SCTP: IpProtocol = IpProtocol(132);

    /// The NetworkPolicy protocol this is, if ports apply to it.
    pub fn policy_protocol(self) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == self.0)
    }

    /// Whether the flow carries ports (only then does a policy port match it).
    pub fn has_ports(self) -> bool {
        self.policy_protocol().is_some()
    }
}

impl From<Protocol> for IpProtocol {
    fn from(p: Protocol) -> IpProtocol {
        IpProtocol(p.number())
    }
}

impl fmt::Display for IpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            1 => f.write_str("ICMP"),
            58 => f.write_str("ICMPv6"),
            n => match self.policy_protocol() {
                Some(p) => f.write_str(p.as_str()),
                None => write!(f, "proto-{n}"),
            },
        }
    }
}

impl FromStr for IpProtocol {
    type Err = String;
    /// Case-insensitive names (TCP, udp, SCTP, ICMP, ICMPv6) or a number.
    fn from_str(s: &str) -> Result<IpProtocol, String> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(IpProtocol::TCP),
            "UDP" => Ok(IpProtocol::UDP),
            "SCTP" => Ok(IpProtocol::SCTP),
            "ICMP" => Ok(IpProtocol::ICMP),
            "ICMPV6" => Ok(IpProtocol::ICMPV6),
            other => other.parse::<u8>().map(IpProtocol).map_err(|_| format!("unknown protocol {s:?}")),
        }
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange { start: 0, end: u16::MAX };

    pub fn single(port: u16) -> PortRange {
        PortRange { start: port, end: port }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }

    /// The fewest `(port, prefix length)` pairs whose union is exactly this range, for a
    /// port-keyed LPM trie (a prefix of length L covers `2^(16-L)` ports). At most 30.
    pub fn to_prefixes(&self) -> Vec<(u16, u8)> {
        let mut out = Vec::new();
        let mut start = self.start as u32;
        let end = self.end as u32;
        while start <= end {
            // The largest aligned block that starts at `start` and stays within `end`.
            let mut size = if start == 0 { 1u32 << 16 } else { 1u32 << start.trailing_zeros().min(16) };
            while start + size - 1 > end {
                size >>= 1;
            }
            out.push((start as u16, 16 - size.trailing_zeros() as u8));
            start += size;
        }
        out
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == PortRange::ALL {
            f.write_str("any port")
        } else if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// What a table entry allows: every protocol (ICMP too), or per-protocol port ranges,
/// plus (only ClusterNetworkPolicy tiers produce it) the protocols without ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSet {
    all: bool,
    ranges: [Vec<PortRange>; 3],
    /// Protocols without ports (ICMP, ...), when not `all`. NetworkPolicy never allows them
    /// alone; a tiered decision does, e.g. "Deny TCP 80, default-allow the rest". Invariant:
    /// false when `all`, and `all` replaces "other + every port of the three".
    other: bool,
}

impl PortSet {
    /// Nothing: an entry with this set denies.
    pub fn empty() -> PortSet {
        PortSet::default()
    }

    /// Every protocol and port, as a rule with no `ports` allows.
    pub fn all() -> PortSet {
        PortSet { all: true, ranges: Default::default(), other: false }
    }

    /// Only the protocols without ports (ICMP, ICMPv6, ...).
    pub fn other_protocols() -> PortSet {
        PortSet { all: false, ranges: Default::default(), other: true }
    }

    /// Whether protocols without ports (ICMP, ...) pass. The datapath must honour this
    /// when it is true without `is_all` (only tables shaped by ClusterNetworkPolicy).
    pub fn allows_other_protocols(&self) -> bool {
        self.all || self.other
    }

    pub fn protocol(protocol: Protocol) -> PortSet {
        PortSet::range(protocol, PortRange::ALL)
    }

    pub fn range(protocol: Protocol, range: PortRange) -> PortSet {
        let mut s = PortSet::empty();
        s.insert(protocol, range);
        s
    }

    pub fn is_all(&self) -> bool {
        self.all
    }

    pub fn is_empty(&self) -> bool {
        !self.all && !self.other && self.ranges.iter().all(Vec::is_empty)
    }

    /// Canonical ranges of one protocol (empty when `is_all`).
    pub fn ranges(&self, protocol: Protocol) -> &[PortRange] {
        &self.ranges[protocol.index()]
    }

    pub fn insert(&mut self, protocol: Protocol, range: PortRange) {
        if self.all {
            return;
        }
        let v = &mut self.ranges[protocol.index()];
        // The ranges are sorted, disjoint and not adjacent: merge `range` with those it
        // touches (from the first whose end reaches `range.start - 1`), in place.
        let first = v.partition_point(|r| (r.end as u32) + 1 < range.start as u32);
        let mut last = first;
        let mut merged = range;
        while last < v.len() && v[last].start as u32 <= merged.end as u32 + 1 {
            merged.start = merged.start.min(v[last].start);
            merged.end = merged.end.max(v[last].end);
            last += 1;
        }
        v.splice(first..last, [merged]);
        self.normalize();
    }

    /// Restores the canonical form: everything is spelled `all`.
    fn normalize(&mut self) {
        if !self.all && self.other && self.ranges.iter().all(|r| r.as_slice() == [PortRange::ALL]) {
            *self = PortSet::all();
        }
    }

    /// The ranges of one protocol, with `all` spelled out.
    fn spelled(&self, p: Protocol) -> &[PortRange] {
        if self.all { std::slice::from_ref(&PortRange::ALL) } else { self.ranges(p) }
    }

    /// The traffic both sets allow.
    pub fn intersect(&self, other: &PortSet) -> PortSet {
        if self.all {
            return other.clone();
        }
        if other.all {
            return self.clone();
        }
        let mut out = PortSet { other: self.other && other.other, ..PortSet::default() };
        for p in Protocol::ALL {
            let (a, b) = (self.ranges(p), other.ranges(p));
            let (mut i, mut j) = (0, 0);
            let v = &mut out.ranges[p.index()];
            while i < a.len() && j < b.len() {
                let (start, end) = (a[i].start.max(b[j].start), a[i].end.min(b[j].end));
                if start <= end {
                    v.push(PortRange { start, end });
                }
                if a[i].end < b[j].end { i += 1 } else { j += 1 }
            }
        }
        out
    }

    /// The traffic `self` allows and `other` does not.
    pub fn subtract(&self, other: &PortSet) -> PortSet {
        if other.all {
            return PortSet::empty();
        }
        let mut out = PortSet { other: self.allows_other_protocols() && !other.other, ..PortSet::default() };
        for p in Protocol::ALL {
            let b = other.ranges(p);
            let v = &mut out.ranges[p.index()];
            for r in self.spelled(p) {
                // Walk the holes `b` cuts in `r` (both sorted).
                let mut start = r.start as u32;
                for h in b.iter().filter(|h| h.end >= r.start && h.start <= r.end) {
                    if (h.start as u32) > start {
                        v.push(PortRange { start: start as u16, end: h.start - 1 });
                    }
                    start = h.end as u32 + 1;
                }
                if start <= r.end as u32 {
                    v.push(PortRange { start: start as u16, end: r.end });
                }
            }
        }
        out.normalize();
        out
    }

    pub fn union_with(&mut self, other: &PortSet) {
        if other.all {
            *self = PortSet::all();
            return;
        }
        if self.all {
            return;
        }
        for p in Protocol::ALL {
            let (a, b) = (&self.ranges[p.index()], other.ranges(p));
            if b.is_empty() {
                continue;
            }
            // Both sorted: one merge pass.
            let mut out: Vec<PortRange> = Vec::with_capacity(a.len() + b.len());
            let (mut i, mut j) = (0, 0);
            while i < a.len() || j < b.len() {
                let next = if j >= b.len() || (i < a.len() && a[i].start <= b[j].start) {
                    i += 1;
                    a[i - 1]
                } else {
                    j += 1;
                    b[j - 1]
                };
                match out.last_mut() {
                    Some(last) if next.start as u32 <= last.end as u32 + 1 => last.end = last.end.max(next.end),
                    _ => out.push(next),
                }
            }
            self.ranges[p.index()] = out;
        }
        self.other |= other.other;
        self.normalize();
    }

    pub fn contains(&self, protocol: IpProtocol, port: u16) -> bool {
        if self.all {
            return true;
        }
        match protocol.policy_protocol() {
            Some(p) => self.ranges(p).iter().any(|r| r.contains(port)),
            None => self.other,
        }
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.all {
            return f.write_str("all traffic");
        }
        if self.is_empty() {
            return f.write_str("nothing");
        }
        let mut first = true;
        for p in Protocol::ALL {
            let rs = self.ranges(p);
            if rs.is_empty() {
                continue;
            }
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{p}")?;
            if rs != [PortRange::ALL] {
                f.write_str(" ")?;
                for (i, r) in rs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{r}")?;
                }
            }
        }
        if self.other {
            if !first {
                f.write_str(", ")?;
            }
            f.write_str("protocols without ports")?;
        }
        Ok(())
    }
}

impl Serialize for PortSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        if self.all {
            m.serialize_entry("all", &true)?;
        } else {
            for p in Protocol::ALL {
                if !self.ranges(p).is_empty() {
                    m.serialize_entry(p.as_str(), self.ranges(p))?;
                }
            }
            if self.other {
                m.serialize_entry("other", &true)?;
            }
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_merge_canonically() {
        let mut a = PortSet::empty();
        a.insert(Protocol::Tcp, PortRange { start: 80, end: 81 });
        a.insert(Protocol::Tcp, PortRange { start: 82, end: 90 });
        a.insert(Protocol::Tcp, PortRange::single(85));
        assert_eq!(a, PortSet::range(Protocol::Tcp, PortRange { start: 80, end: 90 }));
        assert!(a.contains(IpProtocol::TCP, 90) && !a.contains(IpProtocol::UDP, 85));
        assert!(!a.contains(IpProtocol::ICMP, 0));
        assert!(PortSet::all().contains(IpProtocol::ICMP, 0));
        assert_eq!(a.to_string(), "TCP 80-90");
    }

    #[test]
    fn prefixes_of_known_ranges() {
        assert_eq!(PortRange::ALL.to_prefixes(), vec![(0, 0)]);
        assert_eq!(PortRange::single(80).to_prefixes(), vec![(80, 16)]);
        assert_eq!(PortRange { start: 80, end: 81 }.to_prefixes(), vec![(80, 15)]);
        assert_eq!(PortRange { start: 1, end: 65535 }.to_prefixes().len(), 16);
        assert!(PortRange { start: 1, end: 65534 }.to_prefixes().len() <= 30);
    }

    proptest! {
        #[test]
        fn prefixes_cover_exactly_the_range(a in any::<u16>(), b in any::<u16>(), probe in any::<u16>()) {
            let r = PortRange { start: a.min(b), end: a.max(b) };
            let ps = r.to_prefixes();
            prop_assert!(ps.len() <= 30);
            let covered = ps.iter().any(|&(p, len)| {
                let mask = if len == 0 { 0 } else { u16::MAX << (16 - len) };
                probe & mask == p
            });
            prop_assert_eq!(covered, r.contains(probe));
        }
    }
}

#[cfg(test)]
mod merge_tests {
    use super::*;

    /// `insert` and `union_with` keep the canonical form (sorted, disjoint, not adjacent)
    /// and hold exactly the ports inserted, whatever the order.
    #[test]
    fn insert_and_union_match_a_bitmap() {
        let mut seed = 0x853c_49e6_748f_ea9bu64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..500 {
            let mut sets = [PortSet::empty(), PortSet::empty()];
            let mut bits = [vec![false; 65536], vec![false; 65536]];
            for k in 0..2 {
                for _ in 0..next(40) {
                    let start = if next(2) == 0 { next(200) } else { next(65536) } as u16;
                    let width = if next(4) == 0 { 70000 } else { 5 };
                    let end = (start as u64 + next(width)).min(65535) as u16;
                    sets[k].insert(Protocol::Udp, PortRange { start, end });
                    bits[k][start as usize..=end as usize].iter_mut().for_each(|b| *b = true);
                }
            }
            let mut union = sets[0].clone();
            union.union_with(&sets[1]);
            let both: Vec<bool> = (0..65536).map(|i| bits[0][i] || bits[1][i]).collect();
            for (set, want) in [(&sets[0], &bits[0]), (&sets[1], &bits[1]), (&union, &both)] {
                let r = set.ranges(Protocol::Udp);
                assert!(r.windows(2).all(|w| (w[0].end as u32) + 1 < w[1].start as u32), "canonical: {r:?}");
                for (p, w) in want.iter().enumerate() {
                    assert_eq!(set.contains(IpProtocol(17), p as u16), *w, "port {p} in {r:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod set_ops_tests {
    use super::*;
    use proptest::prelude::*;

    /// A set and its meaning: per protocol a 64-port window (ports 0..64, enough to see
    /// every boundary), plus whether portless protocols pass.
    fn set() -> impl Strategy<Value = PortSet> {
        let range = (0..3usize, 0..64u16, 0..70u16).prop_map(|(p, s, w)| (Protocol::ALL[p], PortRange { start: s, end: (s + w).min(63) }));
        prop_oneof![
            1 => Just(PortSet::all()),
            1 => Just(PortSet::empty()),
            8 => (prop::collection::vec(range, 0..5), any::<bool>()).prop_map(|(rs, other)| {
                let mut s = if other { PortSet::other_protocols() } else { PortSet::empty() };
                for (p, r) in rs {
                    s.insert(p, r);
                }
                s
            }),
        ]
    }

    fn probes(s: &PortSet) -> Vec<bool> {
        let mut v: Vec<bool> = Protocol::ALL.iter().flat_map(|p| (0..66u16).map(move |port| (*p, port))).map(|(p, port)| s.contains(p.into(), port)).collect();
        v.push(s.contains(IpProtocol::ICMP, 0));
        v.push(s.contains(IpProtocol::TCP, 65535));
        v
    }

    proptest! {
        /// intersect, subtract and union agree with the same operations on membership, and
        /// keep the canonical form (equal meaning, equal value).
        #[test]
        fn set_operations_match_membership(a in set(), b in set()) {
            let (pa, pb) = (probes(&a), probes(&b));
            let i = a.intersect(&b);
            let d = a.subtract(&b);
            let mut u = a.clone();
            u.union_with(&b);
            prop_assert_eq!(probes(&i), pa.iter().zip(&pb).map(|(x, y)| *x && *y).collect::<Vec<_>>());
            prop_assert_eq!(probes(&d), pa.iter().zip(&pb).map(|(x, y)| *x && !*y).collect::<Vec<_>>());
            prop_assert_eq!(probes(&u), pa.iter().zip(&pb).map(|(x, y)| *x || *y).collect::<Vec<_>>());
            // Canonical: rebuilding the union from the difference and the intersection
            // gives the same value.
            let mut back = d.clone();
            back.union_with(&i);
            prop_assert_eq!(back, a.clone());
            prop_assert_eq!(PortSet::all().subtract(&PortSet::all().subtract(&a)), a);
        }
    }
}
