//! IP prefixes with the arithmetic the LPM compiler needs.
//!
//! Both families share one representation: the address is left-aligned in a `u128`
//! (IPv4 `a.b.c.d` occupies the top 32 bits), so containment and masking are the same
//! code for IPv4 and IPv6, and sorting `(family, bits, len)` yields a pre-order walk of
//! the prefix tree (an ancestor sorts before its descendants).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    pub fn max_len(self) -> u8 {
        match self {
            Family::Ipv4 => 32,
            Family::Ipv6 => 128,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CIDR prefix with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    family: Family,
    /// The left-aligned bits as a `u128`, stored as its high and low halves: the order is
    /// the same, and without `u128`'s 16-byte alignment a prefix takes 24 bytes, not 32
    /// (tables hold one per entry, and several per provenance).
    bits: Halves,
    len: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Halves(u64, u64);

impl From<u128> for Halves {
    fn from(v: u128) -> Halves {
        Halves((v >> 64) as u64, v as u64)
    }
}

impl Halves {
    fn get(self) -> u128 {
        (self.0 as u128) << 64 | self.1 as u128
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("{0:?} is not a CIDR (expected ADDRESS/LENGTH)")]
    NotCidr(String),
    #[error("prefix length {len} is longer than {max} for {family}")]
    TooLong { len: u8, max: u8, family: Family },
}

fn left_aligned(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => (u32::from(a) as u128) << 96,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn mask(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - len as u32) }
}

impl Prefix {
    /// The prefix of length `len` that holds `addr` (host bits are cleared, as the API
    /// server's sloppy CIDR parsing accepts them).
    pub fn new(addr: IpAddr, len: u8) -> Result<Prefix, PrefixError> {
        let family = Family::of(addr);
        if len > family.max_len() {
            return Err(PrefixError::TooLong { len, max: family.max_len(), family });
        }
        Ok(Prefix { family, bits: (left_aligned(addr) & mask(len)).into(), len })
    }

    /// The single-address prefix (/32 or /128).
    pub fn host(addr: IpAddr) -> Prefix {
        let family = Family::of(addr);
        Prefix { family, bits: left_aligned(addr).into(), len: family.max_len() }
    }

    /// Everything in one family: `0.0.0.0/0` or `::/0`.
    pub fn everything(family: Family) -> Prefix {
        Prefix { family, bits: 0u128.into(), len: 0 }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// The prefix length (a `Prefix` is never empty: `/0` is everything).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn is_host(&self) -> bool {
        self.len == self.family.max_len()
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        match self.family {
            Family::Ipv4 => IpAddr::V4(Ipv4Addr::from((self.bits.get() >> 96) as u32)),
            Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(self.bits.get())),
        }
    }

    pub fn contains_addr(&self, addr: IpAddr) -> bool {
        Family::of(addr) == self.family && left_aligned(addr) & mask(self.len) == self.bits.get()
    }

    /// True when every address of `other` is in `self` (a prefix contains itself).
    pub fn contains(&self, other: &Prefix) -> bool {
        other.family == self.family && other.len >= self.len && other.bits.get() & mask(self.len) == self.bits.get()
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Prefix, PrefixError> {
        // ipnetwork parses both families and keeps host bits; we require the "/len" form
        // the API server requires, then clear host bits.
        if !s.contains('/') {
            return Err(PrefixError::NotCidr(s.to_string()));
        }
        let net = ipnetwork::IpNetwork::from_str(s).map_err(|_| PrefixError::NotCidr(s.to_string()))?;
        Prefix::new(net.ip(), net.prefix())
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.len)
    }
}

impl Serialize for Prefix {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_masks_host_bits() {
        assert_eq!(p("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(p("fd10:244::5/56").to_string(), "fd10:244::/56");
        assert_eq!(p("0.0.0.0/0"), Prefix::everything(Family::Ipv4));
        assert!("10.0.0.1".parse::<Prefix>().is_err());
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("10.0.0/8".parse::<Prefix>().is_err());
    }

    #[test]
    fn containment_is_per_family() {
        assert!(p("10.0.0.0/8").contains(&p("10.3.0.0/16")));
        assert!(!p("10.3.0.0/16").contains(&p("10.0.0.0/8")));
        assert!(p("10.0.0.0/8").contains(&p("10.0.0.0/8")));
        assert!(!p("0.0.0.0/0").contains(&p("::/0")));
        assert!(p("::/0").contains_addr("fd10::1".parse().unwrap()));
        assert!(!p("::/0").contains_addr("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn sort_order_is_preorder() {
        let mut v = [p("10.1.0.0/16"), p("10.0.0.0/16"), p("10.0.0.0/8"), p("9.0.0.0/8")];
        v.sort();
        let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
        assert_eq!(s, ["9.0.0.0/8", "10.0.0.0/8", "10.0.0.0/16", "10.1.0.0/16"]);
    }
}
