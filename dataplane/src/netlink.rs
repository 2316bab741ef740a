//! The kernel's network configuration over rtnetlink, in process: one small typed method per
//! kernel operation on a blocking `NETLINK_ROUTE` socket, in the manner of netavark's
//! `netlink.rs`. Messages are `netlink-packet-route` types, most built with `rtnetlink`'s
//! builders; the socket is synchronous because its callers are (the overlay runs on blocking
//! threads), so no runtime is involved. A socket works in the namespace it was opened in
//! ([`Netlink::open_in`]), whichever thread uses it later.
//!
//! Kernel errors come back as [`NetlinkError`], which says what was being done, and what to do
//! about the common errnos.

use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{
        InfoBridgePort, InfoData, InfoPortData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo,
        LinkMessage,
    },
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
    tc::{TcAttribute, TcBpfFlags, TcFilterBpf, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;
use rtnetlink::{
    AddressMessageBuilder, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    LinkVxlan, RouteMessageBuilder,
};

use crate::{
    netns::{self, Netns},
    peerdb::format_mac,
};

/// What a kernel operation failed with.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("{op}: it exists already")]
    Exists { op: String },
    #[error("{op}: no such device, address or entry")]
    NotFound { op: String },
    #[error("{op}: {errno}{}", hint(*.errno))]
    Kernel { op: String, errno: Errno },
    #[error("{op}: {message}")]
    Protocol { op: String, message: String },
}

impl NetlinkError {
    fn from_errno(op: String, errno: Errno) -> Self {
        match errno {
            Errno::EEXIST => NetlinkError::Exists { op },
            Errno::ENODEV | Errno::ENOENT | Errno::ESRCH | Errno::EADDRNOTAVAIL => {
                NetlinkError::NotFound { op }
            }
            errno => NetlinkError::Kernel { op, errno },
        }
    }

    fn protocol(op: &str, message: impl std::fmt::Display) -> Self {
        NetlinkError::Protocol {
            op: op.to_owned(),
            message: message.to_string(),
        }
    }

    pub fn is_exists(&self) -> bool {
        matches!(self, NetlinkError::Exists { .. })
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, NetlinkError::NotFound { .. })
    }
}

/// What to do about an errno, in the agent's words.
fn hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EPERM | Errno::EACCES => " (the agent needs CAP_NET_ADMIN: run it as root)",
        Errno::EOPNOTSUPP | Errno::EAFNOSUPPORT => {
            " (the kernel lacks this feature: check it has VXLAN, veth and bridge built in)"
        }
        Errno::EBUSY => " (the device is in use: is another agent running on this node?)",
        Errno::ENETUNREACH => " (no route to the gateway: is the interface up with an address?)",
        Errno::ERANGE => " (the MTU is out of range for the device)",
        _ => "",
    }
}

pub type NetlinkResult<T> = Result<T, NetlinkError>;

/// A link as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<[u8; 6]>,
    /// The bridge it is a port of.
    pub controller: Option<u32>,
    pub up: bool,
    /// Its transmit and receive queues.
    pub queues: (u32, u32),
}

/// Where the far end of a new veth goes.
#[derive(Clone, Copy, Debug)]
pub enum PeerNs<'a> {
    /// The namespace of a process (a task's PID 1).
    Pid(u32),
    /// A namespace open as a file (`/run/netns/NAME`).
    Fd(&'a std::fs::File),
}

/// A veth pair to create: this end in the socket's namespace, the peer in `peer_ns`.
#[derive(Clone, Debug)]
pub struct Veth<'a> {
    pub name: &'a str,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    /// The bridge this end joins.
    pub controller: Option<u32>,
    pub peer: &'a str,
    pub peer_ns: PeerNs<'a>,
    pub peer_mac: Option<[u8; 6]>,
    /// This end up. The peer cannot be: the kernel configures it before the pair is joined
    /// (ENOTCONN), so it is brought up from its own namespace. A task's veth is made down
    /// and brought up last (see `Overlay::attach`).
    pub up: bool,
}

/// A VXLAN device without learning and with ARP proxy on: remote endpoints exist only as FDB
/// entries the agent programs.
#[derive(Clone, Debug)]
pub struct Vxlan<'a> {
    pub name: &'a str,
    pub vni: u32,
    pub local: Ipv4Addr,
    pub port: u16,
    pub mtu: u32,
}

/// Changes to an existing link; what is None stays.
#[derive(Clone, Debug, Default)]
pub struct LinkChange<'a> {
    pub up: Option<bool>,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub controller: Option<u32>,
    /// Moves the link into the namespace open as this file.
    pub netns: Option<&'a std::fs::File>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

/// An IPv4 route: `prefix` 0 is a default route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub table: u32,
}

/// A policy rule: traffic from `from`/`prefix` looks up `table`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub from: Ipv4Addr,
    pub prefix: u8,
    pub table: u32,
    pub priority: u32,
}

/// A bridge forwarding-database entry; on a VXLAN device `dst` is the remote VTEP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: [u8; 6],
    pub dst: Option<IpAddr>,
    pub permanent: bool,
    /// On the device itself (`self`), not the bridge above it.
    pub own: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub mac: Option<[u8; 6]>,
    pub permanent: bool,
}

pub const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// Which side of an interface a `clsact` hook sees: what arrives on it, or what leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    Ingress,
    Egress,
}

impl TcHook {
    /// The `clsact` pseudo-class filters hang from (`ffff:fff2` / `ffff:fff3`).
    fn parent(self) -> TcHandle {
        let minor = match self {
            TcHook::Ingress => TcHandle::MIN_INGRESS,
            TcHook::Egress => TcHandle::MIN_EGRESS,
        };
        TcHandle {
            major: TcHandle::CLSACT.major,
            minor,
        }
    }
}

/// A `cls_bpf` filter in direct-action mode (the program's return code is the verdict) on a
/// `clsact` hook, matching every protocol. `priority` orders the filters of a hook (lower
/// runs first); `priority` and `handle` together name the filter, so putting the same pair
/// again replaces its program in place.
#[derive(Clone, Copy, Debug)]
pub struct BpfFilter<'a> {
    pub hook: TcHook,
    pub priority: u16,
    pub handle: u32,
    pub program: std::os::fd::BorrowedFd<'a>,
    /// Shown by `tc filter show`.
    pub name: &'a str,
}

/// A `cls_bpf` filter as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedBpfFilter {
    pub priority: u16,
    pub handle: u32,
    /// The ID of the program it runs (`bpftool prog show id N`).
    pub program_id: u32,
    pub name: String,
    pub direct_action: bool,
}

/// `ETH_P_ALL` as the filter header carries it (network byte order).
const ALL_PROTOCOLS: u16 = (libc::ETH_P_ALL as u16).to_be();
/// Big enough for any dump datagram the kernel sends (it sizes them to the reader's buffer,
/// at most 32 KiB).
const RECV_BUFFER: usize = 64 * 1024;

/// A `NETLINK_ROUTE` socket in one namespace.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Netlink {
    /// A socket in the calling thread's namespace.
    pub fn open() -> NetlinkResult<Self> {
        let op = "opening a netlink socket";
        let errno = |err: std::io::Error| {
            NetlinkError::from_errno(op.into(), Errno::from_raw(err.raw_os_error().unwrap_or(0)))
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(errno)?;
        // Dumps filtered by the kernel (by device, by table) need strict checking.
        socket.set_netlink_get_strict_chk(true).map_err(errno)?;
        socket.bind_auto().map_err(errno)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(errno)?;
        Ok(Self {
            socket,
            sequence: 0,
            buffer: vec![0; RECV_BUFFER],
        })
    }

    /// A socket in `netns`, opened by a thread that entered it.
    pub fn open_in(netns: &Netns) -> anyhow::Result<Self> {
        netns::run_in(netns, || Ok(Self::open()?))
    }

    /// Sends one request and reads its answer: every message of a dump, else what the kernel
    /// sent before its acknowledgement.
    fn request(
        &mut self,
        op: impl FnOnce() -> String,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> NetlinkResult<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), message.into());
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = self.sequence;
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        if let Err(err) = self.socket.send(&out, 0) {
            return Err(NetlinkError::from_errno(
                op(),
                Errno::from_raw(err.raw_os_error().unwrap_or(0)),
            ));
        }
        let mut answer = Vec::new();
        loop {
            let size = match self.socket.recv(&mut &mut self.buffer[..], 0) {
                Ok(size) => size,
                Err(err) => {
                    return Err(NetlinkError::from_errno(
                        op(),
                        Errno::from_raw(err.raw_os_error().unwrap_or(0)),
                    ))
                }
            };
            let mut rest = &self.buffer[..size];
            while !rest.is_empty() {
                let received: NetlinkMessage<RouteNetlinkMessage> =
                    match NetlinkMessage::deserialize(rest) {
                        Ok(received) => received,
                        Err(err) => return Err(NetlinkError::protocol(&op(), err)),
                    };
                let length = received.header.length as usize;
                // Answers to an earlier request given up on are skipped.
                let ours = received.header.sequence_number == self.sequence;
                match received.payload {
                    _ if !ours => {}
                    // A dump that failed at its start ends with the errno in its Done.
                    NetlinkPayload::Done(done) if done.code < 0 => {
                        return Err(NetlinkError::from_errno(op(), Errno::from_raw(-done.code)))
                    }
                    NetlinkPayload::Done(_) => return Ok(answer),
                    NetlinkPayload::Error(err) => {
                        return match err.code {
                            None => Ok(answer),
                            Some(code) => {
                                Err(NetlinkError::from_errno(op(), Errno::from_raw(-code.get())))
                            }
                        }
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        answer.push(inner);
                        if flags & NLM_F_DUMP != NLM_F_DUMP && flags & NLM_F_ACK == 0 {
                            return Ok(answer);
                        }
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(NetlinkError::protocol(&op(), "the kernel's answer overran"))
                    }
                    _ => {}
                }
                if length == 0 || length > rest.len() {
                    break;
                }
                // Messages in a datagram are 4-byte aligned.
                rest = &rest[length.next_multiple_of(4).min(rest.len())..];
            }
        }
    }

    fn change(
        &mut self,
        op: impl FnOnce() -> String,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> NetlinkResult<()> {
        self.request(op, message, flags | NLM_F_ACK).map(drop)
    }

    /// A dump request, each answer kept as `pick` makes it (or left out).
    fn dump<T>(
        &mut self,
        op: impl FnOnce() -> String,
        message: RouteNetlinkMessage,
        pick: impl FnMut(RouteNetlinkMessage) -> Option<T>,
    ) -> NetlinkResult<Vec<T>> {
        let answer = self.request(op, message, NLM_F_DUMP)?;
        Ok(answer.into_iter().filter_map(pick).collect())
    }

    // Links.

    /// Every link of the namespace.
    pub fn links(&mut self) -> NetlinkResult<Vec<Link>> {
        self.dump(
            || "listing links".into(),
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            |m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link_of(link)),
                _ => None,
            },
        )
    }

    /// The link named `name`, if there is one.
    pub fn link(&mut self, name: &str) -> NetlinkResult<Option<Link>> {
        let message = LinkUnspec::new_with_name(name).build();
        match self.request(
            || format!("reading link {name}"),
            RouteNetlinkMessage::GetLink(message),
            0,
        ) {
            Ok(answer) => Ok(answer.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link_of(link)),
                _ => None,
            })),
            Err(err) if err.is_not_found() => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The interface index of `name`.
    pub fn index_of(&mut self, name: &str) -> NetlinkResult<u32> {
        self.link(name)?
            .map(|link| link.index)
            .ok_or_else(|| NetlinkError::NotFound {
                op: format!("looking up link {name}"),
            })
    }

    fn add_link(&mut self, name: &str, message: LinkMessage) -> NetlinkResult<()> {
        self.change(
            || format!("adding link {name}"),
            RouteNetlinkMessage::NewLink(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// A bridge; with `mac` given it keeps that address whatever ports come and go (else the
    /// kernel gives it the lowest of its ports' addresses, changing as they do).
    pub fn add_bridge(
        &mut self,
        name: &str,
        mtu: Option<u32>,
        mac: Option<[u8; 6]>,
    ) -> NetlinkResult<()> {
        let mut builder = LinkBridge::new(name).up();
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        if let Some(mac) = mac {
            builder = builder.address(mac.to_vec());
        }
        self.add_link(name, builder.build())
    }

    pub fn add_vxlan(&mut self, vxlan: &Vxlan<'_>) -> NetlinkResult<()> {
        let message = LinkVxlan::new(vxlan.name, vxlan.vni)
            .local(vxlan.local)
            .port(vxlan.port)
            .learning(false)
            .proxy(true)
            .mtu(vxlan.mtu)
            .build();
        self.add_link(vxlan.name, message)
    }

    /// A veth pair in one message: both ends named, addressed and sized, this end on its
    /// bridge and the peer already in its namespace. One queue each way on both ends, asked
    /// for: left to the kernel, it makes one per CPU and then cuts them to one, and each cut
    /// waits for an RCU grace period (four per pair).
    pub fn add_veth(&mut self, veth: &Veth<'_>) -> NetlinkResult<()> {
        let mut peer = one_queue(LinkMessageBuilder::<LinkUnspec>::new().name(veth.peer));
        peer = match veth.peer_ns {
            PeerNs::Pid(pid) => peer.setns_by_pid(pid),
            PeerNs::Fd(file) => peer.setns_by_fd(std::os::fd::AsRawFd::as_raw_fd(file)),
        };
        if let Some(mtu) = veth.mtu {
            peer = peer.mtu(mtu);
        }
        if let Some(mac) = veth.peer_mac {
            peer = peer.address(mac.to_vec());
        }
        let mut builder = one_queue(
            LinkVeth::new(veth.name, veth.peer)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build()))),
        );
        if let Some(mtu) = veth.mtu {
            builder = builder.mtu(mtu);
        }
        if let Some(mac) = veth.mac {
            builder = builder.address(mac.to_vec());
        }
        if let Some(controller) = veth.controller {
            builder = builder.controller(controller);
        }
        if veth.up {
            builder = builder.up();
        }
        self.add_link(veth.name, builder.build())
    }

    pub fn set_link(&mut self, index: u32, change: &LinkChange<'_>) -> NetlinkResult<()> {
        let mut builder = LinkUnspec::new_with_index(index);
        match change.up {
            Some(true) => builder = builder.up(),
            Some(false) => builder = builder.down(),
            None => {}
        }
        if let Some(mtu) = change.mtu {
            builder = builder.mtu(mtu);
        }
        if let Some(mac) = change.mac {
            builder = builder.address(mac.to_vec());
        }
        if let Some(controller) = change.controller {
            builder = builder.controller(controller);
        }
        if let Some(file) = change.netns {
            builder = builder.setns_by_fd(std::os::fd::AsRawFd::as_raw_fd(file));
        }
        self.change(
            || format!("changing link {index}"),
            RouteNetlinkMessage::SetLink(builder.build()),
            0,
        )
    }

    pub fn del_link(&mut self, index: u32) -> NetlinkResult<()> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        self.change(
            || format!("deleting link {index}"),
            RouteNetlinkMessage::DelLink(message),
            0,
        )
    }

    /// Whether a bridge port may forward to other isolated ports (`bridge link set isolated`).
    pub fn set_port_isolated(&mut self, index: u32, isolated: bool) -> NetlinkResult<()> {
        let message = LinkBridgePort::new(index).isolated(isolated).build();
        self.change(
            || format!("setting bridge port {index} isolated"),
            RouteNetlinkMessage::NewLink(message),
            0,
        )
    }

    /// Whether a bridge port is isolated, as the kernel has it.
    pub fn port_isolated(&mut self, index: u32) -> NetlinkResult<bool> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        let answer = self.request(
            || format!("reading bridge port {index}"),
            RouteNetlinkMessage::GetLink(message),
            0,
        )?;
        Ok(answer.iter().any(|m| {
            let RouteNetlinkMessage::NewLink(link) = m else {
                return false;
            };
            link.attributes.iter().any(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| {
                    matches!(i, LinkInfo::PortData(InfoPortData::BridgePort(data))
                        if data.contains(&InfoBridgePort::Isolated(true)))
                }),
                _ => false,
            })
        }))
    }

    // Addresses.

    /// Every IPv4 address of the namespace.
    pub fn addresses(&mut self) -> NetlinkResult<Vec<Address>> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        self.dump(
            || "listing addresses".into(),
            RouteNetlinkMessage::GetAddress(message),
            |m| {
                let RouteNetlinkMessage::NewAddress(address) = m else {
                    return None;
                };
                let ip = address.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })?;
                Some(Address {
                    index: address.header.index,
                    ip,
                    prefix: address.header.prefix_len,
                })
            },
        )
    }

    pub fn add_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> NetlinkResult<()> {
        let message = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(ip, prefix)
            .build();
        self.change(
            || format!("adding address {ip}/{prefix} to link {index}"),
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Adds the address, or keeps it if it is there (`ip addr replace`).
    pub fn replace_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> NetlinkResult<()> {
        let message = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(ip, prefix)
            .build();
        self.change(
            || format!("setting address {ip}/{prefix} on link {index}"),
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    // Routes and rules.

    pub fn add_route(&mut self, route: &Route) -> NetlinkResult<()> {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.destination, route.prefix)
            .table_id(route.table);
        if let Some(gateway) = route.gateway {
            builder = builder.gateway(gateway);
        } else {
            // A route to a device alone reaches its link, as `ip route add ... dev` makes it.
            builder = builder.scope(RouteScope::Link);
        }
        if let Some(oif) = route.oif {
            builder = builder.output_interface(oif);
        }
        self.change(
            || {
                format!(
                    "adding route {}/{} in table {}",
                    route.destination, route.prefix, route.table
                )
            },
            RouteNetlinkMessage::NewRoute(builder.build()),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// The IPv4 unicast routes of `table`.
    pub fn routes(&mut self, table: u32) -> NetlinkResult<Vec<Route>> {
        let mut message = RouteMessageBuilder::<Ipv4Addr>::new().build();
        // With strict checking the kernel filters by table (the attribute: ids above 255).
        message.header.table = RouteHeader::RT_TABLE_UNSPEC;
        message.header.protocol = Default::default();
        message.header.scope = RouteScope::Universe;
        message.header.kind = RouteType::Unspec;
        message.attributes.push(RouteAttribute::Table(table));
        self.dump(
            || format!("listing the routes of table {table}"),
            RouteNetlinkMessage::GetRoute(message),
            |m| {
                let RouteNetlinkMessage::NewRoute(route) = m else {
                    return None;
                };
                if route.header.kind != RouteType::Unicast {
                    return None;
                }
                let mut found = Route {
                    destination: Ipv4Addr::UNSPECIFIED,
                    prefix: route.header.destination_prefix_length,
                    gateway: None,
                    oif: None,
                    table: u32::from(route.header.table),
                };
                for attribute in &route.attributes {
                    match attribute {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                            found.destination = *ip
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => {
                            found.gateway = Some(*ip)
                        }
                        RouteAttribute::Oif(index) => found.oif = Some(*index),
                        RouteAttribute::Table(id) => found.table = *id,
                        _ => {}
                    }
                }
                (found.table == table).then_some(found)
            },
        )
    }

    /// The main table's default route, if there is one (instead of `/proc/net/route`).
    pub fn default_route(&mut self) -> NetlinkResult<Option<Route>> {
        Ok(self
            .routes(MAIN_TABLE)?
            .into_iter()
            .find(|route| route.prefix == 0))
    }

    pub fn add_rule(&mut self, rule: &Rule) -> NetlinkResult<()> {
        let mut message = RuleMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.action = RuleAction::ToTable;
        message.header.src_len = rule.prefix;
        message.attributes.extend([
            RuleAttribute::Source(IpAddr::V4(rule.from)),
            RuleAttribute::Table(rule.table),
            RuleAttribute::Priority(rule.priority),
        ]);
        self.change(
            || format!("adding the rule from {} to table {}", rule.from, rule.table),
            RouteNetlinkMessage::NewRule(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// The IPv4 rules that pick a table by source.
    pub fn rules(&mut self) -> NetlinkResult<Vec<Rule>> {
        let mut message = RuleMessage::default();
        message.header.family = AddressFamily::Inet;
        self.dump(
            || "listing rules".into(),
            RouteNetlinkMessage::GetRule(message),
            |m| {
                let RouteNetlinkMessage::NewRule(rule) = m else {
                    return None;
                };
                let mut found = Rule {
                    from: Ipv4Addr::UNSPECIFIED,
                    prefix: rule.header.src_len,
                    table: u32::from(rule.header.table),
                    priority: 0,
                };
                let mut has_source = false;
                for attribute in &rule.attributes {
                    match attribute {
                        RuleAttribute::Source(IpAddr::V4(ip)) => {
                            found.from = *ip;
                            has_source = true;
                        }
                        RuleAttribute::Table(table) => found.table = *table,
                        RuleAttribute::Priority(priority) => found.priority = *priority,
                        _ => {}
                    }
                }
                has_source.then_some(found)
            },
        )
    }

    // Bridge forwarding database (on a VXLAN device: which VTEP has a MAC).

    fn fdb_message(index: u32, mac: [u8; 6], dst: IpAddr) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Bridge;
        message.header.ifindex = index;
        message.header.state = NeighbourState::Permanent;
        // On the device itself (`self`): a VXLAN device's own table holds the destinations.
        message.header.flags = NeighbourFlags::Own;
        message.attributes.extend([
            NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
            NeighbourAttribute::Destination(neighbour_address(dst)),
        ]);
        message
    }

    /// `bridge fdb replace MAC dev DEV dst DST self permanent`.
    pub fn fdb_replace(&mut self, index: u32, mac: [u8; 6], dst: IpAddr) -> NetlinkResult<()> {
        self.change(
            || format!("setting the FDB entry {} -> {dst}", format_mac(&mac)),
            RouteNetlinkMessage::NewNeighbour(Self::fdb_message(index, mac, dst)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// `bridge fdb del MAC dev DEV dst DST self`.
    pub fn fdb_del(&mut self, index: u32, mac: [u8; 6], dst: IpAddr) -> NetlinkResult<()> {
        self.change(
            || format!("deleting the FDB entry {} -> {dst}", format_mac(&mac)),
            RouteNetlinkMessage::DelNeighbour(Self::fdb_message(index, mac, dst)),
            0,
        )
    }

    /// The FDB entries of device `index`.
    pub fn fdb(&mut self, index: u32) -> NetlinkResult<Vec<FdbEntry>> {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Bridge;
        message.header.ifindex = index;
        let entries = self.neighbour_dump(
            || format!("listing the FDB of link {index}"),
            message,
            index,
        )?;
        Ok(entries
            .into_iter()
            .filter_map(|entry| {
                Some(FdbEntry {
                    mac: entry.mac?,
                    dst: entry.dst,
                    permanent: entry.permanent,
                    own: entry.flags.contains(NeighbourFlags::Own),
                })
            })
            .collect())
    }

    /// A dump of neighbour-table entries (`message` says which table), those of device
    /// `index` decoded.
    fn neighbour_dump(
        &mut self,
        what: impl Fn() -> String,
        message: NeighbourMessage,
        index: u32,
    ) -> NetlinkResult<Vec<DumpedNeighbour>> {
        self.dump(what, RouteNetlinkMessage::GetNeighbour(message), |m| {
            let RouteNetlinkMessage::NewNeighbour(entry) = m else {
                return None;
            };
            if entry.header.ifindex != index {
                return None;
            }
            let mut decoded = DumpedNeighbour {
                mac: None,
                dst: None,
                permanent: entry.header.state == NeighbourState::Permanent,
                flags: entry.header.flags,
            };
            for attribute in &entry.attributes {
                match attribute {
                    NeighbourAttribute::LinkLayerAddress(bytes) => {
                        decoded.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok()
                    }
                    NeighbourAttribute::Destination(address) => decoded.dst = ip_of(address),
                    _ => {}
                }
            }
            Some(decoded)
        })
    }

    // Neighbours (ARP).

    fn neighbour_message(index: u32, ip: Ipv4Addr) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.ifindex = index;
        message
            .attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        message
    }

    /// A permanent ARP entry (`ip neigh add IP lladdr MAC dev DEV nud permanent`); one for
    /// `ip` there already is an error.
    pub fn neighbour_add(&mut self, index: u32, ip: Ipv4Addr, mac: [u8; 6]) -> NetlinkResult<()> {
        self.neighbour_set(index, ip, mac, NLM_F_EXCL)
    }

    /// A permanent ARP entry, replacing any for `ip` (`ip neigh replace ...`).
    pub fn neighbour_replace(
        &mut self,
        index: u32,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> NetlinkResult<()> {
        self.neighbour_set(index, ip, mac, NLM_F_REPLACE)
    }

    fn neighbour_set(
        &mut self,
        index: u32,
        ip: Ipv4Addr,
        mac: [u8; 6],
        mode: u16,
    ) -> NetlinkResult<()> {
        let mut message = Self::neighbour_message(index, ip);
        message.header.state = NeighbourState::Permanent;
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.change(
            || format!("setting the neighbour {ip} at {}", format_mac(&mac)),
            RouteNetlinkMessage::NewNeighbour(message),
            NLM_F_CREATE | mode,
        )
    }

    pub fn neighbour_del(&mut self, index: u32, ip: Ipv4Addr) -> NetlinkResult<()> {
        self.change(
            || format!("deleting the neighbour {ip}"),
            RouteNetlinkMessage::DelNeighbour(Self::neighbour_message(index, ip)),
            0,
        )
    }

    /// The IPv4 neighbours of device `index`.
    pub fn neighbours(&mut self, index: u32) -> NetlinkResult<Vec<Neighbour>> {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Inet;
        // A strict neighbour dump takes the device as an attribute (the header's is refused).
        message.attributes.push(NeighbourAttribute::IfIndex(index));
        let entries = self.neighbour_dump(
            || format!("listing the neighbours of link {index}"),
            message,
            index,
        )?;
        Ok(entries
            .into_iter()
            .filter_map(|entry| {
                let Some(IpAddr::V4(ip)) = entry.dst else {
                    return None;
                };
                Some(Neighbour {
                    ip,
                    mac: entry.mac,
                    permanent: entry.permanent,
                })
            })
            .collect())
    }

    // Traffic control: eBPF classifiers on `clsact` hooks.

    /// The `clsact` qdisc on device `index` (`tc qdisc add dev DEV clsact`): the hooks
    /// `cls_bpf` filters attach to. One there already is an error ([`NetlinkError::Exists`]).
    pub fn add_clsact(&mut self, index: u32) -> NetlinkResult<()> {
        let mut message = TcMessage::with_index(index as i32);
        message.header.parent = TcHandle::CLSACT;
        message.header.handle = TcHandle {
            major: TcHandle::CLSACT.major,
            minor: 0,
        };
        message.attributes.push(TcAttribute::Kind("clsact".into()));
        self.change(
            || format!("adding the clsact qdisc to link {index}"),
            RouteNetlinkMessage::NewQueueDiscipline(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Puts `filter` on device `index`, or gives the filter there with its priority and
    /// handle the new program (`tc filter replace ... bpf da fd N`): the kernel swaps the
    /// program under RCU, so the hook never runs without one. Needs the `clsact` qdisc.
    pub fn replace_bpf_filter(&mut self, index: u32, filter: &BpfFilter<'_>) -> NetlinkResult<()> {
        let mut message = TcMessage::with_index(index as i32);
        message.header.parent = filter.hook.parent();
        message.header.handle = TcHandle::from(filter.handle);
        message.header.info = (u32::from(filter.priority) << 16) | u32::from(ALL_PROTOCOLS);
        message.attributes.extend([
            TcAttribute::Kind(TcFilterBpf::KIND.into()),
            TcAttribute::Options(vec![
                TcOption::Bpf(TcFilterBpfOption::ProgFd(std::os::fd::AsRawFd::as_raw_fd(
                    &filter.program,
                ) as u32)),
                TcOption::Bpf(TcFilterBpfOption::ProgName(filter.name.into())),
                TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
            ]),
        ]);
        self.change(
            || {
                format!(
                    "putting {} on link {index} ({:?}, priority {})",
                    filter.name, filter.hook, filter.priority
                )
            },
            RouteNetlinkMessage::NewTrafficFilter(message),
            // Create or replace; never a second filter next to the first.
            NLM_F_CREATE,
        )
    }

    /// The `cls_bpf` filters on one hook of device `index`, in the order they run.
    pub fn bpf_filters(&mut self, index: u32, hook: TcHook) -> NetlinkResult<Vec<ListedBpfFilter>> {
        let mut message = TcMessage::with_index(index as i32);
        message.header.parent = hook.parent();
        let mut filters = self.dump(
            || format!("listing the filters of link {index} ({hook:?})"),
            RouteNetlinkMessage::GetTrafficFilter(message),
            |m| {
                let RouteNetlinkMessage::NewTrafficFilter(filter) = m else {
                    return None;
                };
                // Each priority also lists its classifier alone, without a handle.
                if u32::from(filter.header.handle) == 0 {
                    return None;
                }
                let mut listed = ListedBpfFilter {
                    priority: (filter.header.info >> 16) as u16,
                    handle: filter.header.handle.into(),
                    program_id: 0,
                    name: String::new(),
                    direct_action: false,
                };
                let mut is_bpf = false;
                for attribute in filter.attributes {
                    match attribute {
                        TcAttribute::Kind(kind) => is_bpf = kind == TcFilterBpf::KIND,
                        TcAttribute::Options(options) => {
                            for option in options {
                                match option {
                                    TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => {
                                        listed.program_id = id
                                    }
                                    TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => {
                                        listed.name = name
                                    }
                                    TcOption::Bpf(TcFilterBpfOption::Flags(flags)) => {
                                        listed.direct_action =
                                            flags.contains(TcBpfFlags::DirectAction)
                                    }
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
                is_bpf.then_some(listed)
            },
        )?;
        filters.sort_by_key(|f| (f.priority, f.handle));
        Ok(filters)
    }
}

/// One entry of a neighbour-table dump, decoded.
struct DumpedNeighbour {
    mac: Option<[u8; 6]>,
    dst: Option<IpAddr>,
    permanent: bool,
    flags: NeighbourFlags,
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

/// A destination as an IP address. In a bridge-family message the parser cannot know the
/// address family and keeps the bytes.
fn ip_of(address: &NeighbourAddress) -> Option<IpAddr> {
    match address {
        NeighbourAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        NeighbourAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes.as_slice())
                .ok()
                .map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

fn link_of(message: LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        controller: None,
        up: message.header.flags.contains(LinkFlags::Up),
        queues: (0, 0),
    };
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            LinkAttribute::Address(bytes) => link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            LinkAttribute::Controller(index) if index != 0 => link.controller = Some(index),
            LinkAttribute::NumTxQueues(queues) => link.queues.0 = queues,
            LinkAttribute::NumRxQueues(queues) => link.queues.1 = queues,
            _ => {}
        }
    }
    link
}

/// A link asked for with one transmit and one receive queue.
fn one_queue<T>(builder: LinkMessageBuilder<T>) -> LinkMessageBuilder<T> {
    builder
        .append_extra_attribute(LinkAttribute::NumTxQueues(1))
        .append_extra_attribute(LinkAttribute::NumRxQueues(1))
}
