//! What this node's overlays put in the kernel's neighbour table, for its sizing
//! (`shoal_dataplane::neighbours`).

use std::collections::HashSet;

use shoal_dataplane::neighbours::{NeighbourDemand, NetworkDemand};
use shoal_gossip::MemberState;

use super::{node_endpoint_key, NodeNetworks};

impl NodeNetworks {
    /// Cluster size from gossip, and per network its endpoints and this node's tasks.
    pub async fn neighbour_demand(&self) -> NeighbourDemand {
        let cluster_nodes = match self.gossip() {
            Some(gossip) => gossip.members().await.map_or(0, |members| {
                members
                    .iter()
                    .filter(|m| m.state != MemberState::Down)
                    .count()
            }),
            None => 0,
        };
        let users = self.users.lock().expect("users").clone();
        let ingress = self.ingress_network();
        let node_key = node_endpoint_key(&self.node_id);
        let tasks_on = |net: &str| {
            users
                .get(net)
                .map_or(0, |local| local.iter().filter(|k| **k != node_key).count())
        };
        let networks = self
            .overlay
            .networks()
            .iter()
            .map(|net| NetworkDemand {
                // The node's own endpoint on ingress is one of its users, as tasks are.
                endpoints: count(
                    self.overlay.remote_endpoints(net) + users.get(net).map_or(0, |u| u.len()),
                ),
                local_tasks: count(tasks_on(net)),
                ingress: ingress.as_deref() == Some(net.as_str()),
            })
            .collect();
        let local_tasks: HashSet<&String> = users
            .values()
            .flatten()
            .filter(|k| **k != node_key)
            .collect();
        NeighbourDemand {
            cluster_nodes: count(cluster_nodes),
            local_tasks: count(local_tasks.len()),
            networks,
        }
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
