//! The plaintext inside sealed packets (postcard-encoded).
//!
//! Postcard is not self-describing: a struct cannot grow a field without breaking the
//! decoders of older agents. So a payload is its first-format encoding, followed, when any
//! record carries a newer field, by a `RecordExtensions` trailer. Older agents stop reading
//! at the end of what they know (postcard's `from_bytes` leaves trailing bytes alone); newer
//! ones read the trailer when there is one, and records from older agents simply have none.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::identity::NodeIdentity;
use crate::record::{EndpointHealth, EndpointRecord};
use crate::table::Entry;

/// The fields records gained after the first format, one element per record of the payload
/// in its order (tombstones have no record). Grows at its end, as a payload does.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordExtensions {
    pub health: Vec<Option<EndpointHealth>>,
}

/// A payload that holds endpoint records, in a fixed order.
pub trait HoldsRecords {
    fn records(&self) -> Vec<&EndpointRecord>;
    fn records_mut(&mut self) -> Vec<&mut EndpointRecord>;
}

/// `payload`'s encoding, with the extensions trailer when a record needs one.
pub fn encode<T: Serialize + HoldsRecords>(payload: &T) -> postcard::Result<Vec<u8>> {
    let mut bytes = postcard::to_allocvec(payload)?;
    let health: Vec<Option<EndpointHealth>> = payload.records().iter().map(|r| r.health).collect();
    if health.iter().any(Option::is_some) {
        bytes.extend(postcard::to_allocvec(&RecordExtensions { health })?);
    }
    Ok(bytes)
}

/// Decodes what `encode` made, or an older agent's payload (no trailer). A trailer that does
/// not fit the records is ignored: the records keep their first-format fields.
pub fn decode<T: DeserializeOwned + HoldsRecords>(bytes: &[u8]) -> postcard::Result<T> {
    let (mut payload, rest) = postcard::take_from_bytes::<T>(bytes)?;
    if rest.is_empty() {
        return Ok(payload);
    }
    if let Ok((extensions, _)) = postcard::take_from_bytes::<RecordExtensions>(rest) {
        let mut records = payload.records_mut();
        if extensions.health.len() == records.len() {
            for (record, health) in records.iter_mut().zip(extensions.health) {
                record.health = health;
            }
        }
    }
    Ok(payload)
}

/// A datagram's payload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Message {
    /// A foca (SWIM) packet.
    Swim(Vec<u8>),
    /// Table writes being disseminated.
    Updates(Vec<Update>),
}

/// One table write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Update {
    /// The cluster-wide table of which node is on which network (key `net/node`).
    Membership { key: String, entry: Entry<()> },
    /// A write to one network's endpoint table.
    Endpoint {
        net: String,
        key: String,
        entry: Entry<EndpointRecord>,
    },
}

/// One network's table as a sync carries it: every entry, tombstones included.
pub type TableDump = Vec<(String, Entry<EndpointRecord>)>;

/// A full-state sync message, request or response: the SWIM members the sender holds up,
/// the whole membership table and the tables of the networks the two nodes share.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SyncState {
    /// Alive or Suspect members with their incarnations, the sender included (memberlist's
    /// push-pull): a joiner learns the whole cluster at once, and a member one missed
    /// (gossip is probabilistic) is learned at the next sync. Failures are left to SWIM.
    pub members: Vec<(NodeIdentity, u16)>,
    pub membership: Vec<(String, Entry<()>)>,
    pub networks: Vec<(String, TableDump)>,
}

impl HoldsRecords for Message {
    fn records(&self) -> Vec<&EndpointRecord> {
        match self {
            Message::Swim(_) => vec![],
            Message::Updates(updates) => updates.iter().filter_map(Update::record).collect(),
        }
    }

    fn records_mut(&mut self) -> Vec<&mut EndpointRecord> {
        match self {
            Message::Swim(_) => vec![],
            Message::Updates(updates) => {
                updates.iter_mut().filter_map(Update::record_mut).collect()
            }
        }
    }
}

impl Update {
    fn record(&self) -> Option<&EndpointRecord> {
        match self {
            Update::Endpoint { entry, .. } => entry.value.as_ref(),
            Update::Membership { .. } => None,
        }
    }

    fn record_mut(&mut self) -> Option<&mut EndpointRecord> {
        match self {
            Update::Endpoint { entry, .. } => entry.value.as_mut(),
            Update::Membership { .. } => None,
        }
    }
}

/// A sync as sent: the sender's node id and its state.
impl HoldsRecords for (String, SyncState) {
    fn records(&self) -> Vec<&EndpointRecord> {
        self.1
            .networks
            .iter()
            .flat_map(|(_, dump)| dump.iter().filter_map(|(_, e)| e.value.as_ref()))
            .collect()
    }

    fn records_mut(&mut self) -> Vec<&mut EndpointRecord> {
        self.1
            .networks
            .iter_mut()
            .flat_map(|(_, dump)| dump.iter_mut().filter_map(|(_, e)| e.value.as_mut()))
            .collect()
    }
}

/// The membership table key for a node on a network. Network names hold no `/`.
pub fn membership_key(net: &str, node: &str) -> String {
    format!("{net}/{node}")
}

/// Splits a membership key into network and node.
pub fn split_membership_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::sample_endpoint;
    use crate::table::Version;

    fn update(task: u32, health: Option<EndpointHealth>) -> Update {
        let mut record = sample_endpoint(1, task);
        record.health = health;
        Update::Endpoint {
            net: "n".into(),
            key: record.task_id.clone(),
            entry: Entry {
                version: Version {
                    time: u64::from(task),
                    node: "node1".into(),
                },
                value: Some(record),
            },
        }
    }

    fn tombstone() -> Update {
        Update::Endpoint {
            net: "n".into(),
            key: "gone".into(),
            entry: Entry {
                version: Version {
                    time: 9,
                    node: "node1".into(),
                },
                value: None,
            },
        }
    }

    #[test]
    fn records_without_new_fields_encode_as_the_first_format_did() {
        let message = Message::Updates(vec![update(1, None), tombstone()]);
        assert_eq!(
            encode(&message).unwrap(),
            postcard::to_allocvec(&message).unwrap()
        );
    }

    #[test]
    fn health_survives_a_round_trip_and_older_agents_still_read_the_records() {
        let message = Message::Updates(vec![
            update(1, Some(EndpointHealth::Unhealthy)),
            tombstone(),
            update(2, None),
            update(3, Some(EndpointHealth::Starting)),
        ]);
        let bytes = encode(&message).unwrap();
        let Message::Updates(read) = decode::<Message>(&bytes).unwrap() else {
            panic!("not updates");
        };
        let Message::Updates(sent) = &message else {
            unreachable!()
        };
        assert_eq!(&read, sent);
        // An older agent decodes the first-format part and never sees the trailer.
        let Message::Updates(old) = postcard::from_bytes::<Message>(&bytes).unwrap() else {
            panic!("not updates");
        };
        let healths: Vec<_> = old
            .iter()
            .filter_map(|u| u.record().map(|r| r.health))
            .collect();
        assert_eq!(healths, [None, None, None]);
        assert_eq!(old.len(), 4);
    }

    #[test]
    fn an_older_agents_payload_decodes_without_health() {
        let message = Message::Updates(vec![update(1, None)]);
        let old_bytes = postcard::to_allocvec(&message).unwrap();
        let Message::Updates(read) = decode::<Message>(&old_bytes).unwrap() else {
            panic!("not updates");
        };
        assert_eq!(read[0].record().unwrap().health, None);
    }

    #[test]
    fn syncs_carry_health_too() {
        let Update::Endpoint { key, entry, .. } = update(1, Some(EndpointHealth::Healthy)) else {
            unreachable!()
        };
        let sync = (
            "node1".to_owned(),
            SyncState {
                networks: vec![("n".into(), vec![(key, entry)])],
                ..SyncState::default()
            },
        );
        let read = decode::<(String, SyncState)>(&encode(&sync).unwrap()).unwrap();
        assert_eq!(
            read.1.networks[0].1[0].1.value.as_ref().unwrap().health,
            Some(EndpointHealth::Healthy)
        );
        let old = postcard::from_bytes::<(String, SyncState)>(&encode(&sync).unwrap()).unwrap();
        assert_eq!(
            old.1.networks[0].1[0].1.value.as_ref().unwrap().health,
            None
        );
    }
}
