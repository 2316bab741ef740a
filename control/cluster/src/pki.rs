//! The cluster's trust: a root CA made at `swarm init`, node certificates signed from CSRs,
//! and join tokens that pin the CA by digest so a joining node trusts no one on first use.
//!
//! A certificate proves a node's identity only (its ID is the subject CN); its role lives in
//! the replicated state, so promotion and demotion need no new certificate.

use std::{fmt, net::IpAddr};

use anyhow::{bail, Context as _, Result};
use rand::Rng as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Every node certificate carries this DNS name; TLS clients verify it (plus the CA), since
/// nodes are reached by address but identified by ID.
pub const CLUSTER_SERVER_NAME: &str = "shoal-cluster";
/// Node certificates are not renewed yet (docs/operations.md), so they last long enough
/// that no swarm dies of an expiry; rotation will shorten this.
const CERT_VALIDITY_DAYS: i64 = 3 * 365;
const CA_VALIDITY_DAYS: i64 = 20 * 365;
const BASE36: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
/// A token's CA digest that is not the manager's: the token is another swarm's.
pub const CA_MISMATCH: &str =
    "the manager's CA does not match the join token: the token is from another swarm";
/// Where a good token comes from, for every error about a bad one.
pub const TOKEN_HINT: &str =
    "copy the current one whole from `shoal swarm join-token worker` (or `manager`) on a manager";

/// `len` random characters of [0-9a-z], the alphabet of Swarm's IDs and tokens.
pub fn random_id(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| BASE36[rng.random_range(0..BASE36.len())] as char)
        .collect()
}

/// SHA-256 of the CA certificate, base36, as in the token.
pub fn ca_digest(ca_der: &[u8]) -> String {
    let mut n = Sha256::digest(ca_der).to_vec();
    // Big-endian base36 of the 256-bit number, fixed at 50 digits like Swarm's.
    let mut digits = Vec::with_capacity(50);
    for _ in 0..50 {
        let mut rem = 0u32;
        for byte in n.iter_mut() {
            let acc = (rem << 8) | u32::from(*byte);
            *byte = (acc / 36) as u8;
            rem = acc % 36;
        }
        digits.push(BASE36[rem as usize]);
    }
    digits.reverse();
    String::from_utf8(digits).expect("ascii")
}

/// The root CA, kept by managers (its key is part of the replicated state).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct RootCa {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for RootCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootCa").finish_non_exhaustive()
    }
}

/// A node's own key and certificate, kept in its state dir.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeIdentity {
    pub node_id: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl RootCa {
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "shoal root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = params.not_before + time_days(CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn der(&self) -> Result<Vec<u8>> {
        pem_der(&self.cert_pem)
    }

    pub fn digest(&self) -> Result<String> {
        Ok(ca_digest(&self.der()?))
    }

    /// Signs a node certificate for `node_id` over the public key of `csr_pem`. Nothing else
    /// of the request is trusted: the names, usages and validity are the CA's choice.
    pub fn sign_node(&self, node_id: &str, addr: IpAddr, csr_pem: &str) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .context("the certificate signing request is not valid")?;
        let key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, key)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, node_id);
        params.subject_alt_names = vec![
            SanType::DnsName(CLUSTER_SERVER_NAME.try_into()?),
            SanType::IpAddress(addr),
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time_days(1);
        params.not_after = now + time_days(CERT_VALIDITY_DAYS);
        Ok(params.signed_by(&csr.public_key, &issuer)?.pem())
    }

    /// A certificate for a node this CA's holder creates itself (the first manager).
    pub fn issue_identity(&self, node_id: &str, addr: IpAddr) -> Result<NodeIdentity> {
        let (key_pem, csr_pem) = new_key_and_csr()?;
        Ok(NodeIdentity {
            node_id: node_id.to_owned(),
            cert_pem: self.sign_node(node_id, addr, &csr_pem)?,
            key_pem,
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// A fresh key pair and a CSR for it, as a joining node sends.
pub fn new_key_and_csr() -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

fn time_days(days: i64) -> time::Duration {
    time::Duration::days(days)
}

pub fn pem_der(pem_text: &str) -> Result<Vec<u8>> {
    use rustls_pki_types::{pem::PemObject as _, CertificateDer};
    Ok(CertificateDer::from_pem_slice(pem_text.as_bytes())
        .context("not a PEM certificate")?
        .to_vec())
}

/// The node ID (subject CN) of a DER certificate.
pub fn node_id_of(cert_der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).context("bad certificate")?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .context("certificate has no common name")?;
    Ok(cn.as_str().context("common name is not text")?.to_owned())
}

pub use shoal_api::Role;

/// `SWMTKN-1-<CA digest>-<secret>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_digest: String,
    pub secret: String,
}

impl JoinToken {
    pub fn parse(text: &str) -> Result<Self> {
        let rest = text.trim().strip_prefix("SWMTKN-1-").with_context(|| {
            format!("invalid join token: it must start with SWMTKN-1-; {TOKEN_HINT}")
        })?;
        let (digest, secret) = rest.split_once('-').with_context(|| {
            format!("invalid join token: expected SWMTKN-1-<digest>-<secret>; {TOKEN_HINT}")
        })?;
        let base36 = |s: &str| s.bytes().all(|b| BASE36.contains(&b));
        if digest.len() != 50 || secret.len() != 25 || !base36(digest) || !base36(secret) {
            bail!("invalid join token: malformed digest or secret; {TOKEN_HINT}");
        }
        Ok(Self {
            ca_digest: digest.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

/// Constant-time comparison of two token secrets.
pub fn secrets_match(expected: &str, given: &str) -> bool {
    expected.len() == given.len()
        && expected
            .bytes()
            .zip(given.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SWMTKN-1-{}-{}", self.ca_digest, self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_rejections() {
        let ca = RootCa::generate().unwrap();
        let token = JoinToken {
            ca_digest: ca.digest().unwrap(),
            secret: random_id(25),
        };
        let text = token.to_string();
        assert!(text.starts_with("SWMTKN-1-"));
        assert_eq!(text.len(), "SWMTKN-1-".len() + 50 + 1 + 25);
        assert_eq!(JoinToken::parse(&text).unwrap(), token);
        for bad in [
            "",
            "SWMTKN-2-abc-def",
            &text[..text.len() - 1],
            &text.replace("SWMTKN-1-", "SWMTKN-1-Z"),
            &format!("{text}x"),
        ] {
            let err = JoinToken::parse(bad).unwrap_err().to_string();
            assert!(err.ends_with(TOKEN_HINT), "{bad:?}: {err}");
        }
        assert!(secrets_match(&token.secret, &token.secret.clone()));
        assert!(!secrets_match(&token.secret, &random_id(25)));
        assert!(!secrets_match(&token.secret, ""));
    }

    #[test]
    fn digest_is_stable_and_distinguishes_cas() {
        let a = RootCa::generate().unwrap();
        let b = RootCa::generate().unwrap();
        assert_eq!(a.digest().unwrap(), a.digest().unwrap());
        assert_ne!(a.digest().unwrap(), b.digest().unwrap());
        assert_eq!(a.digest().unwrap().len(), 50);
        // Known value: base36 of SHA-256("") = e3b0c442...b855.
        assert_eq!(
            ca_digest(b""),
            "5oaq0bjhj6un82wg98mgigso5q7qlhc63je4gw7ivixqqhkd3p"
        );
    }

    #[test]
    fn signed_certificate_names_the_node_and_ignores_what_the_csr_asks() {
        let ca = RootCa::generate().unwrap();
        // A CSR that asks to be a CA for another name.
        let key = KeyPair::generate().unwrap();
        let mut greedy = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        greedy.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = greedy.serialize_request(&key).unwrap().pem().unwrap();
        let cert = ca
            .sign_node("node-abc", "10.0.0.1".parse().unwrap(), &csr)
            .unwrap();
        let der = pem_der(&cert).unwrap();
        assert_eq!(node_id_of(&der).unwrap(), "node-abc");
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!parsed.is_ca());
        let sans = format!(
            "{:?}",
            parsed.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(
            sans.contains(CLUSTER_SERVER_NAME) && !sans.contains("evil"),
            "{sans}"
        );
        assert!(ca
            .sign_node("n", "10.0.0.1".parse().unwrap(), "garbage")
            .is_err());
    }
}
