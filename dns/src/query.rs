//! One query on the wire → what to do with it: reply at once, drop, or forward. Synchronous and
//! free of I/O so the fast path (cluster names) never leaves the receiving task, and so it can be
//! fuzzed directly.

use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::forward::ForwardError;
use crate::records::{QueryKind, Records, Resolution};
use crate::stats::Outcome;

/// TTL of every cluster answer. Short because tasks come and go every few seconds during a
/// rolling update and gossip converges in about as long; Swarm's 600 s left clients dialling
/// tasks long gone. Lookups are local and cheap, so a short TTL costs nothing.
pub const CLUSTER_TTL_SECS: u32 = 5;

/// The UDP payload size we advertise in our own EDNS record (the DNS flag day 2020 value).
const ADVERTISED_UDP_PAYLOAD: u16 = 1232;

const HEADER_LEN: usize = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// What to do with a received message.
#[derive(Debug)]
pub(crate) enum Step {
    Reply(Vec<u8>, Outcome),
    Drop,
    Forward(ForwardRequest),
}

/// A query for a name the cluster does not own, kept decoded to answer SERVFAIL or to truncate.
#[derive(Debug)]
pub(crate) struct ForwardRequest {
    pub(crate) wire: Vec<u8>,
    request: Message,
    reply_limit: usize,
}

pub(crate) fn handle(
    records: &Records,
    scope: &[String],
    wire: &[u8],
    transport: Transport,
) -> Step {
    // Too short for a header: nothing to address a reply to. A response: never answer one, so
    // we cannot be used to reflect traffic.
    if wire.len() < HEADER_LEN || wire[2] & 0x80 != 0 {
        return Step::Drop;
    }
    let Ok(request) = Message::from_vec(wire) else {
        return Step::Reply(
            header_only_error(wire, ResponseCode::FormErr),
            Outcome::FormErr,
        );
    };
    if request.metadata.op_code != OpCode::Query {
        return error_reply(&request, ResponseCode::NotImp, Outcome::Refused);
    }
    let [query] = request.queries.as_slice() else {
        return error_reply(&request, ResponseCode::FormErr, Outcome::FormErr);
    };
    if query.query_class() != DNSClass::IN {
        return error_reply(&request, ResponseCode::Refused, Outcome::Refused);
    }
    let reply_limit = match transport {
        Transport::Udp => usize::from(request.max_payload()),
        Transport::Tcp => usize::from(u16::MAX),
    };
    let Some(name) = plain_name(query.name()) else {
        return Step::Forward(ForwardRequest {
            wire: wire.to_vec(),
            request,
            reply_limit,
        });
    };
    let kind = match query.query_type() {
        RecordType::A => QueryKind::A,
        RecordType::PTR => QueryKind::Ptr,
        _ => QueryKind::Other,
    };
    let (answers, code, outcome) = match records.resolve(scope, &name, kind) {
        Resolution::Addresses(ips) => (
            ips.into_iter()
                .map(|ip: Ipv4Addr| RData::A(A(ip)))
                .collect(),
            ResponseCode::NoError,
            Outcome::AnsweredLocally,
        ),
        Resolution::Pointer(target) => match Name::from_ascii(&target) {
            Ok(target) => (
                vec![RData::PTR(PTR(target))],
                ResponseCode::NoError,
                Outcome::AnsweredLocally,
            ),
            Err(_) => (Vec::new(), ResponseCode::NoError, Outcome::NoData),
        },
        Resolution::NoData => (Vec::new(), ResponseCode::NoError, Outcome::NoData),
        Resolution::NxDomain => (Vec::new(), ResponseCode::NXDomain, Outcome::NxDomain),
        Resolution::NotOurs => {
            return Step::Forward(ForwardRequest {
                wire: wire.to_vec(),
                request,
                reply_limit,
            })
        }
    };
    let mut response = response_to(&request, code);
    response.metadata.authoritative = true;
    let owner = query.name().clone();
    response.add_answers(
        answers
            .into_iter()
            .map(|rdata| Record::from_rdata(owner.clone(), CLUSTER_TTL_SECS, rdata)),
    );
    Step::Reply(encode_within(&response, reply_limit), outcome)
}

impl ForwardRequest {
    /// The reply for the client from the upstream's answer (or failure), within its size limit.
    pub(crate) fn reply(&self, upstream: Result<Vec<u8>, ForwardError>) -> (Vec<u8>, Outcome) {
        match upstream {
            Ok(reply) if reply.len() <= self.reply_limit => (reply, Outcome::Forwarded),
            Ok(reply) => match Message::from_vec(&reply) {
                Ok(message) => (
                    encode_within(&message.truncate(), self.reply_limit),
                    Outcome::Forwarded,
                ),
                Err(_) => (self.servfail(), Outcome::ServFail),
            },
            Err(_) => (self.servfail(), Outcome::ServFail),
        }
    }

    pub(crate) fn servfail(&self) -> Vec<u8> {
        encode_within(
            &response_to(&self.request, ResponseCode::ServFail),
            self.reply_limit,
        )
    }
}

/// The name as lower-case text without the trailing dot, or `None` when a label holds bytes that
/// no cluster name has (dots, non-UTF-8): such names are never ours.
fn plain_name(name: &Name) -> Option<String> {
    let mut text = String::new();
    for label in name.iter() {
        let label = std::str::from_utf8(label).ok()?;
        if label.contains('.') {
            return None;
        }
        if !text.is_empty() {
            text.push('.');
        }
        text.push_str(&label.to_ascii_lowercase());
    }
    Some(text)
}

/// A response carrying the request's question, id, RD flag and, if it used EDNS, ours.
fn response_to(request: &Message, code: ResponseCode) -> Message {
    let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.response_code = code;
    response.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(ADVERTISED_UDP_PAYLOAD);
        response.set_edns(edns);
    }
    response
}

fn error_reply(request: &Message, code: ResponseCode, outcome: Outcome) -> Step {
    Step::Reply(
        encode_within(&response_to(request, code), usize::from(u16::MAX)),
        outcome,
    )
}

/// Encodes, falling back to an empty truncated (TC) response when the full one exceeds what the
/// client can receive: the client then retries over TCP.
fn encode_within(response: &Message, limit: usize) -> Vec<u8> {
    match response.to_vec() {
        Ok(wire) if wire.len() <= limit => wire,
        Ok(_) => match response.truncate().to_vec() {
            Ok(wire) if wire.len() <= limit => wire,
            _ => header_only_error(&header_of(response), ResponseCode::ServFail),
        },
        Err(_) => header_only_error(&header_of(response), ResponseCode::ServFail),
    }
}

fn header_of(message: &Message) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..2].copy_from_slice(&message.metadata.id.to_be_bytes());
    header[2] =
        u8::from(message.metadata.op_code) << 3 | u8::from(message.metadata.recursion_desired);
    header
}

/// A bare header answering `wire` (which has at least a header): same id, opcode and RD, the given
/// code, no sections. Used when the query cannot be decoded or a response cannot be encoded.
fn header_only_error(wire: &[u8], code: ResponseCode) -> Vec<u8> {
    let mut reply = vec![0u8; HEADER_LEN];
    reply[..2].copy_from_slice(&wire[..2]);
    // QR set; opcode and RD copied; AA, TC cleared.
    reply[2] = 0x80 | (wire[2] & 0x79);
    // RA set; rcode.
    reply[3] = 0x80 | (code.low() & 0x0f);
    reply
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use proptest::prelude::*;

    use super::*;
    use crate::records::TaskEndpoint;

    fn records() -> Records {
        Records::from_endpoints(&[TaskEndpoint {
            network: "front".into(),
            task_name: "web.1.aaa".into(),
            service_name: "web".into(),
            ip: [10, 0, 1, 3].into(),
            vip: Some([10, 0, 1, 2].into()),
            serving: true,
        }])
    }

    fn scope() -> Vec<String> {
        vec!["front".into()]
    }

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut message = Message::new(7, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        message.to_vec().unwrap()
    }

    fn reply(step: Step) -> (Message, Outcome) {
        match step {
            Step::Reply(wire, outcome) => (Message::from_vec(&wire).unwrap(), outcome),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn cluster_name_is_answered_with_short_ttl_and_the_question() {
        let (response, outcome) = reply(handle(
            &records(),
            &scope(),
            &query("Web.", RecordType::A),
            Transport::Udp,
        ));
        assert_eq!(outcome, Outcome::AnsweredLocally);
        assert_eq!(response.metadata.id, 7);
        assert!(response.metadata.authoritative && response.metadata.recursion_desired);
        assert_eq!(response.queries.len(), 1);
        assert_eq!(response.answers.len(), 1);
        assert_eq!(response.answers[0].ttl, CLUSTER_TTL_SECS);
        assert_eq!(response.answers[0].data, RData::A(A([10, 0, 1, 2].into())));
    }

    #[test]
    fn aaaa_for_a_cluster_name_is_nodata() {
        let (response, outcome) = reply(handle(
            &records(),
            &scope(),
            &query("web.", RecordType::AAAA),
            Transport::Udp,
        ));
        assert_eq!(outcome, Outcome::NoData);
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.answers.is_empty());
    }

    #[test]
    fn ptr_is_answered() {
        let (response, _) = reply(handle(
            &records(),
            &scope(),
            &query("3.1.0.10.in-addr.arpa.", RecordType::PTR),
            Transport::Udp,
        ));
        assert_eq!(
            response.answers[0].data,
            RData::PTR(PTR(Name::from_ascii("web.1.aaa.").unwrap()))
        );
    }

    #[test]
    fn external_names_are_forwarded() {
        let step = handle(
            &records(),
            &scope(),
            &query("example.com.", RecordType::A),
            Transport::Udp,
        );
        assert!(matches!(step, Step::Forward(_)));
    }

    #[test]
    fn an_answer_larger_than_the_client_buffer_is_truncated() {
        let endpoints: Vec<_> = (0..100u8)
            .map(|i| TaskEndpoint {
                network: "front".into(),
                task_name: format!("big.{i}.x"),
                service_name: "big".into(),
                ip: [10, 0, 3, i].into(),
                vip: None,
                serving: true,
            })
            .collect();
        let records = Records::from_endpoints(&endpoints);
        let wire = query("big.", RecordType::A);
        let (udp, _) = reply(handle(&records, &scope(), &wire, Transport::Udp));
        assert!(udp.metadata.truncation && udp.answers.is_empty());
        let (tcp, _) = reply(handle(&records, &scope(), &wire, Transport::Tcp));
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 100);
    }

    #[test]
    fn malformed_and_odd_messages() {
        let records = records();
        assert!(matches!(
            handle(&records, &scope(), &[1, 2, 3], Transport::Udp),
            Step::Drop
        ));
        // A header announcing one question that is not there.
        let truncated = [0, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let (response, outcome) = reply(handle(&records, &scope(), &truncated, Transport::Udp));
        assert_eq!(outcome, Outcome::FormErr);
        assert_eq!(response.metadata.id, 9);
        assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
        // A response is never answered.
        let mut response_bit = query("web.", RecordType::A);
        response_bit[2] |= 0x80;
        assert!(matches!(
            handle(&records, &scope(), &response_bit, Transport::Udp),
            Step::Drop
        ));
        // NOTIFY (opcode 4).
        let mut notify = query("web.", RecordType::A);
        notify[2] = (notify[2] & 0x87) | (4 << 3);
        let (response, outcome) = reply(handle(&records, &scope(), &notify, Transport::Udp));
        assert_eq!(outcome, Outcome::Refused);
        assert_eq!(response.metadata.response_code, ResponseCode::NotImp);
    }

    /// The contract the fuzz tests check for any input: a drop only for what has no header or is
    /// a response; otherwise a reply that decodes, carries the request's id and QR and fits the
    /// client's limit (FORMERR when the message does not decode), or a forward of a decodable
    /// query whose every outcome fits the limit too.
    fn check_contract(wire: &[u8], transport: Transport, step: Step) {
        let headerless = wire.len() < HEADER_LEN || wire[2] & 0x80 != 0;
        let decoded = Message::from_vec(wire).ok();
        let limit = match (transport, &decoded) {
            (Transport::Tcp, _) => usize::from(u16::MAX),
            (Transport::Udp, Some(request)) => usize::from(request.max_payload()),
            (Transport::Udp, None) => 512,
        };
        match step {
            Step::Drop => assert!(headerless, "dropped a query: {wire:02x?}"),
            Step::Reply(reply, outcome) => {
                assert!(
                    !headerless,
                    "answered a response or a fragment: {wire:02x?}"
                );
                let response = Message::from_vec(&reply).unwrap_or_else(|e| {
                    panic!("undecodable reply {reply:02x?} to {wire:02x?}: {e}")
                });
                assert_eq!(reply[..2], wire[..2]);
                assert_eq!(response.metadata.message_type, MessageType::Response);
                assert!(reply.len() <= limit, "{} > {limit}", reply.len());
                if decoded.is_none() {
                    assert_eq!(outcome, Outcome::FormErr);
                    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
                }
            }
            Step::Forward(request) => {
                assert!(decoded.is_some() && !headerless);
                // An upstream's reply (here: garbage of any size) never exceeds the limit.
                let garbage = wire.repeat(1 + usize::from(u16::MAX) / wire.len().max(1));
                for upstream in [
                    Ok(wire.to_vec()),
                    Ok(garbage),
                    Err(ForwardError::AllUpstreamsFailed),
                ] {
                    let (reply, _) = request.reply(upstream);
                    assert!(reply.len() <= limit);
                }
                let servfail = Message::from_vec(&request.servfail()).expect("SERVFAIL decodes");
                assert_eq!(servfail.metadata.response_code, ResponseCode::ServFail);
            }
        }
    }

    /// Valid queries the mutations start from: every kind of name the handler tells apart.
    fn corpus() -> Vec<Vec<u8>> {
        let mut corpus: Vec<Vec<u8>> = [
            ("web.", RecordType::A),
            ("tasks.web.front.", RecordType::A),
            ("web.1.aaa.", RecordType::AAAA),
            ("3.1.0.10.in-addr.arpa.", RecordType::PTR),
            ("example.com.", RecordType::MX),
            ("db.", RecordType::A),
            (".", RecordType::NS),
        ]
        .into_iter()
        .map(|(name, kind)| query(name, kind))
        .collect();
        let mut edns = Message::new(3, MessageType::Query, OpCode::Query);
        edns.add_query(Query::query(
            Name::from_ascii("web.").unwrap(),
            RecordType::A,
        ));
        let mut opt = Edns::new();
        opt.set_max_payload(4096);
        edns.set_edns(opt);
        corpus.push(edns.to_vec().unwrap());
        corpus
    }

    #[derive(Clone, Debug)]
    enum Mutation {
        Set(usize, u8),
        Truncate(usize),
        Insert(usize, u8),
        /// Appends a copy of a slice of the message (repeated labels, pointers to odd places).
        Splice(usize, usize),
    }

    fn mutate(mut wire: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
        for mutation in mutations {
            let len = wire.len();
            match *mutation {
                Mutation::Set(at, byte) if len > 0 => wire[at % len] = byte,
                Mutation::Truncate(at) => wire.truncate(at % (len + 1)),
                Mutation::Insert(at, byte) => wire.insert(at % (len + 1), byte),
                Mutation::Splice(from, count) if len > 0 => {
                    let from = from % len;
                    wire.extend(wire[from..(from + count).min(len)].to_vec());
                }
                Mutation::Set(..) | Mutation::Splice(..) => {}
            }
        }
        wire
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            4 => (0usize..64, any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
            1 => (0usize..64).prop_map(Mutation::Truncate),
            1 => (0usize..64, any::<u8>()).prop_map(|(at, b)| Mutation::Insert(at, b)),
            1 => (0usize..64, 1usize..32).prop_map(|(at, n)| Mutation::Splice(at, n)),
        ]
    }

    /// Seeded, so a run in the normal suite is reproducible; bounded to a few thousand cases per
    /// property (about a second in a debug build).
    fn fuzz_config(seed: u64) -> ProptestConfig {
        ProptestConfig {
            cases: 4000,
            rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(fuzz_config(20_261_122))]

        #[test]
        fn fuzz_random_bytes(wire in proptest::collection::vec(any::<u8>(), 0..600)) {
            let records = records();
            for transport in [Transport::Udp, Transport::Tcp] {
                check_contract(&wire, transport, handle(&records, &scope(), &wire, transport));
            }
        }

        #[test]
        fn fuzz_random_bodies_behind_a_query_header(
            id in any::<u16>(),
            counts in proptest::collection::vec(0u8..3, 4),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut wire = id.to_be_bytes().to_vec();
            wire.extend([0x01, 0x00]);
            for count in counts {
                wire.extend([0, count]);
            }
            wire.extend(body);
            let records = records();
            check_contract(&wire, Transport::Udp, handle(&records, &scope(), &wire, Transport::Udp));
        }

        #[test]
        fn fuzz_mutated_queries(
            pick in any::<prop::sample::Index>(),
            mutations in proptest::collection::vec(mutation(), 1..6),
        ) {
            let corpus = corpus();
            let wire = mutate(pick.get(&corpus).clone(), &mutations);
            let records = records();
            for transport in [Transport::Udp, Transport::Tcp] {
                check_contract(&wire, transport, handle(&records, &scope(), &wire, transport));
            }
        }
    }
}
