//! `policies.rateLimits` and `policies.egressLimits`: values, defaults, and each refusal with
//! its `file:line:column: path: message`.

use super::*;

/// BASE, then `policies:` and `rateLimits:` (lines 19 and 20), then `lines` from line 21.
fn with_rate_limits(lines: &[&'static str]) -> Vec<&'static str> {
    let mut all = base_with(&[], &["policies:", "  rateLimits:"]);
    all.extend_from_slice(lines);
    all
}

/// BASE, then `policies:` and `egressLimits:` (lines 19 and 20), then `lines` from line 21.
fn with_egress_limits(lines: &[&'static str]) -> Vec<&'static str> {
    let mut all = base_with(&[], &["policies:", "  egressLimits:"]);
    all.extend_from_slice(lines);
    all
}

#[test]
fn rate_limits_resolve_with_defaults() {
    let config = ok(&with_rate_limits(&[
        "    - name: conns",                       // 21
        "      connections: {perSecond: 100}",     // 22
        "    - name: bytes",                       // 23
        "      namespace: shop",                   // 24
        "      selector: {app: web}",              // 25
        "      bandwidth: {bytesPerSecond: 1000}", // 26
        "      onLimit: {action: reject}",         // 27
        "    - name: per-source",                  // 28
        "      perSource:",                        // 29
        "        bandwidth: {bytesPerSecond: 100000000, burstBytes: 1024}",
        "      onLimit: {action: wait, maxWaitMs: 60000}",
        "    - name: only-overrides",
        "      perSource:",
        "        overrides:",
        "          - identities: [\"spiffe://cluster.local/ns/a/sa/b\", \"spiffe://cluster.local/ns/a/sa/c\"]",
        "            bandwidth: {bytesPerSecond: 10000000000}",
        "          - identities: [\"spiffe://cluster.local/ns/a/sa/d\"]",
        "            connections: {perSecond: 1000000, burst: 1}",
    ]));
    assert_eq!(
        config.policies.rate_limits,
        [
            RateLimitPolicy {
                name: "conns".into(),
                namespace: "default".into(),
                selector: None,
                connections: Some(Rate {
                    per_second: 100,
                    burst: 100,
                }),
                bandwidth: None,
                per_source: None,
                on_limit: OnLimit::Reject,
            },
            // The default burst: a tenth of a second's worth, at least 64 KiB.
            RateLimitPolicy {
                name: "bytes".into(),
                namespace: "shop".into(),
                selector: Some(labels(&[("app", "web")])),
                connections: None,
                bandwidth: Some(Bandwidth {
                    bytes_per_second: 1000,
                    burst_bytes: 64 * 1024,
                }),
                per_source: None,
                on_limit: OnLimit::Reject,
            },
            RateLimitPolicy {
                name: "per-source".into(),
                namespace: "default".into(),
                selector: None,
                connections: None,
                bandwidth: None,
                per_source: Some(PerSource {
                    connections: None,
                    bandwidth: Some(Bandwidth {
                        bytes_per_second: 100_000_000,
                        burst_bytes: 1024,
                    }),
                    overrides: vec![],
                }),
                on_limit: OnLimit::Wait {
                    max_wait: Duration::from_secs(60),
                },
            },
            RateLimitPolicy {
                name: "only-overrides".into(),
                namespace: "default".into(),
                selector: None,
                connections: None,
                bandwidth: None,
                per_source: Some(PerSource {
                    connections: None,
                    bandwidth: None,
                    overrides: vec![
                        SourceOverride {
                            identities: vec![
                                spiffe("spiffe://cluster.local/ns/a/sa/b"),
                                spiffe("spiffe://cluster.local/ns/a/sa/c"),
                            ],
                            connections: None,
                            bandwidth: Some(Bandwidth {
                                bytes_per_second: 10_000_000_000,
                                burst_bytes: 1_000_000_000,
                            }),
                        },
                        SourceOverride {
                            identities: vec![spiffe("spiffe://cluster.local/ns/a/sa/d")],
                            connections: Some(Rate {
                                per_second: 1_000_000,
                                burst: 1,
                            }),
                            bandwidth: None,
                        },
                    ],
                }),
                on_limit: OnLimit::Reject,
            },
        ]
    );
    assert!(config.policies.egress_limits.is_empty());
    assert!(config.policies.authorization.is_empty());
}

#[test]
fn egress_limits_resolve() {
    let config = ok(&with_egress_limits(&[
        "    - name: web-egress",
        "      selector: {app: web}",
        "      connections: {perSecond: 5, burst: 1}",
        "      bandwidth: {bytesPerSecond: 2000000, burstBytes: 4096}",
        "      onLimit: {action: wait, maxWaitMs: 1}",
        // The same name as a rate limit's is another list: fine.
        "    - name: web-egress",
        "      namespace: other",
        "      bandwidth: {bytesPerSecond: 2000000}",
    ]));
    assert_eq!(
        config.policies.egress_limits,
        [
            EgressLimitPolicy {
                name: "web-egress".into(),
                namespace: "default".into(),
                selector: Some(labels(&[("app", "web")])),
                connections: Some(Rate {
                    per_second: 5,
                    burst: 1,
                }),
                bandwidth: Some(Bandwidth {
                    bytes_per_second: 2_000_000,
                    burst_bytes: 4096,
                }),
                on_limit: OnLimit::Wait {
                    max_wait: Duration::from_millis(1),
                },
            },
            EgressLimitPolicy {
                name: "web-egress".into(),
                namespace: "other".into(),
                selector: None,
                connections: None,
                bandwidth: Some(Bandwidth {
                    bytes_per_second: 2_000_000,
                    burst_bytes: 200_000,
                }),
                on_limit: OnLimit::Reject,
            },
        ]
    );
    assert_eq!(
        config.policies.egress_limits[1]
            .qualified_name()
            .to_string(),
        "other/web-egress"
    );
    // A rate limit and an egress limit may share a name.
    ok(&base_with(
        &[],
        &[
            "policies:",
            "  rateLimits: [{name: p, connections: {perSecond: 1}}]",
            "  egressLimits: [{name: p, connections: {perSecond: 1}}]",
        ],
    ));
}

#[test]
fn a_limit_must_limit_something() {
    assert_eq!(
        error(&with_rate_limits(&[
            "    - name: p",
            "      namespace: demo"
        ])),
        "mesh.yaml:21:7: policies.rateLimits[0]: must set at least one of connections, \
         bandwidth, perSource"
    );
    assert_eq!(
        error(&with_egress_limits(&[
            "    - name: p",
            "      onLimit: {action: reject}"
        ])),
        "mesh.yaml:21:7: policies.egressLimits[0]: must set at least one of connections, \
         bandwidth"
    );
    assert_eq!(
        error(&with_rate_limits(&["    - name: p", "      perSource: {}"])),
        "mesh.yaml:22:18: policies.rateLimits[0].perSource: must set at least one of \
         connections, bandwidth, overrides (omit `perSource` for no limit per source)"
    );
    assert_eq!(
        error(&with_rate_limits(&["    - name: p", "      perSource:"])),
        "mesh.yaml:22:16: policies.rateLimits[0].perSource: must set at least one of \
         connections, bandwidth, overrides (omit `perSource` for no limit per source)"
    );
    assert_eq!(
        error(&with_rate_limits(&["    - name: p", "      connections:"])),
        "mesh.yaml:22:18: policies.rateLimits[0].connections: must set perSecond (omit \
         `connections` for no connection limit)"
    );
    assert_eq!(
        error(&with_egress_limits(&["    - name: p", "      bandwidth:"])),
        "mesh.yaml:22:16: policies.egressLimits[0].bandwidth: must set bytesPerSecond (omit \
         `bandwidth` for no byte limit)"
    );
    assert_eq!(
        error(&with_rate_limits(&[
            "    - name: p",
            "      connections: {burst: 5}"
        ])),
        "mesh.yaml:22:21: policies.rateLimits[0].connections: missing field `perSecond`"
    );
}

#[test]
fn limit_names_and_selectors() {
    assert_eq!(
        error(&with_rate_limits(&[
            "    - {name: p, namespace: demo, connections: {perSecond: 1}}",
            "    - {name: p, connections: {perSecond: 1}}",
            "    - {name: p, namespace: demo, bandwidth: {bytesPerSecond: 1}}",
        ])),
        "mesh.yaml:23:14: policies.rateLimits[2].name: rate limit demo/p is already defined at \
         line 21"
    );
    assert_eq!(
        error(&with_egress_limits(&[
            "    - {name: p, connections: {perSecond: 1}}",
            "    - {name: p, namespace: default, connections: {perSecond: 1}}",
        ])),
        "mesh.yaml:22:14: policies.egressLimits[1].name: egress limit default/p is already \
         defined at line 21"
    );
    assert_eq!(
        error(&with_rate_limits(&[
            "    - {name: Limit_1, connections: {perSecond: 1}}"
        ])),
        format!(
            "mesh.yaml:21:14: policies.rateLimits[0].name: `Limit_1` is not a valid policy \
             name: {SUBDOMAIN_RULE}"
        )
    );
    assert_eq!(
        error(&with_egress_limits(&[
            "    - {name: p, namespace: a.b, connections: {perSecond: 1}}"
        ])),
        format!(
            "mesh.yaml:21:28: policies.egressLimits[0].namespace: `a.b` is not a valid \
             namespace: {LABEL_RULE}"
        )
    );
    for (lines, message) in [
        (
            with_rate_limits(&[
                "    - name: p",
                "      selector: {}",
                "      connections: {perSecond: 1}",
            ]),
            "22:17: policies.rateLimits[0].selector",
        ),
        (
            with_egress_limits(&[
                "    - name: p",
                "      selector:",
                "      connections: {perSecond: 1}",
            ]),
            "22:15: policies.egressLimits[0].selector",
        ),
    ] {
        assert_eq!(
            error(&lines),
            format!(
                "mesh.yaml:{message}: must not be empty (omit it to apply the limit to every \
                 workload of the namespace)"
            )
        );
    }
    // A type error inside a selector names the label.
    for (selector, path) in [
        ("      selector: {app: [web]}", "selector.app"),
        ("      selector: {value: [web]}", "selector.value"),
    ] {
        let message = error(&with_rate_limits(&[
            "    - name: p",
            selector,
            "      connections: {perSecond: 1}",
        ]));
        assert!(message.starts_with("mesh.yaml:22:"), "{message}");
        assert!(
            message.contains(&format!(": policies.rateLimits[0].{path}: ")),
            "{message}"
        );
    }
    assert_eq!(
        error(&with_rate_limits(&[
            "    - name: p",
            "      connections: {perSecond: 1}",
            "      rules: []",
        ])),
        "mesh.yaml:23:7: policies.rateLimits[0].rules: unknown field `rules`, expected one of \
         name, namespace, selector, connections, bandwidth, perSource, onLimit"
    );
    assert_eq!(
        error(&with_egress_limits(&[
            "    - name: p",
            "      connections: {perSecond: 1}",
            "      perSource: {}",
        ])),
        "mesh.yaml:23:7: policies.egressLimits[0].perSource: unknown field `perSource`, \
         expected one of name, namespace, selector, connections, bandwidth, onLimit"
    );
    assert_eq!(
        error(&base_with(&[], &["policies: {rateLimit: []}"])),
        "mesh.yaml:19:12: policies.rateLimit: unknown field `rateLimit`, expected one of \
         authorization, rateLimits, egressLimits"
    );
}

#[test]
fn rates_have_ranges() {
    for (line, message) in [
        (
            "      connections: {perSecond: 0}",
            "22:32: policies.rateLimits[0].connections.perSecond: 0 is out of range 1..=1000000",
        ),
        (
            "      connections: {perSecond: 1000001}",
            "22:32: policies.rateLimits[0].connections.perSecond: 1000001 is out of range \
             1..=1000000",
        ),
        (
            "      connections: {perSecond: 10, burst: 0}",
            "22:43: policies.rateLimits[0].connections.burst: 0 is out of range 1..=1000000",
        ),
        (
            "      bandwidth: {bytesPerSecond: 0}",
            "22:35: policies.rateLimits[0].bandwidth.bytesPerSecond: 0 is out of range \
             1..=10000000000",
        ),
        (
            "      bandwidth: {bytesPerSecond: 10000000001}",
            "22:35: policies.rateLimits[0].bandwidth.bytesPerSecond: 10000000001 is out of range \
             1..=10000000000",
        ),
        (
            "      bandwidth: {bytesPerSecond: 1000, burstBytes: 1023}",
            "22:53: policies.rateLimits[0].bandwidth.burstBytes: 1023 is out of range \
             1024..=1000000000",
        ),
        (
            "      bandwidth: {bytesPerSecond: 1000, burstBytes: 1000000001}",
            "22:53: policies.rateLimits[0].bandwidth.burstBytes: 1000000001 is out of range \
             1024..=1000000000",
        ),
        (
            "      perSource: {connections: {perSecond: 0}}",
            "22:44: policies.rateLimits[0].perSource.connections.perSecond: 0 is out of range \
             1..=1000000",
        ),
        (
            "      connections: {perSecond: -1}",
            "22:32: policies.rateLimits[0].connections.perSecond: invalid u64",
        ),
    ] {
        assert_eq!(
            error(&with_rate_limits(&["    - name: p", line])),
            format!("mesh.yaml:{message}"),
            "{line}"
        );
    }
}

#[test]
fn on_limit_is_reject_or_a_bounded_wait() {
    for (line, message) in [
        (
            "      onLimit: {action: wait}",
            "23:25: policies.rateLimits[0].onLimit.maxWaitMs: is required with action: wait (how \
             long a connection may be held)",
        ),
        (
            "      onLimit: {action: reject, maxWaitMs: 10}",
            "23:44: policies.rateLimits[0].onLimit.maxWaitMs: only applies to action: wait",
        ),
        (
            "      onLimit: {action: wait, maxWaitMs: 0}",
            "23:42: policies.rateLimits[0].onLimit.maxWaitMs: 0 is out of range 1..=60000 \
             (milliseconds, at most 1 minute)",
        ),
        (
            "      onLimit: {action: wait, maxWaitMs: 60001}",
            "23:42: policies.rateLimits[0].onLimit.maxWaitMs: 60001 is out of range 1..=60000 \
             (milliseconds, at most 1 minute)",
        ),
        (
            "      onLimit: {action: drop}",
            "23:25: policies.rateLimits[0].onLimit.action: unknown variant `drop`, expected one \
             of reject, wait",
        ),
        (
            "      onLimit: {maxWaitMs: 10}",
            "23:17: policies.rateLimits[0].onLimit: missing field `action`",
        ),
        (
            "      onLimit:",
            "23:14: policies.rateLimits[0].onLimit: must set action (reject or wait); omit \
             `onLimit` to reject",
        ),
    ] {
        assert_eq!(
            error(&with_rate_limits(&[
                "    - name: p",
                "      connections: {perSecond: 1}",
                line
            ])),
            format!("mesh.yaml:{message}"),
            "{line}"
        );
    }
}

#[test]
fn per_source_overrides_are_checked() {
    let with_overrides = |lines: &[&'static str]| {
        let mut all = with_rate_limits(&[
            "    - name: p",      // 21
            "      perSource:",   // 22
            "        overrides:", // 23
        ]);
        all.extend_from_slice(lines);
        all
    };
    assert_eq!(
        error(&with_overrides(&[
            "          - connections: {perSecond: 1}"
        ])),
        "mesh.yaml:24:13: policies.rateLimits[0].perSource.overrides[0].identities: is \
         required: the callers this override is for"
    );
    assert_eq!(
        error(&with_overrides(&[
            "          - identities: []",
            "            connections: {perSecond: 1}",
        ])),
        "mesh.yaml:24:25: policies.rateLimits[0].perSource.overrides[0].identities: must list \
         at least one identity (omit `identities` for any)"
    );
    assert_eq!(
        error(&with_overrides(&[
            "          - identities: [\"spiffe://cluster.local/ns/a/sa/b\"]"
        ])),
        "mesh.yaml:24:13: policies.rateLimits[0].perSource.overrides[0]: must set at least one \
         of connections, bandwidth"
    );
    assert_eq!(
        error(&with_overrides(&[
            "          - identities: [\"spiffe://cluster.local/ns/a/sa/b\"]",
            "            connections: {perSecond: 1}",
            "          - identities: [\"spiffe://cluster.local/ns/a/sa/c\", \"spiffe://cluster.local/ns/a/sa/b\"]",
            "            connections: {perSecond: 2}",
        ])),
        "mesh.yaml:26:62: policies.rateLimits[0].perSource.overrides[1].identities[1]: \
         spiffe://cluster.local/ns/a/sa/b already has an override: \
         policies.rateLimits[0].perSource.overrides[0]"
    );
    assert_eq!(
        error(&with_overrides(&[
            "          - identities: [\"spiffe://cluster.local/ns/a/sa/b\", \"spiffe://cluster.local/ns/a/sa/b\"]",
            "            connections: {perSecond: 1}",
        ])),
        "mesh.yaml:24:62: policies.rateLimits[0].perSource.overrides[0].identities[1]: \
         spiffe://cluster.local/ns/a/sa/b is listed twice"
    );
    assert_eq!(
        error(&with_overrides(&[
            "          - identities: [\"spiffe://cluster.local/sa/b\"]",
            "            connections: {perSecond: 1}",
        ])),
        "mesh.yaml:24:26: policies.rateLimits[0].perSource.overrides[0].identities[0]: identity \
         \"spiffe://cluster.local/sa/b\": the path must be /ns/<namespace>/sa/<serviceAccount>"
    );
    assert_eq!(
        error(&with_overrides(&[
            "          - identities: [\"spiffe://cluster.local/ns/a/sa/b\"]",
            "            bandwidth: {bytesPerSecond: 0}",
        ])),
        "mesh.yaml:25:41: policies.rateLimits[0].perSource.overrides[0].bandwidth.bytesPerSecond: \
         0 is out of range 1..=10000000000"
    );
    assert_eq!(
        error(&with_overrides(&[])),
        "mesh.yaml:23:18: policies.rateLimits[0].perSource.overrides: must list at least one \
         override (omit `overrides` for none)"
    );
}
