//! TLS on every port (feature `tls`): rustls with the `ring` provider,
//! acceptors built from PEM files at start, and the name a verified client
//! certificate gives its holder (mTLS identity).
//!
//! With a client CA every client must present a certificate it signed;
//! the certificate's subject CN (or, without one, its first DNS name) is
//! looked up among the auth file's `cert` names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

/// Where the server's certificate, key and (for mTLS) client CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM file: the server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file: the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM file: the CA(s) client certificates must chain to. `None`: no
    /// client certificates asked for.
    pub client_ca: Option<PathBuf>,
}

/// TLS files that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file cannot be read or holds nothing usable.
    #[error("TLS {what} {path}: {message}")]
    File {
        /// Which file (`certificate`, `key`, `client CA`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the combination.
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// The `ring` provider (the project's choice: no C toolchain or CMake to
/// build). rustls 0.23.48 deprecates it for lacking post-quantum key
/// exchange; it still does every classical suite.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |message: String| TlsError::File {
        what,
        path: path.to_owned(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(certs)
}

/// A TLS acceptor (the TCP and HTTP ports share one; gRPC has its own).
#[derive(Clone)]
pub(crate) struct Acceptor(pub(crate) TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

/// Builds the acceptor the TCP and HTTP ports use.
///
/// # Errors
/// A file cannot be read or does not fit (a key for another certificate).
pub(crate) fn acceptor(config: &TlsConfig) -> Result<Acceptor, TlsError> {
    acceptor_with_alpn(config, Vec::new())
}

/// Builds an acceptor that offers `alpn` (the gRPC port's `h2`: gRPC
/// clients refuse a TLS server that does not select it).
///
/// # Errors
/// As [`acceptor`].
pub(crate) fn acceptor_with_alpn(config: &TlsConfig, alpn: Vec<Vec<u8>>) -> Result<Acceptor, TlsError> {
    let chain = certs("certificate", &config.cert)?;
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| TlsError::File {
        what: "key",
        path: config.key.clone(),
        message: e.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certs("client CA", ca)?);
            if added == 0 {
                return Err(TlsError::File {
                    what: "client CA",
                    path: ca.clone(),
                    message: "no usable CA certificate in it".into(),
                });
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Setup(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    server.alpn_protocols = alpn;
    Ok(Acceptor(TlsAcceptor::from(Arc::new(server))))
}

/// The name a verified client certificate gives its holder: its subject's
/// CN, else its first DNS subject-alternative name.
pub(crate) fn peer_name(conn: &rustls::ServerConnection) -> Option<String> {
    cert_name(conn.peer_certificates()?.first()?)
}

/// One DER element: tag, contents, and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (usize::from(len0), rest)
    } else {
        let n = usize::from(len0 & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        (bytes.iter().fold(0usize, |a, &b| a << 8 | usize::from(b)), rest)
    };
    let (content, rest) = rest.split_at_checked(len)?;
    Some((tag, content, rest))
}

/// The CN, else the first DNS name, of a certificate (already verified, so
/// well-formed; anything unexpected gives `None`).
fn cert_name(der: &[u8]) -> Option<String> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    if let Some((0xa0, _, after)) = tlv(rest) {
        rest = after; // version
    }
    // serialNumber, signature, issuer, validity
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (_, subject, after) = tlv(rest)?;
    if let Some(cn) = common_name(subject) {
        return Some(cn);
    }
    rest = tlv(after)?.2; // subjectPublicKeyInfo
    while !rest.is_empty() {
        let (tag, content, after) = tlv(rest)?;
        rest = after;
        if tag == 0xa3 {
            return first_dns_name(content);
        }
    }
    None
}

/// OID 2.5.4.3.
const CN_OID: [u8; 3] = [0x55, 0x04, 0x03];
/// OID 2.5.29.17.
const SAN_OID: [u8; 3] = [0x55, 0x1d, 0x11];

fn text(tag: u8, value: &[u8]) -> Option<String> {
    // UTF8String, PrintableString, IA5String.
    matches!(tag, 0x0c | 0x13 | 0x16)
        .then(|| std::str::from_utf8(value).ok().map(str::to_owned))
        .flatten()
}

fn common_name(name: &[u8]) -> Option<String> {
    let mut rdns = name;
    while !rdns.is_empty() {
        let (_, set, after) = tlv(rdns)?;
        rdns = after;
        let mut atvs = set;
        while !atvs.is_empty() {
            let (_, atv, after) = tlv(atvs)?;
            atvs = after;
            let (tag, oid, value) = tlv(atv)?;
            if tag == 0x06 && oid == CN_OID {
                let (vtag, value, _) = tlv(value)?;
                return text(vtag, value);
            }
        }
    }
    None
}

fn first_dns_name(extensions: &[u8]) -> Option<String> {
    let (_, mut exts, _) = tlv(extensions)?;
    while !exts.is_empty() {
        let (_, ext, after) = tlv(exts)?;
        exts = after;
        let (_, oid, mut rest) = tlv(ext)?;
        if oid != SAN_OID {
            continue;
        }
        let (mut tag, mut value, after) = tlv(rest)?;
        if tag == 0x01 {
            // critical
            rest = after;
            (tag, value, _) = tlv(rest)?;
        }
        if tag != 0x04 {
            return None;
        }
        let (_, mut names, _) = tlv(value)?;
        while !names.is_empty() {
            let (tag, name, after) = tlv(names)?;
            names = after;
            if tag == 0x82 {
                return std::str::from_utf8(name).ok().map(str::to_owned);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_come_from_the_cn_then_the_first_dns_name() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["alt.example".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Clastor");
        params.distinguished_name.push(rcgen::DnType::CommonName, "ops");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(cert_name(cert.der()).as_deref(), Some("ops"));

        let mut params = rcgen::CertificateParams::new(vec!["first.example".to_owned(), "second".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(cert_name(cert.der()).as_deref(), Some("first.example"));

        assert_eq!(cert_name(&[]), None);
        assert_eq!(cert_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(cert_name(&cert.der()[..40]), None);
    }
}
