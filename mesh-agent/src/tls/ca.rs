//! Certificate authorities: the [`Signer`] seam the certificate store issues through, and
//! [`LocalCa`] (rcgen, a CA certificate and key from files; making them is [`super::dev_ca`]),
//! which signs in the process holding the key: the CA off the node (`mesh-agent ca serve`),
//! or an agent using the development shortcut. On a node using the CA off the node the
//! store's signer is [`super::RemoteSigner`]: only public keys go out and certificate chains
//! come back.

use std::{
    fs,
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::{
    cert::{self, CertError},
    control::ControlId,
    identity::SpiffeId,
};

/// Default lifetime of a leaf certificate.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of a development CA made by `mesh-agent ca init`.
pub const DEFAULT_CA_DAYS: u32 = 365;
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} already exists (use --force to overwrite)")]
    Exists { path: PathBuf },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a usable certificate: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: not a usable private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{path}: the certificate is not a CA (no basicConstraints cA=true)")]
    NotCa { path: PathBuf },
    #[error("{path}: the CA certificate expired at {not_after}")]
    Expired { path: PathBuf, not_after: String },
    #[error("{path}: the CA certificate is not valid before {not_before}")]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("{key} does not hold the private key of {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("signing a certificate for {identity}: {reason}")]
    Sign { identity: String, reason: String },
    /// For remote signers: the CA could not be reached or refused for now; try again later.
    #[error("the CA is unavailable: {0}")]
    Unavailable(String),
    /// For remote signers: the CA answered and refused this request (not placed on this node,
    /// a malformed request); asking again will not help until something changes.
    #[error("the CA refused: {0}")]
    Refused(String),
}

/// The future a [`Signer`] returns; boxed so the store can hold an `Arc<dyn Signer>`.
pub type SignFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<CertificateDer<'static>>, CaError>> + Send + 'a>>;

/// Issues leaf certificates. Implementations must put `identity` as the only URI SAN, allow
/// both server and client authentication, and may shorten (never lengthen) `lifetime`.
pub trait Signer: Send + Sync {
    /// Signs `subject_public_key_info` (DER) for `identity`; returns the chain leaf first,
    /// then any intermediates, without the root.
    fn sign<'a>(
        &'a self,
        identity: &'a SpiffeId,
        subject_public_key_info: &'a [u8],
        lifetime: Duration,
    ) -> SignFuture<'a>;
}

/// The built-in CA: a CA certificate and key from PEM files, signing in-process.
pub struct LocalCa {
    pub(super) issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate (a root, or an intermediate).
    certificate: CertificateDer<'static>,
    /// Whether it is self-issued (a root): a root is not sent, an intermediate is.
    is_root: bool,
    /// Further certificates of the CA file (intermediates up to the root), appended to
    /// every issued chain.
    chain_tail: Vec<CertificateDer<'static>>,
    pub(super) not_after: SystemTime,
}

impl LocalCa {
    /// Loads and checks a CA: the first certificate of `cert_path` must be a currently valid
    /// CA certificate matching the key in `key_path` (PKCS#8 or SEC1 PEM).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let cert_pem = fs::read(cert_path).map_err(|source| CaError::Read {
            path: cert_path.to_owned(),
            source,
        })?;
        let key_pem = fs::read_to_string(key_path).map_err(|source| CaError::Read {
            path: key_path.to_owned(),
            source,
        })?;
        let bad_cert = |reason: String| CaError::BadCertificate {
            path: cert_path.to_owned(),
            reason,
        };
        let mut certs = Vec::new();
        for cert in CertificateDer::pem_slice_iter(&cert_pem) {
            certs.push(cert.map_err(|e| bad_cert(e.to_string()))?);
        }
        if certs.is_empty() {
            return Err(CaError::NoCertificate {
                path: cert_path.to_owned(),
            });
        }
        let ca_der = certs.remove(0);
        let (rest, parsed) =
            X509Certificate::from_der(&ca_der).map_err(|e| bad_cert(e.to_string()))?;
        if !rest.is_empty() {
            return Err(bad_cert("trailing bytes after the certificate".into()));
        }
        if !parsed.is_ca() {
            return Err(CaError::NotCa {
                path: cert_path.to_owned(),
            });
        }
        let (not_before, not_after) =
            cert::validity(&ca_der).map_err(|e: CertError| bad_cert(e.to_string()))?;
        let now = SystemTime::now();
        if not_after <= now {
            return Err(CaError::Expired {
                path: cert_path.to_owned(),
                not_after: parsed.validity().not_after.to_string(),
            });
        }
        if not_before > now {
            return Err(CaError::NotYetValid {
                path: cert_path.to_owned(),
                not_before: parsed.validity().not_before.to_string(),
            });
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadKey {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?;
        if rcgen::PublicKeyData::subject_public_key_info(&key) != parsed.public_key().raw {
            return Err(CaError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&ca_der, key).map_err(|e| bad_cert(e.to_string()))?;
        let is_root = parsed.subject().as_raw() == parsed.issuer().as_raw();
        let ca_der = ca_der.into_owned();
        Ok(Self {
            issuer,
            certificate: ca_der,
            is_root,
            chain_tail: certs,
            not_after,
        })
    }

    /// Loads `ca.crt` and `ca.key` from a directory made by [`init_dev_ca`].
    pub fn load_dir(dir: &Path) -> Result<Self, CaError> {
        Self::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE))
    }

    /// The CA certificate, then the rest of its file (intermediates up to the root): the
    /// last one is the root peers must trust.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        let mut chain = vec![self.certificate.clone()];
        chain.extend(self.chain_tail.iter().cloned());
        chain
    }

    /// Signs synchronously (what [`Signer::sign`] does for the local CA).
    pub fn sign_now(
        &self,
        identity: &SpiffeId,
        subject_public_key_info: &[u8],
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let (not_before, not_after) = self.window(&identity.to_string(), lifetime)?;
        self.sign_valid(identity, subject_public_key_info, not_before, not_after)
    }

    /// Signs a node's or the CA API's certificate (see [`ControlId`]) valid from now.
    pub fn sign_control_now(
        &self,
        id: &ControlId,
        subject_public_key_info: &[u8],
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let (not_before, not_after) = self.window(&id.to_string(), lifetime)?;
        self.sign_control_valid(id, subject_public_key_info, not_before, not_after)
    }

    /// From a little before now (clock skew between nodes, without eating a short lifetime)
    /// to `lifetime` from now, cut at the CA's own end (a leaf outliving its CA would fail
    /// verification anyway).
    fn window(
        &self,
        subject: &str,
        lifetime: Duration,
    ) -> Result<(SystemTime, SystemTime), CaError> {
        let now = SystemTime::now();
        let skew = (lifetime / 10).min(Duration::from_secs(60));
        let not_after = (now + lifetime).min(self.not_after);
        if not_after <= now {
            return Err(CaError::Sign {
                identity: subject.to_owned(),
                reason: "the CA certificate has expired".into(),
            });
        }
        Ok((now - skew, not_after))
    }

    /// Signs with an explicit validity window, unchecked (tests make expired and
    /// not-yet-valid certificates with it). A workload certificate serves both ends of a
    /// tunnel: server and client authentication.
    pub fn sign_valid(
        &self,
        identity: &SpiffeId,
        subject_public_key_info: &[u8],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let window = (not_before, not_after);
        self.sign_leaf(
            &identity.to_string(),
            usages,
            subject_public_key_info,
            window,
        )
    }

    /// As [`sign_valid`](Self::sign_valid) for a [`ControlId`]: a node certificate only
    /// authenticates a client (the node to the CA), the CA's only a server.
    pub fn sign_control_valid(
        &self,
        id: &ControlId,
        subject_public_key_info: &[u8],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let usage = match id {
            ControlId::Node { .. } => ExtendedKeyUsagePurpose::ClientAuth,
            ControlId::Ca { .. } => ExtendedKeyUsagePurpose::ServerAuth,
        };
        let window = (not_before, not_after);
        self.sign_leaf(
            &id.to_string(),
            vec![usage],
            subject_public_key_info,
            window,
        )
    }

    /// A leaf whose only name is the URI SAN `uri`, with the CA's chain after it.
    fn sign_leaf(
        &self,
        uri: &str,
        usages: Vec<ExtendedKeyUsagePurpose>,
        subject_public_key_info: &[u8],
        (not_before, not_after): (SystemTime, SystemTime),
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let fail = |reason: String| CaError::Sign {
            identity: uri.to_owned(),
            reason,
        };
        let public_key = SubjectPublicKeyInfo::from_der(subject_public_key_info)
            .map_err(|e| fail(format!("public key: {e}")))?;
        let mut params = CertificateParams::default();
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(random_serial());
        // No subject: the identity is the URI SAN (rcgen marks the SAN critical then).
        params.distinguished_name = DistinguishedName::new();
        let uri = uri
            .to_owned()
            .try_into()
            .map_err(|e: rcgen::Error| fail(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let mut chain = Vec::with_capacity(2 + self.chain_tail.len());
        chain.push(leaf.der().clone());
        if !self.is_root {
            chain.push(self.certificate.clone());
        }
        chain.extend(self.chain_tail.iter().cloned());
        Ok(chain)
    }
}

impl Signer for LocalCa {
    fn sign<'a>(
        &'a self,
        identity: &'a SpiffeId,
        subject_public_key_info: &'a [u8],
        lifetime: Duration,
    ) -> SignFuture<'a> {
        // An ECDSA signature is tens of microseconds: not worth a blocking-pool hop.
        Box::pin(async move { self.sign_now(identity, subject_public_key_info, lifetime) })
    }
}

/// A positive 128-bit random serial (RFC 5280 allows up to 20 bytes; the top bit is cleared
/// so the DER integer stays positive without padding).
pub(super) fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    if rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .is_err()
    {
        // ring's system RNG does not fail on Linux; fall back rather than panic.
        bytes = fastrand::u128(..).to_be_bytes();
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}
