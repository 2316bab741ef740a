//! Packet parsing: where each header field sits, the one IPv4 parser with its named
//! fragment predicates, and the IPv4 TCP/UDP datagram the mesh translates.
//!
//! Offsets come from `network-types`' `#[repr(C)]` headers through `offset_of!`, never from
//! literals. Values the programs compare with (EtherTypes, protocols) are kept here in host
//! byte order.

use core::mem::offset_of;

use aya_ebpf::programs::TcContext;
use network_types::{
    arp::ArpHdr,
    eth::{EthHdr, EtherType},
    icmp::Icmpv4Hdr,
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
    vxlan::VxlanHdr,
};

/// Field offsets from the start of a header: `pub const NAME: usize` for each
/// `NAME = field` of the `#[repr(C)]` header type.
macro_rules! offsets {
    ($header:ty { $($name:ident = $field:ident),+ $(,)? }) => {
        $(pub const $name: usize = offset_of!($header, $field);)+
    };
}

// Ethernet, and one 802.1Q tag.
pub const ETH_HLEN: usize = EthHdr::LEN;
offsets!(EthHdr { ETH_DST = dst_addr, ETH_SRC = src_addr, ETH_PROTO = ether_type });
pub const VLAN_HLEN: usize = VlanHdr::LEN;
/// The EtherType inside an 802.1Q tag that follows the Ethernet header.
pub const VLAN_INNER_PROTO: usize = ETH_HLEN + offset_of!(VlanHdr, ether_type);
/// EtherTypes, host byte order (`network-types` has them in network byte order).
#[inline(always)]
const fn ethertype(value: EtherType) -> u16 {
    u16::from_be(value as u16)
}
pub const ETH_P_IP: u16 = ethertype(EtherType::Ipv4);
pub const ETH_P_ARP: u16 = ethertype(EtherType::Arp);
pub const ETH_P_IPV6: u16 = ethertype(EtherType::Ipv6);
pub const ETH_P_8021Q: u16 = ethertype(EtherType::Ieee8021q);

// ARP (Ethernet/IPv4).
offsets!(ArpHdr { ARP_HTYPE = htype, ARP_OPER = oper });
offsets!(ArpHdr { ARP_SHA = sha, ARP_SPA = spa, ARP_THA = tha, ARP_TPA = tpa });

// IPv4 and IPv6.
pub const IPV4_HLEN: usize = Ipv4Hdr::LEN;
offsets!(Ipv4Hdr { IPV4_FRAG = frags, IPV4_PROTO = proto, IPV4_CSUM = check });
offsets!(Ipv4Hdr { IPV4_SRC = src_addr, IPV4_DST = dst_addr });
pub const IPV6_HLEN: usize = Ipv6Hdr::LEN;
pub const IPV6_NEXT: usize = offset_of!(Ipv6Hdr, next_hdr);
pub const IPPROTO_ICMP: u8 = IpProto::Icmp as u8;
pub const IPPROTO_TCP: u8 = IpProto::Tcp as u8;
pub const IPPROTO_UDP: u8 = IpProto::Udp as u8;
/// The flags-and-offset word (host byte order): "more fragments", and the fragment's
/// offset (in 8-byte units; non-zero for every fragment but the first).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

// TCP and UDP: the ports sit alike in both.
offsets!(TcpHdr { L4_SPORT = source, L4_DPORT = dest, TCP_CSUM = check });
const _: () = assert!(L4_SPORT == offset_of!(UdpHdr, src) && L4_DPORT == offset_of!(UdpHdr, dst));
pub const TCP_HLEN: usize = TcpHdr::LEN;
/// The flags byte: the second of the data-offset word (data offset, reserved bits, flags).
pub const TCP_FLAGS: usize = offset_of!(TcpHdr, _bitfield_1) + 1;
pub const UDP_HLEN: usize = UdpHdr::LEN;
pub const UDP_CSUM: usize = offset_of!(UdpHdr, check);
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

// ICMP and VXLAN.
pub const ICMP_HLEN: usize = Icmpv4Hdr::LEN;
pub const ICMP_CSUM: usize = offset_of!(Icmpv4Hdr, check);
/// The VNI's three bytes, read as the word they start (the low byte is reserved).
pub const VXLAN_VNI: usize = offset_of!(VxlanHdr, vni);

/// The fields of an IPv4 header the programs decide on, however they were read. Every
/// program asks the same questions of it, with the same masks.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    vihl: u8,
    /// Flags and fragment offset, host byte order.
    frag: u16,
    pub protocol: u8,
}

impl Ipv4 {
    /// Reads the header at `l3` with `bpf_skb_load_bytes`, a field at a time: any offset,
    /// any layout. None when a field is missing or it is no IPv4 header (`is_valid`).
    #[inline(always)]
    pub fn load(ctx: &TcContext, l3: usize) -> Option<Self> {
        let header = Self {
            vihl: ctx.load(l3).ok()?,
            frag: load_be16(ctx, l3 + IPV4_FRAG)?,
            protocol: ctx.load(l3 + IPV4_PROTO).ok()?,
        };
        header.is_valid().then_some(header)
    }

    /// The header `header` points at, in the packet's linear part.
    ///
    /// # Safety
    /// `header` must point at `IPV4_HLEN` readable bytes (the caller checked them against
    /// `data_end`).
    #[inline(always)]
    pub unsafe fn read(header: *const Ipv4Hdr) -> Self {
        // SAFETY: as the caller promises; `Ipv4Hdr` is all bytes (alignment 1).
        unsafe {
            Self {
                vihl: (*header).vihl,
                frag: u16::from_be_bytes((*header).frags),
                protocol: (*header).proto,
            }
        }
    }

    /// Version 4, and a header length of at least the 20 bytes every header has.
    #[inline(always)]
    pub fn is_valid(&self) -> bool {
        self.vihl >> 4 == 4 && self.header_len() >= IPV4_HLEN
    }

    /// Version 4 without options: the transport header at `IPV4_HLEN`.
    #[inline(always)]
    pub fn is_plain(&self) -> bool {
        self.vihl == 0x40 | (IPV4_HLEN / 4) as u8
    }

    /// The header's length in bytes, options included.
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        usize::from(self.vihl & 0x0f) * 4
    }

    /// Any fragment, first or later: not a whole datagram.
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        self.frag & (IP_MF | IP_OFFSET) != 0
    }

    /// A fragment after the first: it carries no transport header.
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        self.frag & IP_OFFSET != 0
    }

    /// The first fragment of a fragmented datagram: its transport header, not its payload.
    #[inline(always)]
    pub fn is_first_fragment(&self) -> bool {
        self.frag & IP_MF != 0 && !self.is_later_fragment()
    }
}

/// An IPv4 TCP or UDP datagram's addresses and ports (network byte order) and where its
/// headers are.
#[derive(Clone, Copy)]
pub struct Datagram {
    pub l3: usize,
    pub l4: usize,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

/// Where the transport header starts in the common case: IPv4 without options right after
/// an untagged Ethernet header.
pub const PLAIN_L4: usize = ETH_HLEN + IPV4_HLEN;

impl Datagram {
    /// Parses the IPv4 header at `l3` and the TCP/UDP header after it. None for anything
    /// else: other protocols, fragments, and headers shorter than they claim.
    #[inline(always)]
    pub fn parse(ctx: &TcContext, l3: usize) -> Option<Self> {
        match Self::parse_direct(ctx, l3) {
            Some(parsed) => parsed,
            None => Self::parse_loaded(ctx, l3),
        }
    }

    /// An untagged Ethernet frame's IPv4 TCP/UDP datagram (what the ingress network carries).
    #[inline(always)]
    pub fn from_frame(ctx: &TcContext) -> Option<Self> {
        if peek::<u16>(ctx, ETH_PROTO).map(u16::from_be) != Some(ETH_P_IP) {
            return None;
        }
        Self::parse(ctx, ETH_HLEN)
    }

    /// `parse` without a helper call for the common case: a plain IPv4 header
    /// (`Ipv4::is_plain`) right after the Ethernet header, in the packet's linear part, read
    /// in place at constant offsets (the verifier bounds those; a `bpf_skb_load_bytes` per
    /// field was most of the mesh's per-packet cost). None when the case does not apply:
    /// then `parse_loaded` decides, with the same answers.
    #[inline(always)]
    fn parse_direct(ctx: &TcContext, l3: usize) -> Option<Option<Self>> {
        let start = ctx.data();
        let end = ctx.data_end();
        if l3 != ETH_HLEN || start + PLAIN_L4 > end {
            return None;
        }
        // SAFETY (every read below): within [data, data_end), checked before the read.
        let byte = |at: usize| unsafe { *((start + at) as *const u8) };
        let ne16 = |at: usize| u16::from_ne_bytes([byte(at), byte(at + 1)]);
        let ne32 =
            |at: usize| u32::from_ne_bytes([byte(at), byte(at + 1), byte(at + 2), byte(at + 3)]);
        // SAFETY: the header's 20 bytes are within the packet, checked above.
        let ip = unsafe { Ipv4::read((start + ETH_HLEN) as *const Ipv4Hdr) };
        if !ip.is_plain() {
            return None;
        }
        if ip.is_fragment() {
            return Some(None);
        }
        let tcp_flags = match ip.protocol {
            IPPROTO_TCP => {
                if start + PLAIN_L4 + TCP_HLEN > end {
                    return None;
                }
                byte(PLAIN_L4 + TCP_FLAGS)
            }
            IPPROTO_UDP => {
                if start + PLAIN_L4 + UDP_HLEN > end {
                    return None;
                }
                0
            }
            _ => return Some(None),
        };
        Some(Some(Self {
            l3,
            l4: PLAIN_L4,
            protocol: ip.protocol,
            tcp_flags,
            saddr: ne32(ETH_HLEN + IPV4_SRC),
            daddr: ne32(ETH_HLEN + IPV4_DST),
            sport: ne16(PLAIN_L4 + L4_SPORT),
            dport: ne16(PLAIN_L4 + L4_DPORT),
        }))
    }

    /// `parse` for any case, one `bpf_skb_load_bytes` per field.
    #[inline(always)]
    fn parse_loaded(ctx: &TcContext, l3: usize) -> Option<Self> {
        let ip = Ipv4::load(ctx, l3)?;
        if ip.is_fragment() {
            return None;
        }
        let l4 = l3 + ip.header_len();
        // The whole transport header must be there: it is rewritten in place.
        let tcp_flags = match ip.protocol {
            IPPROTO_TCP => {
                ctx.load::<[u8; TCP_HLEN]>(l4).ok()?;
                ctx.load::<u8>(l4 + TCP_FLAGS).ok()?
            }
            IPPROTO_UDP => {
                ctx.load::<[u8; UDP_HLEN]>(l4).ok()?;
                0
            }
            _ => return None,
        };
        Some(Self {
            l3,
            l4,
            protocol: ip.protocol,
            tcp_flags,
            saddr: ctx.load(l3 + IPV4_SRC).ok()?,
            daddr: ctx.load(l3 + IPV4_DST).ok()?,
            sport: ctx.load(l4 + L4_SPORT).ok()?,
            dport: ctx.load(l4 + L4_DPORT).ok()?,
        })
    }

    /// A TCP segment that opens a connection (SYN without ACK).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Reads a `T` at a constant `offset` of the packet: straight from its linear part when it is
/// there (no helper call), else with `bpf_skb_load_bytes` (the same answer, slower). Only for
/// offsets the compiler sees as constants: the verifier cannot bound a variable one here.
#[inline(always)]
pub fn peek<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return ctx.load(offset).ok();
    }
    // SAFETY: within [data, data_end), checked just above (and by the verifier).
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

/// A 16-bit field at any offset, in host byte order.
#[inline(always)]
pub fn load_be16(ctx: &TcContext, offset: usize) -> Option<u16> {
    ctx.load::<u16>(offset).ok().map(u16::from_be)
}

/// A byte at any offset.
#[inline(always)]
pub fn load_u8(ctx: &TcContext, offset: usize) -> Option<u8> {
    ctx.load::<u8>(offset).ok()
}
