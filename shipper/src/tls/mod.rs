//! Mutual TLS 1.3 for both sides: configuration from PEM files, a development PKI generator,
//! and [`stream`], which drives a rustls connection over an io_uring TCP socket.
//!
//! # Design constraints
//! - TLS 1.3 only, the `ring` provider; the receiver requires a client certificate signed by
//!   its CA, the shipper verifies the receiver's certificate chain and name. A forward
//!   source's port ([`listener_config`]) also takes TLS 1.2, for Fluentd's forwarders.

pub mod pki;
pub mod stream;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;

/// Why TLS material could not be loaded.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{path}: cannot read PEM: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path}: holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: certificate not usable as a trust anchor: {source}")]
    Anchor { path: PathBuf, source: rustls::Error },
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |e: rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsError::Pem { path: path.to_path_buf(), message: e.to_string() })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path)? {
        roots.add(cert).map_err(|source| TlsError::Anchor { path: path.to_path_buf(), source })?;
    }
    Ok(roots)
}

/// The shipper's side: trusts `ca`, presents `cert`/`key`.
pub fn client_config(ca: &Path, cert: &Path, key_path: &Path) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(certs(cert)?, key(key_path)?)?)
}

/// A listening source's side (`[[sources.forward]]` with `tls`): presents `cert`/`key`, TLS
/// 1.2 or 1.3 (Fluentd's forward output speaks 1.2 by default); with `client_ca`, requires
/// client certificates it signed.
pub fn listener_config(
    cert: &Path,
    key_path: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, TlsError> {
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let builder =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(&versions)?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(builder.with_single_cert(certs(cert)?, key(key_path)?)?)
}

/// The receiver's side: requires client certificates from `ca`, presents `cert`/`key`.
pub fn server_config(ca: &Path, cert: &Path, key_path: &Path) -> Result<ServerConfig, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider()).build()?;
    Ok(ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert)?, key(key_path)?)?)
}
