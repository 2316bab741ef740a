//! Commands for network engineers: what gossip knows, as this node sees it.

use anyhow::Result;
use clap::Subcommand;

use crate::{
    api::{GossipMembers, GossipTableRow},
    client::Client,
    output::{json, table, Format},
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
