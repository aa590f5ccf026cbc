//! Workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccount>`.
//!
//! Parsing is strict on purpose: an identity is compared byte for byte against the URI SAN of
//! a peer certificate, so two spellings of "the same" identity (upper case, percent escapes, a
//! trailing slash, a port) must not both be accepted.

use std::{fmt, str::FromStr};

/// The URI scheme and separator every identity starts with.
const SCHEME: &str = "spiffe://";
/// SPIFFE caps the trust domain at 255 bytes and the whole ID at 2048.
const MAX_TRUST_DOMAIN: usize = 255;
const MAX_ID: usize = 2048;
/// Kubernetes: a namespace is a DNS label, a service account name a DNS subdomain.
const MAX_LABEL: usize = 63;
const MAX_SUBDOMAIN: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    #[error("identity {0:?} is longer than {MAX_ID} bytes")]
    TooLong(String),
    #[error("identity {id:?}: bad trust domain: {reason}")]
    TrustDomain { id: String, reason: &'static str },
    #[error("identity {0:?}: the path must be /ns/<namespace>/sa/<serviceAccount>")]
    Path(String),
    #[error("identity {id:?}: bad namespace: {reason}")]
    Namespace { id: String, reason: &'static str },
    #[error("identity {id:?}: bad service account: {reason}")]
    ServiceAccount { id: String, reason: &'static str },
}

/// A validated SPIFFE identity of a Kubernetes service account. Cheap enough to clone (three
/// short strings); ordered and hashable so it can key maps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let id = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        let parsed = Self::parse(&id)?;
        // A part containing '/' would re-split differently; the round trip catches it.
        if parsed.trust_domain != trust_domain
            || parsed.namespace != namespace
            || parsed.service_account != service_account
        {
            return Err(IdentityError::Path(id));
        }
        Ok(parsed)
    }

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccount>`.
    pub fn parse(id: &str) -> Result<Self, IdentityError> {
        let owned = || id.to_owned();
        if id.len() > MAX_ID {
            return Err(IdentityError::TooLong(owned()));
        }
        let rest = id
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Scheme(owned()))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::Path(owned()))?;
        validate_trust_domain(trust_domain).map_err(|reason| IdentityError::TrustDomain {
            id: owned(),
            reason,
        })?;
        let mut segments = path.split('/');
        let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(IdentityError::Path(owned()));
        };
        validate_dns(namespace, MAX_LABEL, false).map_err(|reason| IdentityError::Namespace {
            id: owned(),
            reason,
        })?;
        validate_dns(service_account, MAX_SUBDOMAIN, true).map_err(|reason| {
            IdentityError::ServiceAccount {
                id: owned(),
                reason,
            }
        })?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// SPIFFE: lower-case letters, digits, '.', '-', '_'; no port, no user info.
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), &'static str> {
    if trust_domain.is_empty() {
        return Err("empty");
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN {
        return Err("longer than 255 bytes");
    }
    if !trust_domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("only lower-case letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

/// An RFC 1123 label (`dots == false`) or subdomain (`dots == true`), as Kubernetes names are.
fn validate_dns(name: &str, max: usize, dots: bool) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > max {
        return Err("too long");
    }
    let labels: Vec<&str> = if dots {
        name.split('.').collect()
    } else {
        vec![name]
    };
    for label in labels {
        if label.is_empty() || label.len() > MAX_LABEL {
            return Err("empty or over-long DNS label");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("only lower-case letters, digits and '-' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("must start and end with a letter or digit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{IdentityError, SpiffeId};

    #[test]
    fn round_trips() {
        let text = "spiffe://cluster.local/ns/shop/sa/checkout.v2";
        let id = SpiffeId::parse(text).expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "checkout.v2");
        assert_eq!(id.to_string(), text);
        assert_eq!(
            SpiffeId::new("cluster.local", "shop", "checkout.v2"),
            Ok(id)
        );
    }

    #[test]
    fn rejects_near_misses() {
        for bad in [
            "",
            "spiffe:/cluster.local/ns/a/sa/b",
            "SPIFFE://cluster.local/ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:443/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a.b/sa/b",
            "spiffe://cluster.local/ns/-a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b%2f",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b#f",
            "spiffe://cluster.local/ns/a/sa/..",
            "spiffe://cluster.local/ns/a/sa/b..c",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long_ns = format!("spiffe://td/ns/{}/sa/b", "a".repeat(64));
        assert!(matches!(
            SpiffeId::parse(&long_ns),
            Err(IdentityError::Namespace { .. })
        ));
        assert!(SpiffeId::new("td", "a/sa/b", "c").is_err());
    }
}
