//! Reading what the mesh needs out of an X.509 certificate: the SPIFFE identity (its one URI
//! SAN: a workload's, or a node's or the CA's), the serial and the validity window.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::{
    control::{ControlId, ControlIdError},
    identity::{IdentityError, SpiffeId},
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("not a DER X.509 certificate: {0}")]
    Parse(String),
    #[error("the certificate carries no spiffe:// URI SAN")]
    NoIdentity,
    #[error("the certificate carries several URI SANs; an X509-SVID has exactly one")]
    SeveralIdentities,
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Control(#[from] ControlIdError),
}

/// What the admin API shows about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: SpiffeId,
    /// Lower-case hex, no separators.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::Parse("trailing bytes".into()));
    }
    Ok(cert)
}

/// The SPIFFE identity of a (leaf) certificate. Exactly one URI SAN is allowed, as the
/// X509-SVID specification requires: with two, which one the peer "is" would be ambiguous.
pub fn identity_of(der: &[u8]) -> Result<SpiffeId, CertError> {
    identity_of_parsed(&parse(der)?)
}

fn identity_of_parsed(cert: &X509Certificate<'_>) -> Result<SpiffeId, CertError> {
    Ok(SpiffeId::parse(single_uri(cert)?)?)
}

/// The node or CA identity of a certificate of the CA's API (its one URI SAN).
pub fn control_id_of(der: &[u8]) -> Result<ControlId, CertError> {
    Ok(ControlId::parse(single_uri(&parse(der)?)?)?)
}

/// The one URI SAN of a certificate.
fn single_uri<'a>(cert: &'a X509Certificate<'_>) -> Result<&'a str, CertError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Parse(e.to_string()))?
        .ok_or(CertError::NoIdentity)?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let uri = uris.next().ok_or(CertError::NoIdentity)?;
    if uris.next().is_some() {
        return Err(CertError::SeveralIdentities);
    }
    Ok(uri)
}

/// Identity, serial and validity of a leaf certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, CertError> {
    let cert = parse(der)?;
    Ok(CertInfo {
        identity: identity_of_parsed(&cert)?,
        serial: hex(cert.raw_serial()),
        not_before: system_time(cert.validity().not_before.timestamp()),
        not_after: system_time(cert.validity().not_after.timestamp()),
    })
}

/// Validity window of any certificate (the CA's too).
pub(crate) fn validity(der: &[u8]) -> Result<(SystemTime, SystemTime), CertError> {
    let cert = parse(der)?;
    Ok((
        system_time(cert.validity().not_before.timestamp()),
        system_time(cert.validity().not_after.timestamp()),
    ))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn system_time(unix_seconds: i64) -> SystemTime {
    if unix_seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix_seconds.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs())
    }
}
