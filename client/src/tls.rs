//! TLS to the server (feature `tls`): rustls with the `ring` provider. A
//! [`TlsConfig`] is built once from PEM files (the CA that signed the
//! server's certificate, and optionally this client's certificate and key
//! for servers that ask for one, mTLS) and shared by every connection.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::error::Error;

/// How a client speaks TLS: the roots it trusts, its certificate if any.
/// Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn invalid(what: &str, path: &Path, e: impl fmt::Display) -> Error {
    Error::InvalidArgument(format!("{what} {}: {e}", path.display()))
}

impl TlsConfig {
    /// Trusts the CA certificates in the PEM file `ca_file`; with
    /// `identity`, presents that certificate chain and private key (PEM
    /// files) to a server that asks for a client certificate.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the file that cannot be read or
    /// holds no usable certificate or key.
    pub fn from_pem_files(ca_file: &Path, identity: Option<(&Path, &Path)>) -> Result<TlsConfig, Error> {
        let mut roots = rustls::RootCertStore::empty();
        let cas = CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| invalid("cannot read CA file", ca_file, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("bad CA file", ca_file, e))?;
        let (added, _) = roots.add_parsable_certificates(cas);
        if added == 0 {
            return Err(invalid("no CA certificate in", ca_file, "empty"));
        }
        let builder = rustls::ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::InvalidArgument(format!("TLS setup: {e}")))?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| invalid("cannot read certificate file", cert, e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| invalid("bad certificate file", cert, e))?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid("cannot read key file", key, e))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| invalid("unusable certificate or key", cert, e))?
            }
        };
        Ok(TlsConfig {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// From a rustls configuration made elsewhere.
    pub fn from_rustls(config: Arc<rustls::ClientConfig>) -> TlsConfig {
        TlsConfig {
            config,
            server_name: None,
        }
    }

    /// The name the server's certificate must carry; by default the host
    /// part of the server address (a DNS name or an IP address).
    pub fn server_name(mut self, name: impl Into<String>) -> TlsConfig {
        self.server_name = Some(name.into());
        self
    }

    /// Runs the TLS handshake over `stream` to the server at `addr`.
    pub(crate) async fn connect(&self, addr: &str, stream: TcpStream) -> Result<TlsStream<TcpStream>, String> {
        let host = match &self.server_name {
            Some(name) => name.clone(),
            None => host_of(addr).to_owned(),
        };
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("TLS server name {host:?}: {e}"))?;
        TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))
    }
}

/// The `ring` provider (the project's choice: no C toolchain or CMake to
/// build). rustls 0.23.48 deprecates it for lacking post-quantum key
/// exchange; it still does every classical suite.
#[allow(deprecated)]
fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The host of `host:port` (`[v6]:port` too).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_come_from_addresses() {
        assert_eq!(host_of("127.0.0.1:7070"), "127.0.0.1");
        assert_eq!(host_of("locks.example:7070"), "locks.example");
        assert_eq!(host_of("[::1]:7070"), "::1");
        assert_eq!(host_of("locks"), "locks");
    }
}
