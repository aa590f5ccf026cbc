//! The one set of name rules of the mesh, so that the configuration, workload identities and
//! authorization cannot disagree about what a namespace or a service account may be.
//!
//! The rules are Kubernetes' (a name in the file is meant to be the name of a Kubernetes object)
//! and SPIFFE's for the trust domain:
//! - a namespace is an RFC 1123 DNS *label*: 1 to 63 lower-case letters, digits or '-',
//!   starting and ending with a letter or digit, no '.' (it is one segment of an identity);
//!   so is a subset of a service's endpoints (Istio's rule for `DestinationRule` subsets);
//! - service accounts, workloads, nodes, services, policies and port names are RFC 1123 DNS
//!   *subdomains*: at most 253 bytes, dot-separated labels as above (Kubernetes does not cap
//!   each label of a subdomain at 63, so neither does the mesh);
//! - a trust domain is SPIFFE's: 1 to 255 lower-case letters, digits, '.', '-' or '_'.
//!
//! Nothing here depends on the rest of the crate.

use std::fmt;

/// What a name names; decides the rule it follows and how messages call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Namespace,
    ServiceAccount,
    Workload,
    Node,
    Service,
    Policy,
    Port,
    /// A subset of a service's endpoints (`trafficPolicy.subsets[].name`).
    Subset,
    TrustDomain,
}

/// Why a name breaks its rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty")]
    Empty,
    #[error("longer than {max} bytes")]
    TooLong { max: usize },
    #[error("only lower-case letters, digits and '-' are allowed")]
    LabelCharacter,
    #[error("only lower-case letters, digits, '-' and '.' are allowed")]
    SubdomainCharacter,
    #[error("only lower-case letters, digits, '.', '-' and '_' are allowed")]
    TrustDomainCharacter,
    #[error("an empty part between dots")]
    EmptyPart,
    #[error("each dot-separated part must start and end with a letter or digit")]
    Edge,
}

/// RFC 1123 label length (a namespace).
pub const MAX_LABEL: usize = 63;
/// RFC 1123 subdomain length (every other Kubernetes name here).
pub const MAX_SUBDOMAIN: usize = 253;
/// SPIFFE's cap on a trust domain.
pub const MAX_TRUST_DOMAIN: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    DnsLabel,
    DnsSubdomain,
    TrustDomain,
}

impl Kind {
    fn rule(self) -> Rule {
        match self {
            Kind::Namespace | Kind::Subset => Rule::DnsLabel,
            Kind::ServiceAccount
            | Kind::Workload
            | Kind::Node
            | Kind::Service
            | Kind::Policy
            | Kind::Port => Rule::DnsSubdomain,
            Kind::TrustDomain => Rule::TrustDomain,
        }
    }

    /// Checks `name` against the rule of this kind.
    pub fn check(self, name: &str) -> Result<(), NameError> {
        match self.rule() {
            Rule::DnsLabel => dns_label(name),
            Rule::DnsSubdomain => dns_subdomain(name),
            Rule::TrustDomain => trust_domain(name),
        }
    }

    /// The rule, as advice to whoever wrote a bad name.
    pub fn rule_text(self) -> &'static str {
        match self.rule() {
            Rule::DnsLabel => {
                "use 1 to 63 lowercase letters, digits or '-' (no '.'), starting and ending with \
                 a letter or digit"
            }
            Rule::DnsSubdomain => {
                "use 1 to 253 lowercase letters, digits, '-' or '.', each dot-separated part \
                 starting and ending with a letter or digit"
            }
            Rule::TrustDomain => "use 1 to 255 lowercase letters, digits, '.', '-' or '_'",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Namespace => "namespace",
            Kind::ServiceAccount => "service account",
            Kind::Workload => "workload name",
            Kind::Node => "node name",
            Kind::Service => "service name",
            Kind::Policy => "policy name",
            Kind::Port => "port name",
            Kind::Subset => "subset name",
            Kind::TrustDomain => "trust domain",
        })
    }
}

/// An RFC 1123 label: a namespace.
pub fn dns_label(name: &str) -> Result<(), NameError> {
    length(name, MAX_LABEL)?;
    if !name.bytes().all(label_byte) {
        return Err(NameError::LabelCharacter);
    }
    edges(name)
}

/// An RFC 1123 subdomain, as Kubernetes checks it (no per-label cap).
pub fn dns_subdomain(name: &str) -> Result<(), NameError> {
    length(name, MAX_SUBDOMAIN)?;
    if !name.bytes().all(|b| label_byte(b) || b == b'.') {
        return Err(NameError::SubdomainCharacter);
    }
    name.split('.').try_for_each(|part| {
        if part.is_empty() {
            Err(NameError::EmptyPart)
        } else {
            edges(part)
        }
    })
}

/// A SPIFFE trust domain: lower-case letters, digits, '.', '-', '_'; no port, no user info.
pub fn trust_domain(name: &str) -> Result<(), NameError> {
    length(name, MAX_TRUST_DOMAIN)?;
    if !name
        .bytes()
        .all(|b| label_byte(b) || matches!(b, b'.' | b'_'))
    {
        return Err(NameError::TrustDomainCharacter);
    }
    Ok(())
}

fn length(name: &str, max: usize) -> Result<(), NameError> {
    match name.len() {
        0 => Err(NameError::Empty),
        n if n > max => Err(NameError::TooLong { max }),
        _ => Ok(()),
    }
}

fn label_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
}

fn edges(label: &str) -> Result<(), NameError> {
    if label.starts_with('-') || label.ends_with('-') {
        Err(NameError::Edge)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Kind, NameError, dns_label, dns_subdomain, trust_domain};

    #[test]
    fn labels() {
        for good in ["a", "team-a", "0", "a1", &"a".repeat(63)] {
            assert_eq!(dns_label(good), Ok(()), "{good}");
        }
        assert_eq!(dns_label(""), Err(NameError::Empty));
        assert_eq!(
            dns_label(&"a".repeat(64)),
            Err(NameError::TooLong { max: 63 })
        );
        assert_eq!(dns_label("team.a"), Err(NameError::LabelCharacter));
        assert_eq!(dns_label("Team"), Err(NameError::LabelCharacter));
        assert_eq!(dns_label("a_b"), Err(NameError::LabelCharacter));
        assert_eq!(dns_label("-a"), Err(NameError::Edge));
        assert_eq!(dns_label("a-"), Err(NameError::Edge));
    }

    #[test]
    fn subdomains() {
        for good in [
            "a",
            "checkout.v2",
            "a-b.c-d.e",
            &"a".repeat(64),
            &"a".repeat(253),
        ] {
            assert_eq!(dns_subdomain(good), Ok(()), "{good}");
        }
        assert_eq!(dns_subdomain(""), Err(NameError::Empty));
        assert_eq!(
            dns_subdomain(&"a".repeat(254)),
            Err(NameError::TooLong { max: 253 })
        );
        for (bad, why) in [
            ("a..b", NameError::EmptyPart),
            (".a", NameError::EmptyPart),
            ("a.", NameError::EmptyPart),
            ("a.-b", NameError::Edge),
            ("a-.b", NameError::Edge),
            ("a/b", NameError::SubdomainCharacter),
            ("Web_1", NameError::SubdomainCharacter),
        ] {
            assert_eq!(dns_subdomain(bad), Err(why), "{bad}");
        }
    }

    #[test]
    fn trust_domains() {
        for good in ["cluster.local", "a_b", "prod-1.example.org"] {
            assert_eq!(trust_domain(good), Ok(()), "{good}");
        }
        assert_eq!(trust_domain(""), Err(NameError::Empty));
        for bad in ["Cluster.local", "a:8443", "a/b", "user@a"] {
            assert_eq!(
                trust_domain(bad),
                Err(NameError::TrustDomainCharacter),
                "{bad}"
            );
        }
        assert_eq!(
            trust_domain(&"a".repeat(256)),
            Err(NameError::TooLong { max: 255 })
        );
    }

    #[test]
    fn kinds_follow_kubernetes() {
        assert!(Kind::Namespace.check("team.a").is_err());
        assert!(Kind::Subset.check("v1.2").is_err());
        assert_eq!(Kind::Subset.check("canary-2"), Ok(()));
        for kind in [
            Kind::ServiceAccount,
            Kind::Workload,
            Kind::Node,
            Kind::Service,
            Kind::Policy,
            Kind::Port,
        ] {
            assert_eq!(kind.check("team.a"), Ok(()), "{kind}");
        }
        assert_eq!(Kind::TrustDomain.check("team.a"), Ok(()));
    }
}
