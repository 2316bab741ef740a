//! Commands for network engineers: what gossip knows and what the load balancer does, as
//! this node sees it.

use anyhow::Result;
use clap::Subcommand;
use std::net::SocketAddrV4;

use shoal_dataplane::mesh::{Protocol, TrackedFlow};
use shoal_dns::DnsStats;

use shoal_cluster::networking::{DnsAnswer, DnsLookup, IngressPort, IngressTrace, LoadBalancer};

use crate::{
    client::Client,
    output::{json, table, Format},
    server::{GossipMembers, GossipTableRow},
};

#[derive(Subcommand)]
pub enum GossipCommand {
    /// Gossip members as this node sees them, and its packet counters
    Members {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// The endpoint table of a network as this node holds it, tombstones included
    Tables {
        network: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

pub async fn gossip(client: &Client, command: GossipCommand) -> Result<()> {
    match command {
        GossipCommand::Members { format } => {
            let answer: GossipMembers = client.get("/v1/gossip/members").await?;
            match format {
                Format::Json => print!("{}", json(&answer)),
                Format::Table => {
                    let rows: Vec<[String; 4]> = answer
                        .members
                        .iter()
                        .map(|m| {
                            [
                                m.node_id.clone(),
                                m.addr.to_string(),
                                format!("{:?}", m.state),
                                m.incarnation.to_string(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(["NODE", "ADDRESS", "STATE", "INCARNATION"], &rows)
                    );
                    let s = &answer.stats;
                    println!(
                        "\npackets dropped: {} failed authentication, {} replayed, {} malformed",
                        s.auth_failures, s.replays_dropped, s.malformed_dropped
                    );
                }
            }
        }
        GossipCommand::Tables { network, format } => {
            let rows: Vec<GossipTableRow> =
                client.get(&format!("/v1/gossip/tables/{network}")).await?;
            match format {
                Format::Json => print!("{}", json(&rows)),
                Format::Table => {
                    let rows: Vec<[String; 7]> = rows
                        .iter()
                        .map(|r| {
                            let (name, ip, node) = match &r.record {
                                Some(e) => {
                                    (e.task_name.clone(), e.ip.to_string(), e.vtep.to_string())
                                }
                                None => ("-".into(), "-".into(), "-".into()),
                            };
                            let state = match (&r.record, r.live) {
                                (None, _) => "deleted",
                                (Some(_), true) => "live",
                                (Some(_), false) => "node down",
                            };
                            [
                                r.key.clone(),
                                name,
                                ip,
                                node,
                                state.into(),
                                r.version.to_string(),
                                r.writer.clone(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(
                            ["KEY", "TASK", "IP", "VTEP", "STATE", "VERSION", "WRITER"],
                            &rows
                        )
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum LbCommand {
    /// Service VIPs this node balances, with their backends (read from the kernel maps)
    Ls {
        /// Only this service's VIPs
        service: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

pub async fn lb(client: &Client, command: LbCommand) -> Result<()> {
    let LbCommand::Ls { service, format } = command;
    let mut rows: Vec<LoadBalancer> = client.get("/v1/lb").await?;
    if let Some(service) = &service {
        rows.retain(|r| r.service == *service);
    }
    match format {
        Format::Json => print!("{}", json(&rows)),
        Format::Table => {
            let rows: Vec<[String; 5]> = rows
                .iter()
                .map(|r| {
                    [
                        r.service.clone(),
                        r.network.clone(),
                        r.entry.vip.to_string(),
                        r.entry.generation.to_string(),
                        r.entry
                            .backends
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                            // Its backends are unhealthy tasks: none of the service is healthy.
                            + if r.fail_open { " (fail open: none healthy)" } else { "" },
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    ["SERVICE", "NETWORK", "VIP", "GENERATION", "BACKENDS"],
                    &rows
                )
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum IngressCommand {
    /// Published ports this node answers on, their backends' share of the Maglev table and
    /// their counters (read from the kernel maps)
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Run a packet through the attached ingress program (BPF_PROG_TEST_RUN against the
    /// live maps) and show what it does: verdict, rewritten packet, backend and its node.
    /// A TCP packet is a SYN (a new connection); a flow the trace creates is removed.
    Trace {
        #[arg(long, default_value = "tcp")]
        proto: Protocol,
        /// The node address and port the packet is sent to
        #[arg(long)]
        dst: SocketAddrV4,
        /// The client's address and port
        #[arg(long)]
        src: SocketAddrV4,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

pub async fn ingress(client: &Client, command: IngressCommand) -> Result<()> {
    let format = match command {
        IngressCommand::Ls { format } => format,
        IngressCommand::Trace {
            proto,
            dst,
            src,
            format,
        } => return ingress_trace(client, proto, src, dst, format).await,
    };
    let ports: Vec<IngressPort> = client.get("/v1/ingress").await?;
    match format {
        Format::Json => print!("{}", json(&ports)),
        Format::Table => {
            let rows: Vec<[String; 7]> = ports
                .iter()
                .map(|p| {
                    let s = &p.status;
                    let mode = if s.snat { "snat" } else { "client" };
                    let c = &s.counters;
                    [
                        p.service.clone(),
                        format!("{}/{}", s.published, s.protocol.name()),
                        format!("{} ({mode})", s.target),
                        s.backends
                            .iter()
                            .map(|(ip, slots)| format!("{ip}={slots}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        c.flows.to_string(),
                        format!("{}/{}", c.packets_in, c.packets_out),
                        refusals(c),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    [
                        "SERVICE",
                        "PUBLISHED",
                        "TARGET (SOURCE)",
                        "BACKENDS=SLOTS",
                        "FLOWS",
                        "PACKETS IN/OUT",
                        "REFUSED"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(())
}

/// A published port's refused packets by reason, the ones that happened: `-` for none.
fn refusals(c: &shoal_dataplane::mesh::MeshServiceCounters) -> String {
    let reasons = [
        ("no_backend", c.no_backend),
        ("snat_exhausted", c.snat_exhausted),
        ("flow_table_full", c.flow_table_full),
        ("rewrite_failed", c.rewrite_failed),
    ];
    let seen: Vec<String> = reasons
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(reason, n)| format!("{reason}={n}"))
        .collect();
    if seen.is_empty() {
        "-".to_owned()
    } else {
        seen.join(",")
    }
}

async fn ingress_trace(
    client: &Client,
    proto: Protocol,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    format: Format,
) -> Result<()> {
    let trace: IngressTrace = client
        .get(&format!(
            "/v1/ingress/trace?protocol={}&source={src}&destination={dst}",
            proto.name()
        ))
        .await?;
    if format == Format::Json {
        print!("{}", json(&trace));
        return Ok(());
    }
    let r = &trace.result;
    println!("packet in:   {}", r.packet_in);
    println!(
        "verdict:     {} (return code {}): {}",
        r.verdict, r.return_code, r.reason
    );
    println!("packet out:  {}", r.packet_out);
    match r.slot {
        Some(slot) if r.tracked => println!("decided by:  the flow table (slot {slot} not used)"),
        Some(slot) => println!("decided by:  Maglev slot {slot}"),
        None => println!("decided by:  no published port: left to the kernel"),
    }
    if let Some(backend) = r.backend {
        let source = r.source_seen.map(|s| s.to_string()).unwrap_or_default();
        println!("backend:     {backend} (sees the client as {source})");
    }
    if let Some(task) = &trace.backend_task {
        println!(
            "task:        {} on node {} ({})",
            task.task, task.node_id, task.node_address
        );
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum ConntrackCommand {
    /// Flows the routing mesh translated on this node, most recently active first
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

pub async fn conntrack(client: &Client, command: ConntrackCommand) -> Result<()> {
    let ConntrackCommand::Ls { format } = command;
    let flows: Vec<TrackedFlow> = client.get("/v1/conntrack").await?;
    match format {
        Format::Json => print!("{}", json(&flows)),
        Format::Table => {
            let rows: Vec<[String; 6]> = flows
                .iter()
                .map(|f| {
                    [
                        f.protocol.name().to_owned(),
                        f.client.to_string(),
                        f.published.to_string(),
                        f.backend.to_string(),
                        f.state.clone(),
                        format!("{}s", f.idle_secs),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    ["PROTO", "CLIENT", "PUBLISHED", "BACKEND", "STATE", "IDLE"],
                    &rows
                )
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum DnsCommand {
    /// What a task on this node would get for NAME from the embedded DNS, and why
    Lookup {
        name: String,
        /// The asking task (ID, ID prefix or name), on this node
        #[arg(long)]
        task: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Queries answered by this node's embedded DNS since the agent started, by outcome
    Stats {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

pub async fn dns(client: &Client, command: DnsCommand) -> Result<()> {
    let (name, task, format) = match command {
        DnsCommand::Lookup { name, task, format } => (name, task, format),
        DnsCommand::Stats { format } => return dns_stats(client, format).await,
    };
    let path = format!(
        "/v1/dns/lookup?task={}&name={}",
        query_escape(&task),
        query_escape(&name)
    );
    let lookup: DnsLookup = client.get(&path).await?;
    match format {
        Format::Json => print!("{}", json(&lookup)),
        Format::Table => {
            println!(
                "{} (networks of the task: {})",
                lookup.name,
                lookup.networks.join(", ")
            );
            match &lookup.answer {
                DnsAnswer::Addresses(ips) => {
                    for ip in ips {
                        println!(
                            "  A {ip}  (cluster records, TTL {}s)",
                            shoal_dns::CLUSTER_TTL_SECS
                        );
                    }
                }
                DnsAnswer::Pointer(target) => println!("  PTR {target}  (cluster records)"),
                DnsAnswer::NoData => println!("  no records of this type (a cluster name)"),
                DnsAnswer::NxDomain => {
                    println!("  NXDOMAIN: not a service, task or network the task can see")
                }
                DnsAnswer::Forwarded(upstreams) => {
                    println!(
                        "  not a cluster name: forwarded to {}",
                        upstreams.join(", ")
                    )
                }
            }
        }
    }
    Ok(())
}

async fn dns_stats(client: &Client, format: Format) -> Result<()> {
    let stats: DnsStats = client.get("/v1/dns/stats").await?;
    match format {
        Format::Json => print!("{}", json(&stats)),
        Format::Table => {
            let rows: Vec<[String; 2]> = [
                ("answered locally", stats.answered_locally),
                ("nxdomain", stats.nxdomain),
                ("nodata", stats.nodata),
                ("forwarded", stats.forwarded),
                ("servfail", stats.servfail),
                ("formerr", stats.formerr),
                ("refused", stats.refused),
                ("dropped", stats.dropped),
            ]
            .into_iter()
            .map(|(outcome, count)| [outcome.to_owned(), count.to_string()])
            .collect();
            print!("{}", table(["OUTCOME", "QUERIES"], &rows));
        }
    }
    Ok(())
}

/// Percent-encodes everything but unreserved characters, for a query string.
fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
