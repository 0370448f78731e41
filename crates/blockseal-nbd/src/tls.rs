//! TLS for TCP listeners: the server's certificate, client certificate
//! verification, and the rule that names a client's tenant.
//!
//! # Which tenant a certificate names
//! A client certificate, verified against the configured CA by
//! `rustls::server::WebPkiClientVerifier`, names its tenant in a URI subject
//! alternative name `blockseal:tenant:<name>`. Exactly one such URI must be
//! present (other SANs are ignored); `<name>` follows the tenant name rules
//! (1 to 63 bytes of `a-z 0-9 . _ -`, starting with a letter or digit).
//!
//! Why a URI SAN and not the subject CN: a CN is free text that a CA shared with
//! other services fills in for its own purposes (often a host or user name), so
//! treating it as a tenant invites accidental grants. A typed, namespaced SAN says
//! exactly one thing. Why a small DER walk and not a parsing crate: the certificate
//! has already been parsed and its chain verified by webpki before we look at it,
//! and we need one field; 100 bounds-checked lines with no new dependency are
//! easier to audit than a general X.509 parser.
//!
//! # Which certificates are admin certificates
//! The admin API (served by the `blockseal` binary, not by this crate) accepts
//! a certificate naming an administrator in a URI SAN `blockseal:admin:<name>`
//! ([`client_admin`]). A certificate that names a tenant is never an admin
//! certificate, even if it names an administrator too: the two roles are kept
//! apart so that a tenant's key cannot manage the store.
//!
//! This module never logs key material, and the private key is dropped into
//! rustls as soon as the configuration is built.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The URI prefix of the subject alternative name that names a tenant.
pub const TENANT_URI_PREFIX: &str = "blockseal:tenant:";

/// The URI prefix of the subject alternative name that names an administrator.
pub const ADMIN_URI_PREFIX: &str = "blockseal:admin:";

/// TLS settings for a TCP listener: server certificate and key, and the CA that
/// signs client certificates. A client must present a certificate.
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never show the configuration: it holds the private key.
        f.write_str("TlsConfig { .. }")
    }
}

/// Why a [`TlsConfig`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// A PEM file could not be read or decoded.
    #[error("cannot read {what} from {path}")]
    Pem {
        /// "server certificate chain", "server private key" or "client CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM input held no item of the expected kind.
    #[error("no {what} found")]
    Missing {
        /// "server certificate chain", "server private key" or "client CA".
        what: &'static str,
    },
    /// A client CA certificate was refused by webpki.
    #[error("client CA certificate refused")]
    BadCa(#[source] rustls::Error),
    /// The client verifier could not be built.
    #[error("cannot build client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// rustls refused the certificate, key or protocol settings.
    #[error("TLS configuration refused")]
    Rustls(#[source] rustls::Error),
}

impl TlsConfig {
    /// Builds a configuration from PEM files: the server certificate chain (leaf
    /// first), its private key (PKCS#8, PKCS#1 or SEC1), and the CA certificates
    /// client certificates must chain to. TLS 1.2 and 1.3, ring provider.
    pub fn from_pem_files(
        server_cert_chain: impl AsRef<Path>,
        server_key: impl AsRef<Path>,
        client_ca: impl AsRef<Path>,
    ) -> Result<TlsConfig, TlsConfigError> {
        let pem_err = |what, path: &Path| {
            let path = path.to_owned();
            move |source| TlsConfigError::Pem { what, path, source }
        };
        let chain_path = server_cert_chain.as_ref();
        let chain = CertificateDer::pem_file_iter(chain_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(pem_err("server certificate chain", chain_path))?;
        let key_path = server_key.as_ref();
        let key = PrivateKeyDer::from_pem_file(key_path)
            .map_err(pem_err("server private key", key_path))?;
        let ca_path = client_ca.as_ref();
        let cas = CertificateDer::pem_file_iter(ca_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(pem_err("client CA", ca_path))?;
        TlsConfig::from_der(chain, key, cas)
    }

    /// Builds a configuration from DER items already in memory.
    pub fn from_der(
        server_cert_chain: Vec<CertificateDer<'static>>,
        server_key: PrivateKeyDer<'static>,
        client_ca: Vec<CertificateDer<'static>>,
    ) -> Result<TlsConfig, TlsConfigError> {
        if server_cert_chain.is_empty() {
            return Err(TlsConfigError::Missing {
                what: "server certificate chain",
            });
        }
        if client_ca.is_empty() {
            return Err(TlsConfigError::Missing { what: "client CA" });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for ca in client_ca {
            roots.add(ca).map_err(TlsConfigError::BadCa)?;
        }
        // No `allow_unauthenticated`: a client without a certificate fails the
        // handshake, because without one it has no tenant.
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(TlsConfigError::Verifier)?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsConfigError::Rustls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(server_cert_chain, server_key)
            .map_err(TlsConfigError::Rustls)?;
        Ok(TlsConfig {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}

/// Why a verified client certificate names no usable tenant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientIdentityError {
    /// The certificate could not be walked (it was verified, so this is unexpected).
    #[error("client certificate is not well-formed DER")]
    Malformed,
    /// No `blockseal:tenant:` URI subject alternative name.
    #[error("client certificate names no tenant (URI SAN {TENANT_URI_PREFIX}<name>)")]
    NoTenant,
    /// Several different tenants are named.
    #[error("client certificate names more than one tenant")]
    Ambiguous,
    /// The named tenant is not a valid tenant name.
    #[error("client certificate names an invalid tenant {0:?}")]
    InvalidName(String),
    /// The certificate names no administrator.
    #[error("client certificate names no administrator (URI SAN {ADMIN_URI_PREFIX}<name>)")]
    NoAdmin,
    /// The certificate names a tenant, so it is no admin certificate.
    #[error("client certificate names a tenant; tenant certificates have no admin access")]
    TenantCertificate,
}

/// The tenant a (verified) client certificate names, by the rule in the module docs.
pub fn client_tenant(certificate_der: &[u8]) -> Result<String, ClientIdentityError> {
    let mut tenant: Option<&[u8]> = None;
    for uri in uri_sans(certificate_der).ok_or(ClientIdentityError::Malformed)? {
        let Some(name) = uri.strip_prefix(TENANT_URI_PREFIX.as_bytes()) else {
            continue;
        };
        match tenant {
            Some(seen) if seen != name => return Err(ClientIdentityError::Ambiguous),
            _ => tenant = Some(name),
        }
    }
    let name = tenant.ok_or(ClientIdentityError::NoTenant)?;
    let text = String::from_utf8_lossy(name).into_owned();
    if !valid_tenant_name(name) {
        return Err(ClientIdentityError::InvalidName(text));
    }
    Ok(text)
}

/// The administrator a (verified) client certificate names, by the rule in the
/// module docs: exactly one `blockseal:admin:<name>` URI SAN (`<name>` follows
/// the tenant name rule), and no tenant URI.
pub fn client_admin(certificate_der: &[u8]) -> Result<String, ClientIdentityError> {
    let uris = uri_sans(certificate_der).ok_or(ClientIdentityError::Malformed)?;
    if uris
        .iter()
        .any(|uri| uri.starts_with(TENANT_URI_PREFIX.as_bytes()))
    {
        return Err(ClientIdentityError::TenantCertificate);
    }
    let mut admin: Option<&[u8]> = None;
    for uri in uris {
        let Some(name) = uri.strip_prefix(ADMIN_URI_PREFIX.as_bytes()) else {
            continue;
        };
        match admin {
            Some(seen) if seen != name => return Err(ClientIdentityError::Ambiguous),
            _ => admin = Some(name),
        }
    }
    let name = admin.ok_or(ClientIdentityError::NoAdmin)?;
    let text = String::from_utf8_lossy(name).into_owned();
    if !valid_tenant_name(name) {
        return Err(ClientIdentityError::InvalidName(text));
    }
    Ok(text)
}

impl TlsConfig {
    /// Runs the server side of a TLS handshake on `stream` (client certificate
    /// required and verified) and returns the stream with the client's leaf
    /// certificate, for services other than NBD that share this configuration
    /// (the admin API).
    pub async fn accept<IO>(
        &self,
        stream: IO,
    ) -> std::io::Result<(tokio_rustls::server::TlsStream<IO>, CertificateDer<'static>)>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let stream = self.acceptor.accept(stream).await?;
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|cert| cert.clone().into_owned())
            .ok_or_else(|| std::io::Error::other("the client presented no certificate"))?;
        Ok((stream, leaf))
    }
}

/// The tenant name rule of `blockseal-keys` (`TenantId`), restated because this
/// crate depends on nothing but the volume error kind.
fn valid_tenant_name(name: &[u8]) -> bool {
    let Some(&first) = name.first() else {
        return false;
    };
    name.len() <= 63
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && name.iter().all(|&b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

// DER tags used by the walk (X.690; RFC 5280 section 4.1 and 4.2.1.6).
const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const EXPLICIT_EXTENSIONS: u8 = 0xa3; // [3] EXPLICIT in TBSCertificate
const GENERAL_NAME_URI: u8 = 0x86; // [6] IMPLICIT IA5String
/// id-ce-subjectAltName, 2.5.29.17.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// All URI subject alternative names, or `None` if the DER does not walk.
fn uri_sans(der: &[u8]) -> Option<Vec<&[u8]>> {
    let certificate = Der(der).expect(SEQUENCE)?;
    let tbs = Der(certificate).expect(SEQUENCE)?;
    let mut fields = Der(tbs);
    let mut uris = Vec::new();
    while let Some((tag, value)) = fields.next()? {
        if tag != EXPLICIT_EXTENSIONS {
            continue;
        }
        let mut extensions = Der(Der(value).expect(SEQUENCE)?);
        while let Some((tag, extension)) = extensions.next()? {
            if tag != SEQUENCE {
                return None;
            }
            let mut ext = Der(extension);
            let oid = ext.expect(OID)?;
            let (mut tag, mut value) = ext.next()??;
            if tag == BOOLEAN {
                (tag, value) = ext.next()??;
            }
            if tag != OCTET_STRING {
                return None;
            }
            if oid != SUBJECT_ALT_NAME {
                continue;
            }
            let mut names = Der(Der(value).expect(SEQUENCE)?);
            while let Some((tag, name)) = names.next()? {
                if tag == GENERAL_NAME_URI {
                    uris.push(name);
                }
            }
        }
    }
    Some(uris)
}

/// A cursor over consecutive DER TLVs. Every read is bounds-checked; anything
/// unusual (high tag numbers, indefinite or over-long lengths) stops the walk.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The next TLV: `Some(None)` at the end, `None` if malformed.
    fn next(&mut self) -> Option<Option<(u8, &'a [u8])>> {
        let Some((&tag, rest)) = self.0.split_first() else {
            return Some(None);
        };
        if tag & 0x1f == 0x1f {
            return None;
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            rest = &rest[n..];
            len
        };
        if len > rest.len() {
            return None;
        }
        let (value, rest) = rest.split_at(len);
        self.0 = rest;
        Some(Some((tag, value)))
    }

    /// The value of the next TLV if it has tag `tag`.
    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.next()? {
            Some((t, value)) if t == tag => Some(value),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if value.len() < 0x80 {
            out.push(value.len() as u8);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    /// A certificate skeleton: just enough structure for the walk.
    fn cert_with_sans(uris: &[&str], critical: bool) -> Vec<u8> {
        let names: Vec<u8> = uris
            .iter()
            .flat_map(|u| tlv(GENERAL_NAME_URI, u.as_bytes()))
            .chain(tlv(0x82, b"example.org")) // a dNSName, ignored
            .collect();
        let mut ext = tlv(OID, SUBJECT_ALT_NAME);
        if critical {
            ext.extend(tlv(BOOLEAN, &[0xff]));
        }
        ext.extend(tlv(OCTET_STRING, &tlv(SEQUENCE, &names)));
        let other_ext = [tlv(OID, &[0x55, 0x1d, 0x13]), tlv(OCTET_STRING, &[0x30, 0])].concat();
        let extensions = [tlv(SEQUENCE, &other_ext), tlv(SEQUENCE, &ext)].concat();
        let tbs = [
            tlv(0xa0, &tlv(0x02, &[2])), // version
            tlv(0x02, &[1]),             // serial
            tlv(SEQUENCE, &[]),          // signature algorithm
            tlv(SEQUENCE, &[]),          // issuer
            tlv(SEQUENCE, &[]),          // validity
            tlv(SEQUENCE, &[]),          // subject
            tlv(SEQUENCE, &[]),          // subject public key info
            tlv(EXPLICIT_EXTENSIONS, &tlv(SEQUENCE, &extensions)),
        ]
        .concat();
        let cert = [tlv(SEQUENCE, &tbs), tlv(SEQUENCE, &[]), tlv(0x03, &[0])].concat();
        tlv(SEQUENCE, &cert)
    }

    #[test]
    fn finds_the_tenant_uri() {
        let der = cert_with_sans(&["https://x", "blockseal:tenant:acme"], false);
        assert_eq!(client_tenant(&der).unwrap(), "acme");
        let der = cert_with_sans(&["blockseal:tenant:acme"], true);
        assert_eq!(client_tenant(&der).unwrap(), "acme");
        let der = cert_with_sans(&["blockseal:tenant:acme", "blockseal:tenant:acme"], false);
        assert_eq!(client_tenant(&der).unwrap(), "acme");
    }

    #[test]
    fn refuses_missing_ambiguous_and_invalid_tenants() {
        assert_eq!(
            client_tenant(&cert_with_sans(&["https://x"], false)),
            Err(ClientIdentityError::NoTenant)
        );
        assert_eq!(
            client_tenant(&cert_with_sans(
                &["blockseal:tenant:acme", "blockseal:tenant:globex"],
                false
            )),
            Err(ClientIdentityError::Ambiguous)
        );
        for bad in ["", "Acme", "a/b", "-x", &"a".repeat(64)] {
            let uri = format!("blockseal:tenant:{bad}");
            assert!(matches!(
                client_tenant(&cert_with_sans(&[&uri], false)),
                Err(ClientIdentityError::InvalidName(_))
            ));
        }
        assert_eq!(
            client_tenant(&[0x30, 0x05, 0]),
            Err(ClientIdentityError::Malformed)
        );
        assert_eq!(client_tenant(&[]), Err(ClientIdentityError::Malformed));
    }

    #[test]
    fn admin_certificates_name_one_admin_and_no_tenant() {
        let der = cert_with_sans(&["https://x", "blockseal:admin:alice"], false);
        assert_eq!(client_admin(&der).unwrap(), "alice");
        // A tenant certificate is never an admin one, whatever else it names.
        for uris in [
            &["blockseal:tenant:acme"][..],
            &["blockseal:admin:alice", "blockseal:tenant:acme"][..],
        ] {
            assert_eq!(
                client_admin(&cert_with_sans(uris, false)),
                Err(ClientIdentityError::TenantCertificate)
            );
        }
        assert_eq!(
            client_admin(&cert_with_sans(&["https://x"], false)),
            Err(ClientIdentityError::NoAdmin)
        );
        assert_eq!(
            client_admin(&cert_with_sans(
                &["blockseal:admin:alice", "blockseal:admin:bob"],
                false
            )),
            Err(ClientIdentityError::Ambiguous)
        );
        assert!(matches!(
            client_admin(&cert_with_sans(&["blockseal:admin:Alice"], false)),
            Err(ClientIdentityError::InvalidName(_))
        ));
        // And an admin certificate names no tenant for NBD.
        assert_eq!(
            client_tenant(&cert_with_sans(&["blockseal:admin:alice"], false)),
            Err(ClientIdentityError::NoTenant)
        );
    }

    proptest! {
        #[test]
        fn walk_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = client_tenant(&bytes);
        }

        #[test]
        fn truncated_certificates_never_panic(cut in 0usize..200) {
            let der = cert_with_sans(&["blockseal:tenant:acme"], false);
            let _ = client_tenant(&der[..cut.min(der.len())]);
        }
    }
}
