//! Making CAs and writing their files: `mesh-agent ca init` (a self-signed development root,
//! or with `--parent` an intermediate under an existing CA), and the PEM and file helpers the
//! CA role shares (`mesh-agent ca issue-node` writes a node certificate and key with them).
//! Keys are written first and readable only by their owner.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use super::ca::{CA_CERT_FILE, CA_KEY_FILE, CaError, LocalCa, random_serial};

/// A freshly generated development CA, PEM-encoded.
pub struct DevCa {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Generates a self-signed ECDSA P-256 development CA valid from now for `days` days.
pub fn generate_dev_ca(trust_domain: &str, days: u32) -> Result<DevCa, CaError> {
    generate_ca_valid(
        trust_domain,
        SystemTime::now(),
        SystemTime::now() + Duration::from_secs(u64::from(days) * 86_400),
    )
}

/// A self-signed CA with an explicit validity window (tests make expired ones with it).
pub fn generate_ca_valid(
    trust_domain: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<DevCa, CaError> {
    let fail = |reason: String| CaError::Sign {
        identity: format!("CA of {trust_domain}"),
        reason,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
    let params = ca_params(trust_domain, not_before, not_after);
    let cert = params.self_signed(&key).map_err(|e| fail(e.to_string()))?;
    Ok(DevCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

impl LocalCa {
    /// A new intermediate CA under this one, valid from now for `days` days (cut at this
    /// CA's end): its certificate PEM is followed by this CA's chain, as [`LocalCa::load`]
    /// reads it, so the leaves it signs carry the whole chain up to the root.
    pub fn generate_intermediate(&self, trust_domain: &str, days: u32) -> Result<DevCa, CaError> {
        let fail = |reason: String| CaError::Sign {
            identity: format!("intermediate CA of {trust_domain}"),
            reason,
        };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let now = SystemTime::now();
        let not_after = (now + Duration::from_secs(u64::from(days) * 86_400)).min(self.not_after);
        let mut params = ca_params(trust_domain, now, not_after);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "intermediate");
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let mut cert_pem = cert.pem();
        for der in self.chain() {
            cert_pem.push_str(&pem_certificate(&der));
        }
        Ok(DevCa {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }
}

/// The parameters of a CA certificate (root or intermediate) of `trust_domain`.
fn ca_params(
    trust_domain: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.not_before = OffsetDateTime::from(not_before);
    params.not_after = OffsetDateTime::from(not_after);
    params.serial_number = Some(random_serial());
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "mesh-agent development CA");
    params
        .distinguished_name
        .push(DnType::CommonName, trust_domain);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// One certificate as PEM text.
pub fn pem_certificate(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// `mesh-agent ca init`: writes `ca.crt` and `ca.key` (mode 0600) into `dir`, creating it.
/// Refuses to replace either file unless `force`. Returns the two paths.
pub fn init_dev_ca(
    dir: &Path,
    trust_domain: &str,
    days: u32,
    force: bool,
) -> Result<(PathBuf, PathBuf), CaError> {
    check_trust_domain(trust_domain)?;
    write_ca(dir, force, || generate_dev_ca(trust_domain, days))
}

fn check_trust_domain(trust_domain: &str) -> Result<(), CaError> {
    crate::names::Kind::TrustDomain
        .check(trust_domain)
        .map_err(|reason| CaError::Sign {
            identity: format!("CA of {trust_domain:?}"),
            reason: format!("bad trust domain: {reason}"),
        })
}

/// `mesh-agent ca init --parent`: as [`init_dev_ca`], with an intermediate CA signed by the
/// CA in `parent` (its `ca.crt` and `ca.key`); `ca.crt` holds the intermediate, then the
/// parent's chain.
pub fn init_intermediate_ca(
    parent: &Path,
    dir: &Path,
    trust_domain: &str,
    days: u32,
    force: bool,
) -> Result<(PathBuf, PathBuf), CaError> {
    check_trust_domain(trust_domain)?;
    let parent = LocalCa::load_dir(parent)?;
    write_ca(dir, force, || {
        parent.generate_intermediate(trust_domain, days)
    })
}

/// Writes a CA made by `make` as `ca.crt` and `ca.key` into `dir`, creating it; refuses to
/// replace either file unless `force`.
fn write_ca(
    dir: &Path,
    force: bool,
    make: impl FnOnce() -> Result<DevCa, CaError>,
) -> Result<(PathBuf, PathBuf), CaError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if !force {
        for path in [&cert_path, &key_path] {
            if path.symlink_metadata().is_ok() {
                return Err(CaError::Exists { path: path.clone() });
            }
        }
    }
    fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let ca = make()?;
    // The key first, so a crash never leaves a certificate without its key.
    write_file(&key_path, ca.key_pem.as_bytes(), 0o600, force)?;
    write_file(&cert_path, ca.cert_pem.as_bytes(), 0o644, force)?;
    Ok((cert_path, key_path))
}

/// Writes `contents` to `path` with `mode`; refuses to replace a file unless `force`.
pub fn write_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        // create_new: a file appearing between the check and now is still not overwritten.
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => CaError::Exists {
            path: path.to_owned(),
        },
        _ => err(source),
    })?;
    // `mode` only applies to new files; an overwritten key must not keep looser permissions.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}
