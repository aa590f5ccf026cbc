//! Workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccount>`.
//!
//! Parsing is strict on purpose: an identity is compared byte for byte against the URI SAN of
//! a peer certificate, so two spellings of "the same" identity (upper case, percent escapes, a
//! trailing slash, a port) must not both be accepted.

use std::{fmt, str::FromStr};

use crate::names::{self, NameError};

/// The URI scheme and separator every identity starts with.
const SCHEME: &str = "spiffe://";
/// SPIFFE caps the whole ID at 2048 bytes (the trust domain's cap is in [`names`]).
const MAX_ID: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    #[error("identity {0:?} is longer than {MAX_ID} bytes")]
    TooLong(String),
    #[error("identity {id:?}: bad trust domain: {reason}")]
    TrustDomain { id: String, reason: NameError },
    #[error("identity {0:?}: the path must be /ns/<namespace>/sa/<serviceAccount>")]
    Path(String),
    #[error("identity {id:?}: bad namespace: {reason}")]
    Namespace { id: String, reason: NameError },
    #[error("identity {id:?}: bad service account: {reason}")]
    ServiceAccount { id: String, reason: NameError },
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

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccount>`, each part by the
    /// rules of [`crate::names`].
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
        names::Kind::TrustDomain
            .check(trust_domain)
            .map_err(|reason| IdentityError::TrustDomain {
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
        names::Kind::Namespace
            .check(namespace)
            .map_err(|reason| IdentityError::Namespace {
                id: owned(),
                reason,
            })?;
        names::Kind::ServiceAccount
            .check(service_account)
            .map_err(|reason| IdentityError::ServiceAccount {
                id: owned(),
                reason,
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

    /// Whether the identity's text (`spiffe://...`) starts with `prefix`, compared byte for
    /// byte, without building the text (authorization calls this per connection).
    pub fn starts_with(&self, prefix: &str) -> bool {
        let mut rest = prefix;
        for part in [
            SCHEME,
            self.trust_domain.as_str(),
            "/ns/",
            self.namespace.as_str(),
            "/sa/",
            self.service_account.as_str(),
        ] {
            if rest.len() <= part.len() {
                return part.as_bytes().starts_with(rest.as_bytes());
            }
            match rest.strip_prefix(part) {
                Some(tail) => rest = tail,
                None => return false,
            }
        }
        rest.is_empty()
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

/// As its string, the way the configuration writes it (for `/config_dump`).
impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
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

    #[test]
    fn starts_with_compares_the_text() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/client").expect("valid");
        let text = id.to_string();
        for end in 0..=text.len() {
            assert!(id.starts_with(&text[..end]), "{}", &text[..end]);
        }
        for other in [
            "spiffe://cluster.local/ns/demo/sa/clientx",
            "spiffe://cluster.local/ns/demo/sa/clients",
            "spiffe://cluster.local/ns/demo-test/",
            "spiffe://cluster.localx",
            "spiffe://cluster.local/ns/dem0",
            "SPIFFE://",
            "x",
        ] {
            assert!(!id.starts_with(other), "{other}");
        }
    }
}
