//! The trust bundle: every root a peer chain may end in. Several at once, so a root rotation
//! is: add the new root everywhere, reissue, remove the old root.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use rustls::pki_types::{CertificateDer, TrustAnchor, pem::PemObject};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading trust bundle {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("trust bundle {path}: no PEM certificate in it")]
    NoCertificates { path: PathBuf },
    #[error("trust bundle {path}: certificate {index}: {reason}")]
    BadCertificate {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("the trust bundle is empty")]
    Empty,
}

/// A set of trusted roots. Immutable; the certificate store swaps whole bundles.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// All certificates of all the PEM files, each one a root.
    pub fn from_pem_files<P: AsRef<Path>>(paths: &[P]) -> Result<Self, BundleError> {
        let mut roots = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let pem = fs::read(path).map_err(|source| BundleError::Read {
                path: path.to_owned(),
                source,
            })?;
            let before = roots.len();
            for (index, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
                roots.push(cert.map_err(|e| BundleError::BadCertificate {
                    path: path.to_owned(),
                    index,
                    reason: e.to_string(),
                })?);
            }
            if roots.len() == before {
                return Err(BundleError::NoCertificates {
                    path: path.to_owned(),
                });
            }
        }
        Self::from_roots(roots).map_err(|(index, reason)| BundleError::BadCertificate {
            path: PathBuf::from("<bundle>"),
            index,
            reason,
        })
    }

    /// From PEM text (one or more certificates).
    pub fn from_pem(pem: &[u8]) -> Result<Self, BundleError> {
        let path = || PathBuf::from("<memory>");
        let mut roots = Vec::new();
        for (index, cert) in CertificateDer::pem_slice_iter(pem).enumerate() {
            roots.push(cert.map_err(|e| BundleError::BadCertificate {
                path: path(),
                index,
                reason: e.to_string(),
            })?);
        }
        Self::from_roots(roots).map_err(|(index, reason)| BundleError::BadCertificate {
            path: path(),
            index,
            reason,
        })
    }

    /// From DER roots; the error names the index of the first unusable one.
    pub fn from_ders(roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        Self::from_roots(roots).map_err(|(index, reason)| BundleError::BadCertificate {
            path: PathBuf::from("<der>"),
            index,
            reason,
        })
    }

    fn from_roots(roots: Vec<CertificateDer<'static>>) -> Result<Self, (usize, String)> {
        if roots.is_empty() {
            return Err((0, BundleError::Empty.to_string()));
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, root)| {
                webpki::anchor_from_trusted_cert(root)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|e| (index, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { roots, anchors })
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// Merges two bundles (old and new root during a rotation).
    pub fn merged(&self, other: &TrustBundle) -> TrustBundle {
        let mut merged = self.clone();
        for (root, anchor) in other.roots.iter().zip(&other.anchors) {
            if !merged.roots.contains(root) {
                merged.roots.push(root.clone());
                merged.anchors.push(anchor.clone());
            }
        }
        merged
    }
}
