//! The sealed wire format every gossip datagram and every TCP sync frame uses.
//!
//! ```text
//! offset  size  field (integers big-endian)           authenticated (AAD)
//! 0       2     magic "SG"                             yes
//! 2       1     format version (1)                     yes
//! 3       1     kind: 0 datagram, 1 sync request,      yes
//!               2 sync response
//! 4       4     key id = SHA-256(key)[0..4]            yes
//! 8       12    AES-GCM nonce                          yes
//! 20      1     sender node id length L (1..=128)      yes
//! 21      L     sender node id (UTF-8)                 yes
//! 21+L    8     sender boot epoch (UNIX ms)            yes
//! 29+L    8     sequence number (per sender and boot)  yes
//! 37+L    8     send time (UNIX ms)                    yes
//! 45+L    n+16  AES-256-GCM ciphertext of the payload and its tag
//! ```
//!
//! The nonce is SHA-256(boot salt, sender, epoch, sequence)[0..12]: the sequence never
//! repeats within a boot and the salt and epoch differ between boots, so a key never sees a
//! nonce twice. The sender encrypts with the second-newest key of its ring when it holds two
//! or more (the newest is only being distributed), and the receiver picks the key by id.
//!
//! Anti-replay: a packet is dropped when its send time is more than `max_age` away from the
//! receiver's clock (so clocks must agree within that bound: run NTP), when its epoch is older
//! than the newest epoch seen from that sender, or when its sequence number was already seen
//! or fell out of the 1,024-packet sliding window of that sender's boot (as in IPsec). The
//! window only moves for packets that authenticate.

use std::collections::HashMap;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::digest::{digest, SHA256};

const MAGIC: &[u8; 2] = b"SG";
const FORMAT_VERSION: u8 = 1;
const TAG_LEN: usize = 16;
const FIXED_HEADER_LEN: usize = 2 + 1 + 1 + 4 + 12 + 1;
const TRAILER_FIELDS_LEN: usize = 8 + 8 + 8;
/// The longest node id the header carries.
pub const MAX_NODE_ID_LEN: usize = 128;
/// The most bytes sealing adds to a payload (header with the longest node id, and the tag).
pub const MAX_OVERHEAD: usize = FIXED_HEADER_LEN + MAX_NODE_ID_LEN + TRAILER_FIELDS_LEN + TAG_LEN;
/// The most keys a ring holds: the one in use, the next one, and the previous one.
pub const MAX_KEYS: usize = 3;
const REPLAY_WINDOW: u64 = 1024;

/// What a sealed packet carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Datagram = 0,
    SyncRequest = 1,
    SyncResponse = 2,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            0 => Some(Kind::Datagram),
            1 => Some(Kind::SyncRequest),
            2 => Some(Kind::SyncResponse),
            _ => None,
        }
    }
}

/// Why a packet was dropped; each reason has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("packet does not authenticate (bad tag or unknown key)")]
    AuthFailure,
    #[error("packet was already received")]
    Replay,
    #[error("packet is too old, from the future, or from an older boot of its sender")]
    Stale,
    #[error("packet is malformed")]
    Malformed,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error("a keyring holds between 1 and {MAX_KEYS} keys, got {0}")]
    Size(usize),
}

/// The cluster's gossip keys, oldest first.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        let ids: Vec<[u8; 4]> = self.keys.iter().map(key_id).collect();
        f.debug_struct("Keyring").field("key_ids", &ids).finish()
    }
}

impl Keyring {
    /// Keys oldest first; the newest is only used for sending once a newer one arrives.
    pub fn new(keys: Vec<[u8; 32]>) -> Result<Keyring, KeyringError> {
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(KeyringError::Size(keys.len()));
        }
        Ok(Keyring { keys })
    }

    pub fn keys(&self) -> &[[u8; 32]] {
        &self.keys
    }

    /// The key senders use: the second-newest when there are two or more.
    fn sending_index(&self) -> usize {
        self.keys.len().saturating_sub(2)
    }
}

fn key_id(key: &[u8; 32]) -> [u8; 4] {
    let hash = digest(&SHA256, key);
    let mut id = [0; 4];
    id.copy_from_slice(&hash.as_ref()[..4]);
    id
}

struct SealingKey {
    id: [u8; 4],
    key: LessSafeKey,
}

impl SealingKey {
    fn new(material: &[u8; 32]) -> SealingKey {
        let unbound =
            UnboundKey::new(&AES_256_GCM, material).expect("AES-256-GCM takes any 32-byte key");
        SealingKey {
            id: key_id(material),
            key: LessSafeKey::new(unbound),
        }
    }
}

/// The authenticated header of an opened packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub sender: String,
    pub epoch: u64,
    pub seq: u64,
    pub sent_ms: u64,
}

/// Where each sender's replay window stands.
#[derive(Clone, Debug)]
struct ReplayWindow {
    epoch: u64,
    highest: u64,
    /// Bit i set: sequence `highest - i` was seen.
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl ReplayWindow {
    fn new(epoch: u64) -> ReplayWindow {
        ReplayWindow {
            epoch,
            highest: 0,
            seen: [0; (REPLAY_WINDOW / 64) as usize],
        }
    }

    fn bit(&self, offset: u64) -> bool {
        self.seen[(offset / 64) as usize] & (1 << (offset % 64)) != 0
    }

    fn fresh(&self, seq: u64) -> bool {
        if seq > self.highest {
            return true;
        }
        let offset = self.highest - seq;
        offset < REPLAY_WINDOW && !self.bit(offset)
    }

    fn record(&mut self, seq: u64) {
        if seq > self.highest {
            let shift = seq - self.highest;
            self.shift(shift);
            self.highest = seq;
        }
        let offset = self.highest - seq;
        self.seen[(offset / 64) as usize] |= 1 << (offset % 64);
    }

    /// Moves the window forward by `by` sequence numbers.
    fn shift(&mut self, by: u64) {
        if by >= REPLAY_WINDOW {
            self.seen = [0; (REPLAY_WINDOW / 64) as usize];
            return;
        }
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        let len = self.seen.len();
        for i in (0..len).rev() {
            let from_word = i.checked_sub(words);
            let high = from_word.map_or(0, |w| self.seen[w] << bits);
            let low = match (from_word.and_then(|w| w.checked_sub(1)), bits) {
                (Some(w), b) if b > 0 => self.seen[w] >> (64 - b),
                _ => 0,
            };
            self.seen[i] = high | low;
        }
    }
}

/// Seals outgoing packets and opens incoming ones for one node.
pub struct Sealer {
    node_id: String,
    epoch: u64,
    salt: u64,
    seq: u64,
    max_age_ms: u64,
    keys: Vec<SealingKey>,
    sending: usize,
    windows: HashMap<String, ReplayWindow>,
}

impl Sealer {
    pub fn new(node_id: &str, epoch: u64, salt: u64, max_age_ms: u64, keyring: &Keyring) -> Sealer {
        let mut sealer = Sealer {
            node_id: node_id.to_owned(),
            epoch,
            salt,
            seq: 0,
            max_age_ms,
            keys: Vec::new(),
            sending: 0,
            windows: HashMap::new(),
        };
        sealer.set_keyring(keyring);
        sealer
    }

    pub fn set_keyring(&mut self, keyring: &Keyring) {
        self.keys = keyring.keys.iter().map(SealingKey::new).collect();
        self.sending = keyring.sending_index();
    }

    pub fn seal(&mut self, kind: Kind, payload: &[u8], now_ms: u64) -> Vec<u8> {
        self.seq += 1;
        let key = &self.keys[self.sending];
        let nonce = self.nonce();
        let sender = self.node_id.as_bytes();
        let mut packet = Vec::with_capacity(payload.len() + MAX_OVERHEAD);
        packet.extend_from_slice(MAGIC);
        packet.push(FORMAT_VERSION);
        packet.push(kind as u8);
        packet.extend_from_slice(&key.id);
        packet.extend_from_slice(&nonce);
        // The node id length is checked when the node starts (`MAX_NODE_ID_LEN`).
        packet.push(sender.len() as u8);
        packet.extend_from_slice(sender);
        packet.extend_from_slice(&self.epoch.to_be_bytes());
        packet.extend_from_slice(&self.seq.to_be_bytes());
        packet.extend_from_slice(&now_ms.to_be_bytes());
        let header_len = packet.len();
        let mut body = payload.to_vec();
        let tag = key
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&packet[..header_len]),
                &mut body,
            )
            .expect("payloads are far below AES-GCM's length limit");
        packet.extend_from_slice(&body);
        packet.extend_from_slice(tag.as_ref());
        packet
    }

    fn nonce(&self) -> [u8; 12] {
        let mut input = Vec::with_capacity(self.node_id.len() + 24);
        input.extend_from_slice(&self.salt.to_be_bytes());
        input.extend_from_slice(self.node_id.as_bytes());
        input.extend_from_slice(&self.epoch.to_be_bytes());
        input.extend_from_slice(&self.seq.to_be_bytes());
        let hash = digest(&SHA256, &input);
        let mut nonce = [0; 12];
        nonce.copy_from_slice(&hash.as_ref()[..12]);
        nonce
    }

    /// Authenticates a packet and checks it is fresh; returns its header and plaintext.
    /// A packet that fails changes nothing; one that passes moves its sender's window.
    pub fn open(&mut self, packet: &[u8], now_ms: u64) -> Result<(Header, Vec<u8>), DropReason> {
        let parsed = parse(packet)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == parsed.key_id)
            .ok_or(DropReason::AuthFailure)?;
        if parsed.header.sent_ms.abs_diff(now_ms) > self.max_age_ms {
            return Err(DropReason::Stale);
        }
        if let Some(window) = self.windows.get(&parsed.header.sender) {
            if parsed.header.epoch < window.epoch {
                return Err(DropReason::Stale);
            }
            if parsed.header.epoch == window.epoch && !window.fresh(parsed.header.seq) {
                return Err(DropReason::Replay);
            }
        }
        let mut body = packet[parsed.header_len..].to_vec();
        let plain_len = key
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(parsed.nonce),
                Aad::from(&packet[..parsed.header_len]),
                &mut body,
            )
            .map_err(|_| DropReason::AuthFailure)?
            .len();
        body.truncate(plain_len);
        let header = parsed.header;
        let window = self
            .windows
            .entry(header.sender.clone())
            .or_insert_with(|| ReplayWindow::new(header.epoch));
        if header.epoch > window.epoch {
            *window = ReplayWindow::new(header.epoch);
        }
        window.record(header.seq);
        Ok((header, body))
    }
}

struct Parsed {
    header: Header,
    key_id: [u8; 4],
    nonce: [u8; 12],
    header_len: usize,
}

fn parse(packet: &[u8]) -> Result<Parsed, DropReason> {
    let mut reader = Reader(packet);
    if reader.take(2)? != MAGIC || reader.u8()? != FORMAT_VERSION {
        return Err(DropReason::Malformed);
    }
    let kind = Kind::from_byte(reader.u8()?).ok_or(DropReason::Malformed)?;
    let key_id = reader.array::<4>()?;
    let nonce = reader.array::<12>()?;
    let sender_len = reader.u8()? as usize;
    if sender_len == 0 || sender_len > MAX_NODE_ID_LEN {
        return Err(DropReason::Malformed);
    }
    let sender = std::str::from_utf8(reader.take(sender_len)?)
        .map_err(|_| DropReason::Malformed)?
        .to_owned();
    let epoch = u64::from_be_bytes(reader.array()?);
    let seq = u64::from_be_bytes(reader.array()?);
    let sent_ms = u64::from_be_bytes(reader.array()?);
    let header_len = packet.len() - reader.0.len();
    if reader.0.len() < TAG_LEN {
        return Err(DropReason::Malformed);
    }
    Ok(Parsed {
        header: Header {
            kind,
            sender,
            epoch,
            seq,
            sent_ms,
        },
        key_id,
        nonce,
        header_len,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DropReason> {
        if self.0.len() < n {
            return Err(DropReason::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DropReason> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DropReason> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ring(keys: &[u8]) -> Keyring {
        Keyring::new(keys.iter().map(|k| [*k; 32]).collect()).unwrap()
    }

    fn pair(sender_keys: &[u8], receiver_keys: &[u8]) -> (Sealer, Sealer) {
        (
            Sealer::new("a", 1_000, 7, 60_000, &ring(sender_keys)),
            Sealer::new("b", 1_000, 8, 60_000, &ring(receiver_keys)),
        )
    }

    #[test]
    fn round_trip() {
        let (mut a, mut b) = pair(&[1], &[1]);
        let packet = a.seal(Kind::SyncRequest, b"hello", 5_000);
        let (header, body) = b.open(&packet, 5_010).unwrap();
        assert_eq!(body, b"hello");
        assert_eq!(
            header,
            Header {
                kind: Kind::SyncRequest,
                sender: "a".into(),
                epoch: 1_000,
                seq: 1,
                sent_ms: 5_000
            }
        );
    }

    #[test]
    fn every_bit_flip_is_rejected() {
        let (mut a, mut b) = pair(&[1], &[1]);
        let packet = a.seal(Kind::Datagram, b"payload", 5_000);
        for bit in 0..packet.len() * 8 {
            let mut flipped = packet.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(b.open(&flipped, 5_000).is_err(), "bit {bit} flipped");
        }
        // None of the failures moved the window: the genuine packet still opens.
        assert!(b.open(&packet, 5_000).is_ok());
    }

    #[test]
    fn a_wrong_key_is_an_auth_failure() {
        let (mut a, mut b) = pair(&[1], &[2]);
        let packet = a.seal(Kind::Datagram, b"x", 5_000);
        assert_eq!(b.open(&packet, 5_000), Err(DropReason::AuthFailure));
    }

    #[test]
    fn the_second_newest_key_sends_and_any_key_opens() {
        let (mut a, mut b) = pair(&[1, 2], &[1]);
        // a holds [1, 2]: it still sends with 1, so b (which only has 1) can read it.
        assert!(b.open(&a.seal(Kind::Datagram, b"x", 5_000), 5_000).is_ok());
        a.set_keyring(&ring(&[1, 2, 3]));
        assert_eq!(
            b.open(&a.seal(Kind::Datagram, b"x", 5_000), 5_000),
            Err(DropReason::AuthFailure)
        );
        b.set_keyring(&ring(&[1, 2]));
        assert!(b.open(&a.seal(Kind::Datagram, b"x", 5_000), 5_000).is_ok());
    }

    #[test]
    fn replays_old_packets_and_old_boots_are_dropped() {
        let (mut a, mut b) = pair(&[1], &[1]);
        let first = a.seal(Kind::Datagram, b"1", 5_000);
        let second = a.seal(Kind::Datagram, b"2", 5_000);
        assert!(b.open(&second, 5_000).is_ok());
        assert!(b.open(&first, 5_000).is_ok(), "reordering is fine");
        assert_eq!(b.open(&first, 5_000), Err(DropReason::Replay));
        let old = a.seal(Kind::Datagram, b"3", 5_000);
        assert_eq!(b.open(&old, 66_000), Err(DropReason::Stale));
        let mut rebooted = Sealer::new("a", 2_000, 9, 60_000, &ring(&[1]));
        assert!(b
            .open(&rebooted.seal(Kind::Datagram, b"4", 5_000), 5_000)
            .is_ok());
        assert_eq!(b.open(&old, 5_000), Err(DropReason::Stale));
    }

    #[test]
    fn the_window_slides() {
        let mut w = ReplayWindow::new(1);
        for seq in [1, 2, 3, 70, 200] {
            assert!(w.fresh(seq));
            w.record(seq);
        }
        for seq in [1, 2, 3, 70, 200] {
            assert!(!w.fresh(seq), "{seq} seen");
        }
        assert!(w.fresh(4) && w.fresh(199));
        w.record(200 + REPLAY_WINDOW);
        assert!(!w.fresh(200), "fell out of the window");
        assert!(!w.fresh(200 + REPLAY_WINDOW));
        assert!(w.fresh(199 + REPLAY_WINDOW));
    }

    proptest! {
        #[test]
        fn random_bytes_never_open(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (_, mut b) = pair(&[1], &[1]);
            prop_assert!(b.open(&bytes, 5_000).is_err());
        }

        #[test]
        fn the_window_matches_a_set(seqs in proptest::collection::vec(1u64..3_000, 0..200)) {
            let mut w = ReplayWindow::new(1);
            let mut seen = std::collections::BTreeSet::new();
            for seq in seqs {
                let highest = seen.iter().next_back().copied().unwrap_or(0);
                let expected = !seen.contains(&seq) && seq + REPLAY_WINDOW > highest;
                prop_assert_eq!(w.fresh(seq), expected);
                if expected {
                    w.record(seq);
                    seen.insert(seq);
                }
            }
        }
    }
}
