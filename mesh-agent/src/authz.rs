//! L4 authorization: may this source open a connection to this workload's port?
//!
//! A pure function of the configuration snapshot ([`crate::config::Policies`]), cheap enough to
//! call once per accepted connection: the policies applying to each workload are precomputed
//! in the snapshot, and a decision walks only those.
//!
//! # Semantics (Istio's `AuthorizationPolicy`, L4 only)
//!
//! A policy *applies to* a workload when the workload is in the policy's namespace and its
//! labels include the policy's selector (no selector: every workload of the namespace). A
//! policy *matches* a connection when any of its rules matches; a rule matches when all the
//! conditions it has match (`from`, `ports`). A policy without rules matches nothing when it
//! allows, everything when it denies.
//!
//! For a connection to `destination`:`port` from `source`:
//! 1. if a DENY policy applying to the destination matches, the connection is denied;
//! 2. else, if some ALLOW policy applies to the destination, the connection is allowed only
//!    when one of them matches;
//! 3. else it is allowed (no policy: default allow).
//!
//! `source` is the peer's SPIFFE ID from its mTLS certificate (already parsed and checked by
//! [`SpiffeId`], the one parser of identities), `None` for a plaintext (unauthenticated)
//! connection. A `from` block has only identity conditions (exact identities, identity
//! prefixes, namespaces), so it never matches an unauthenticated source; a rule without `from`
//! matches any source. A `namespaces` condition matches the identity's namespace only when its
//! trust domain is the agent's (`agent.trustDomain`): `/ns/demo/` of another trust domain is
//! another organisation's `demo`, not ours.
//!
//! `port` is the destination port the workload itself listens on (a service's target port),
//! not the service port.

use crate::{
    config::{AuthorizationAction, AuthorizationPolicy, Config, RuleSource, Workload},
    tls::SpiffeId,
};

/// The reasons a [`Decision`] can carry: a small fixed set, usable as a metric label.
pub mod reason {
    /// No policy applies to the destination.
    pub const NO_POLICY: &str = "no policy";
    /// A DENY policy matched.
    pub const DENY_POLICY: &str = "deny policy matched";
    /// An ALLOW policy matched.
    pub const ALLOW_POLICY: &str = "allow policy matched";
    /// ALLOW policies apply to the destination but none matched.
    pub const NO_ALLOW_MATCH: &str = "no allow policy matched";
}

/// The outcome of [`authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided (the DENY or ALLOW policy that matched);
    /// `None` when no policy applies or when no ALLOW policy matched.
    pub policy: Option<String>,
    /// One of the [`reason`] constants.
    pub reason: &'static str,
}

impl Decision {
    fn by(policy: &AuthorizationPolicy, allowed: bool, reason: &'static str) -> Self {
        Self {
            allowed,
            policy: Some(policy.qualified_name().to_string()),
            reason,
        }
    }
}

/// Decides whether `source` (a SPIFFE ID, `None` when unauthenticated) may connect to
/// `destination` on `port`, by the authorization policies of `config`. See the module
/// documentation for the semantics.
pub fn authorize(
    config: &Config,
    source: Option<&SpiffeId>,
    destination: &Workload,
    port: u16,
) -> Decision {
    let peer = Peer::new(source, &config.agent.startup.trust_domain);
    let mut any_allow = false;
    // DENY first, whatever the file order; remember whether an ALLOW policy applies.
    for policy in config.authorization_policies_for(destination) {
        match policy.action {
            AuthorizationAction::Deny if policy_matches(policy, &peer, port) => {
                return Decision::by(policy, false, reason::DENY_POLICY);
            }
            AuthorizationAction::Deny => {}
            AuthorizationAction::Allow => any_allow = true,
        }
    }
    if !any_allow {
        return Decision {
            allowed: true,
            policy: None,
            reason: reason::NO_POLICY,
        };
    }
    config
        .authorization_policies_for(destination)
        .find(|p| p.action == AuthorizationAction::Allow && policy_matches(p, &peer, port))
        .map(|p| Decision::by(p, true, reason::ALLOW_POLICY))
        .unwrap_or(Decision {
            allowed: false,
            policy: None,
            reason: reason::NO_ALLOW_MATCH,
        })
}

/// The source of a connection, with the namespace its `namespaces` conditions see.
struct Peer<'a> {
    /// `None`: unauthenticated.
    id: Option<&'a SpiffeId>,
    /// The namespace of an identity of the agent's trust domain; `None` for another trust
    /// domain's.
    namespace: Option<&'a str>,
}

impl<'a> Peer<'a> {
    fn new(id: Option<&'a SpiffeId>, trust_domain: &str) -> Self {
        Self {
            id,
            namespace: id
                .filter(|id| id.trust_domain() == trust_domain)
                .map(SpiffeId::namespace),
        }
    }
}

fn policy_matches(policy: &AuthorizationPolicy, peer: &Peer<'_>, port: u16) -> bool {
    if policy.rules.is_empty() {
        return policy.action == AuthorizationAction::Deny;
    }
    policy.rules.iter().any(|rule| {
        (rule.ports.is_empty() || rule.ports.contains(&port))
            && rule
                .from
                .as_ref()
                .is_none_or(|from| source_matches(from, peer))
    })
}

fn source_matches(from: &RuleSource, peer: &Peer<'_>) -> bool {
    let has_principals = !from.identities.is_empty() || !from.identity_prefixes.is_empty();
    let has_namespaces = !from.namespaces.is_empty();
    if !has_principals && !has_namespaces {
        // No condition (the file cannot write this; other sources might).
        return true;
    }
    let Some(id) = peer.id else {
        return false;
    };
    let principal_ok = !has_principals
        || from.identities.contains(id)
        || from.identity_prefixes.iter().any(|p| id.starts_with(p));
    let namespace_ok = !has_namespaces
        || peer
            .namespace
            .is_some_and(|ns| from.namespaces.iter().any(|n| n == ns));
    principal_ok && namespace_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
    const OTHER: &str = "spiffe://cluster.local/ns/demo/sa/other";
    const PROD: &str = "spiffe://cluster.local/ns/prod/sa/client";
    const FOREIGN: &str = "spiffe://example.org/ns/demo/sa/client";

    /// Workloads: demo/echo-1 {app: echo, v: v1} (target of most tests), demo/echo-2
    /// {app: echo, v: v2}, demo/db {app: db}, prod/echo {app: echo}; then `policies`, the
    /// lines of the `policies:` block.
    fn config(policies: &[&str]) -> Config {
        let mut text = String::from(
            "agent: {node: n}\n\
             workloads:\n\
             \x20 - {name: echo-1, namespace: demo, serviceAccount: echo, ips: [10.0.0.1], \
             node: m, labels: {app: echo, v: v1}}\n\
             \x20 - {name: echo-2, namespace: demo, serviceAccount: echo, ips: [10.0.0.2], \
             node: m, labels: {app: echo, v: v2}}\n\
             \x20 - {name: db, namespace: demo, ips: [10.0.0.3], node: m, labels: {app: db}}\n\
             \x20 - {name: echo, namespace: prod, ips: [10.0.0.4], node: m, labels: {app: echo}}\n\
             policies:\n\
             \x20 authorization:\n",
        );
        for line in policies {
            text.push_str("    ");
            text.push_str(line);
            text.push('\n');
        }
        Config::from_yaml_str(&text, "authz.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn workload<'a>(config: &'a Config, qualified: &str) -> &'a Workload {
        config
            .workloads()
            .iter()
            .find(|w| w.qualified_name().to_string() == qualified)
            .unwrap_or_else(|| panic!("no workload {qualified}"))
    }

    #[track_caller]
    fn id(text: &str) -> SpiffeId {
        SpiffeId::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[track_caller]
    fn decide(config: &Config, source: Option<&str>, dst: &str, port: u16) -> Decision {
        let source = source.map(id);
        authorize(config, source.as_ref(), workload(config, dst), port)
    }

    #[track_caller]
    fn allowed(config: &Config, source: Option<&str>, dst: &str, port: u16) -> bool {
        decide(config, source, dst, port).allowed
    }

    #[test]
    fn default_allow_without_policies() {
        let c = Config::from_yaml_str(
            "workloads: [{name: w, ips: [10.0.0.1], node: x}]\n",
            "t.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            authorize(&c, None, &c.workloads()[0], 80),
            Decision {
                allowed: true,
                policy: None,
                reason: reason::NO_POLICY,
            }
        );
        assert!(authorize(&c, Some(&id(CLIENT)), &c.workloads()[0], 80).allowed);
    }

    #[test]
    fn allow_list_admits_only_matches() {
        let c = config(&[
            "- name: echo-allow-client",
            "  namespace: demo",
            "  selector: {app: echo}",
            "  rules:",
            "    - from: {identities: [\"spiffe://cluster.local/ns/demo/sa/client\"]}",
            "      ports: [8080]",
        ]);
        assert_eq!(
            decide(&c, Some(CLIENT), "demo/echo-1", 8080),
            Decision {
                allowed: true,
                policy: Some("demo/echo-allow-client".into()),
                reason: reason::ALLOW_POLICY,
            }
        );
        assert_eq!(
            decide(&c, Some(OTHER), "demo/echo-1", 8080),
            Decision {
                allowed: false,
                policy: None,
                reason: reason::NO_ALLOW_MATCH,
            }
        );
        // Wrong port.
        assert!(!allowed(&c, Some(CLIENT), "demo/echo-1", 9090));
        // The selector takes both echo workloads, not db.
        assert!(!allowed(&c, Some(OTHER), "demo/echo-2", 8080));
        assert_eq!(
            decide(&c, Some(OTHER), "demo/db", 5432).reason,
            reason::NO_POLICY
        );
        // Another namespace's workloads are untouched, even with matching labels.
        assert_eq!(
            decide(&c, None, "prod/echo", 8080).reason,
            reason::NO_POLICY
        );
    }

    #[test]
    fn any_of_several_allow_policies_admits() {
        let c = config(&[
            "- {name: a, namespace: demo, rules: [{ports: [1]}]}",
            "- {name: b, namespace: demo, selector: {v: v1}, rules: [{ports: [2]}]}",
        ]);
        assert_eq!(
            decide(&c, None, "demo/echo-1", 1).policy.as_deref(),
            Some("demo/a")
        );
        assert_eq!(
            decide(&c, None, "demo/echo-1", 2).policy.as_deref(),
            Some("demo/b")
        );
        assert!(!allowed(&c, None, "demo/echo-1", 3));
        // b does not apply to echo-2: only a.
        assert!(!allowed(&c, None, "demo/echo-2", 2));
    }

    #[test]
    fn deny_wins_over_allow_whatever_the_order() {
        let c = config(&[
            "- {name: allow-all, namespace: demo, rules: [{}]}",
            "- {name: no-other, namespace: demo, action: deny, selector: {app: echo}, \
             rules: [{from: {identities: [\"spiffe://cluster.local/ns/demo/sa/other\"]}}]}",
        ]);
        assert_eq!(
            decide(&c, Some(OTHER), "demo/echo-1", 8080),
            Decision {
                allowed: false,
                policy: Some("demo/no-other".into()),
                reason: reason::DENY_POLICY,
            }
        );
        assert_eq!(
            decide(&c, Some(CLIENT), "demo/echo-1", 8080)
                .policy
                .as_deref(),
            Some("demo/allow-all")
        );
        // The deny policy does not select db.
        assert!(allowed(&c, Some(OTHER), "demo/db", 8080));
        // A rule with no condition matches unauthenticated sources too.
        assert!(allowed(&c, None, "demo/echo-1", 8080));
    }

    #[test]
    fn deny_alone_leaves_the_rest_allowed() {
        let c = config(&[
            "- {name: no-admin-port, namespace: demo, action: deny, rules: [{ports: [9000]}]}",
        ]);
        assert!(!allowed(&c, Some(CLIENT), "demo/echo-1", 9000));
        assert!(!allowed(&c, None, "demo/db", 9000));
        assert_eq!(
            decide(&c, None, "demo/echo-1", 8080),
            Decision {
                allowed: true,
                policy: None,
                reason: reason::NO_POLICY,
            }
        );
    }

    #[test]
    fn empty_rules_allow_nothing_or_deny_everything() {
        let allow_none = config(&["- {name: lockdown, namespace: demo, selector: {v: v1}}"]);
        assert_eq!(
            decide(&allow_none, Some(CLIENT), "demo/echo-1", 8080).reason,
            reason::NO_ALLOW_MATCH
        );
        assert!(allowed(&allow_none, Some(CLIENT), "demo/echo-2", 8080));

        let deny_all = config(&[
            "- {name: open, namespace: demo, rules: [{}]}",
            "- {name: lockdown, namespace: demo, action: deny, rules: []}",
        ]);
        assert_eq!(
            decide(&deny_all, Some(CLIENT), "demo/echo-2", 1),
            Decision {
                allowed: false,
                policy: Some("demo/lockdown".into()),
                reason: reason::DENY_POLICY,
            }
        );
        assert!(allowed(&deny_all, None, "prod/echo", 1));
    }

    #[test]
    fn identities_exact_prefix_and_namespace() {
        let exact = config(
            &["- {name: p, namespace: demo, rules: [{from: {identities: \
             [\"spiffe://cluster.local/ns/demo/sa/client\"]}}]}"],
        );
        assert!(allowed(&exact, Some(CLIENT), "demo/echo-1", 80));
        assert!(!allowed(&exact, Some(OTHER), "demo/echo-1", 80));
        // Exact: neither a prefix nor an extension of the ID.
        assert!(!allowed(
            &exact,
            Some(&format!("{CLIENT}x")),
            "demo/echo-1",
            80
        ));
        assert!(!allowed(
            &exact,
            Some("spiffe://cluster.local/ns/demo/sa/clien"),
            "demo/echo-1",
            80
        ));

        let prefix = config(&[
            "- {name: p, namespace: demo, rules: [{from: {identityPrefixes: \
             [\"spiffe://cluster.local/ns/demo/\"]}}]}",
        ]);
        assert!(allowed(&prefix, Some(CLIENT), "demo/echo-1", 80));
        assert!(allowed(&prefix, Some(OTHER), "demo/echo-1", 80));
        assert!(!allowed(&prefix, Some(PROD), "demo/echo-1", 80));
        assert!(!allowed(&prefix, Some(FOREIGN), "demo/echo-1", 80));

        let namespace =
            config(&["- {name: p, namespace: demo, rules: [{from: {namespaces: [demo, tools]}}]}"]);
        assert!(allowed(&namespace, Some(CLIENT), "demo/echo-1", 80));
        assert!(allowed(
            &namespace,
            Some("spiffe://cluster.local/ns/tools/sa/x"),
            "demo/echo-1",
            80
        ));
        assert!(!allowed(&namespace, Some(PROD), "demo/echo-1", 80));
        // The namespace of another trust domain's identity is not ours.
        assert!(!allowed(&namespace, Some(FOREIGN), "demo/echo-1", 80));
        // A trust domain that merely starts with ours is another one. (A source of another
        // shape than /ns/<ns>/sa/<sa> cannot reach here: `SpiffeId` does not parse it.)
        assert!(!allowed(
            &namespace,
            Some("spiffe://cluster.local.evil/ns/demo/sa/a"),
            "demo/echo-1",
            80
        ));
    }

    #[test]
    fn from_conditions_combine() {
        // identities and identityPrefixes: either; namespaces: and.
        let c = config(&[
            "- name: p",
            "  namespace: demo",
            "  rules:",
            "    - from:",
            "        identities: [\"spiffe://cluster.local/ns/prod/sa/client\"]",
            "        identityPrefixes: [\"spiffe://cluster.local/ns/demo/sa/cl\"]",
            "        namespaces: [demo]",
        ]);
        assert!(allowed(&c, Some(CLIENT), "demo/echo-1", 80));
        // In identities, but not in namespace demo.
        assert!(!allowed(&c, Some(PROD), "demo/echo-1", 80));
        // In namespace demo, but neither listed nor prefixed.
        assert!(!allowed(&c, Some(OTHER), "demo/echo-1", 80));
    }

    #[test]
    fn rules_and_ports() {
        let c = config(&[
            "- name: p",
            "  namespace: demo",
            "  rules:",
            "    - {from: {namespaces: [demo]}, ports: [8080, 8443]}",
            "    - {ports: [9090]}",
        ]);
        // First rule: both conditions.
        assert!(allowed(&c, Some(CLIENT), "demo/echo-1", 8443));
        assert!(!allowed(&c, Some(PROD), "demo/echo-1", 8443));
        assert!(!allowed(&c, Some(CLIENT), "demo/echo-1", 80));
        // Second rule: anyone, one port.
        assert!(allowed(&c, None, "demo/echo-1", 9090));
        assert!(allowed(&c, Some(PROD), "demo/echo-1", 9090));
    }

    #[test]
    fn unauthenticated_sources_never_match_identity_conditions() {
        for from in [
            "{identities: [\"spiffe://cluster.local/ns/demo/sa/client\"]}",
            "{identityPrefixes: [\"spiffe://\"]}",
            "{namespaces: [demo]}",
        ] {
            let allow = config(&[&format!(
                "- {{name: p, namespace: demo, rules: [{{from: {from}}}]}}"
            )]);
            assert!(!allowed(&allow, None, "demo/echo-1", 80), "{from}");
            assert!(allowed(&allow, Some(CLIENT), "demo/echo-1", 80), "{from}");
            // Nor, in a DENY policy: plaintext is not denied by an identity rule.
            let deny = config(&[&format!(
                "- {{name: p, namespace: demo, action: deny, rules: [{{from: {from}}}]}}"
            )]);
            assert!(allowed(&deny, None, "demo/echo-1", 80), "{from}");
            assert!(!allowed(&deny, Some(CLIENT), "demo/echo-1", 80), "{from}");
        }
        // Denying plaintext: allow any authenticated identity only.
        let mtls_only = config(&[
            "- {name: p, namespace: demo, rules: [{from: {identityPrefixes: [\"spiffe://\"]}}]}",
        ]);
        assert!(!allowed(&mtls_only, None, "demo/db", 80));
        assert!(allowed(&mtls_only, Some(FOREIGN), "demo/db", 80));
    }

    #[test]
    fn selector_versus_whole_namespace() {
        let c = config(&[
            "- {name: v1-only, namespace: demo, selector: {app: echo, v: v1}, rules: []}",
            "- {name: all-demo, namespace: demo, action: deny, rules: [{ports: [22]}]}",
        ]);
        // v1-only applies to echo-1 only (and allows nothing there).
        assert!(!allowed(&c, Some(CLIENT), "demo/echo-1", 80));
        assert!(allowed(&c, Some(CLIENT), "demo/echo-2", 80));
        // all-demo applies to every demo workload, none of prod.
        for w in ["demo/echo-1", "demo/echo-2", "demo/db"] {
            assert_eq!(
                decide(&c, Some(CLIENT), w, 22).policy.as_deref(),
                Some("demo/all-demo"),
                "{w}"
            );
        }
        assert!(allowed(&c, Some(CLIENT), "prod/echo", 22));
    }

    #[test]
    fn policies_of_another_namespace_do_not_apply() {
        let c = config(&[
            "- {name: lockdown, namespace: prod, rules: []}",
            "- {name: deny, namespace: prod, action: deny, rules: []}",
        ]);
        assert_eq!(
            decide(&c, Some(CLIENT), "demo/echo-1", 80).reason,
            reason::NO_POLICY
        );
        assert_eq!(
            decide(&c, Some(PROD), "prod/echo", 80).policy.as_deref(),
            Some("prod/deny")
        );
    }

    #[test]
    fn workloads_from_elsewhere_are_matched_on_the_fly() {
        let c = config(&["- {name: p, namespace: demo, selector: {v: v1}, rules: []}"]);
        // A copy of echo-2 whose labels changed: the precomputed list (none) must not be used.
        let mut relabelled = workload(&c, "demo/echo-2").clone();
        relabelled.labels.insert("v".into(), "v1".into());
        assert!(!authorize(&c, Some(&id(CLIENT)), &relabelled, 80).allowed);
        // A copy with an IP of no workload of the snapshot.
        let mut stray = workload(&c, "demo/echo-1").clone();
        stray.ips = vec!["10.99.0.1".parse().expect("ip")];
        assert!(!authorize(&c, Some(&id(CLIENT)), &stray, 80).allowed);
        stray.namespace = "prod".into();
        assert!(authorize(&c, Some(&id(CLIENT)), &stray, 80).allowed);
        // An identical copy uses the precomputed list, with the same result.
        let copy = workload(&c, "demo/echo-1").clone();
        assert!(!authorize(&c, Some(&id(CLIENT)), &copy, 80).allowed);
    }

    #[test]
    fn trust_domain_follows_the_agent() {
        let c = Config::from_yaml_str(
            "agent: {node: n, trustDomain: example.org}\n\
             workloads: [{name: w, namespace: demo, ips: [10.0.0.1], node: m}]\n\
             policies:\n\
             \x20 authorization: [{name: p, namespace: demo, rules: [{from: {namespaces: [demo]}}]}]\n",
            "t.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(authorize(&c, Some(&id(FOREIGN)), &c.workloads()[0], 1).allowed);
        assert!(!authorize(&c, Some(&id(CLIENT)), &c.workloads()[0], 1).allowed);
    }

    /// The commented example of deploy/examples/local.yaml, uncommented, does what it says.
    #[test]
    fn example_of_the_demo_file() {
        let text = include_str!("../../deploy/examples/local.yaml");
        let mut example = String::new();
        let mut inside = false;
        for line in text.lines() {
            if line == "# policies:" {
                inside = true;
            } else if inside && line == "#" {
                break;
            }
            if inside {
                example.push_str(line.strip_prefix("# ").unwrap_or(line));
                example.push('\n');
            }
        }
        assert!(example.contains("echo-allow-client"), "{example}");
        let text = text.replace("policies: {}", &example);
        let c = Config::from_yaml_str(&text, "local.yaml").unwrap_or_else(|e| panic!("{e}"));
        let client = workload(&c, "demo/client");
        let client_id = client.identity.clone();
        assert_eq!(client_id.to_string(), CLIENT);
        let server = workload(&c, "demo/server-1");
        let echo_id = server.identity.clone();
        assert!(authorize(&c, Some(&client_id), server, 8080).allowed);
        assert!(!authorize(&c, Some(&client_id), server, 9090).allowed);
        assert!(!authorize(&c, Some(&echo_id), server, 8080).allowed);
        assert!(!authorize(&c, None, server, 8080).allowed);
        // The client itself is not selected.
        assert!(authorize(&c, None, client, 8080).allowed);
    }
}
