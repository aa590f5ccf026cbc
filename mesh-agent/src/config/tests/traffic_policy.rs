//! `services[].trafficPolicy`, `endpoints.weights` and `nodes`: the example file, the
//! defaults, and each refusal with its `file:line:column: path: message`.

use super::*;

/// BASE, then `    trafficPolicy:` (line 19), then `lines` from line 20.
fn with_traffic(lines: &[&'static str]) -> Vec<&'static str> {
    let mut all = base_with(&[], &["    trafficPolicy:"]);
    all.extend_from_slice(lines);
    all
}

/// The traffic policy of the only service of BASE + `trafficPolicy:` + `lines`.
#[track_caller]
fn policy(lines: &[&'static str]) -> TrafficPolicy {
    (*ok(&with_traffic(lines)).services[0].traffic).clone()
}

#[test]
fn the_example_file_parses_to_its_values() {
    let config = Config::from_yaml_str(
        include_str!("../../../../deploy/examples/traffic.yaml"),
        "traffic.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.nodes,
        [
            Node {
                name: "node-a".into(),
                labels: labels(&[("topology.kubernetes.io/zone", "zone-1")]),
            },
            Node {
                name: "node-b".into(),
                labels: labels(&[("topology.kubernetes.io/zone", "zone-2")]),
            },
        ]
    );
    assert_eq!(config.local_zone(), Some("zone-1"));
    let echo = config.service("demo", "echo").expect("echo");
    assert_eq!(
        *echo.traffic,
        TrafficPolicy {
            load_balancer: LoadBalancer::PeakEwma,
            locality: Locality {
                enabled: true,
                min_healthy_percent: 50,
            },
            outlier_detection: Some(OutlierDetection {
                consecutive_failures: 3,
                base_ejection: Duration::from_secs(10),
                max_ejection: Duration::from_secs(120),
                max_ejected_percent: 50,
            }),
            health_check: None,
            retries: Retries {
                attempts: 2,
                budget_percent: 20,
                min_retries_per_second: 10,
            },
            connect_timeout: Some(Duration::from_secs(2)),
            idle_timeout: None,
            max_connection_lifetime: None,
            circuit_breaker: CircuitBreaker {
                max_connections: Some(1000),
                max_pending: Some(100),
                max_connections_per_endpoint: Some(400),
                max_pending_per_endpoint: None,
            },
            subsets: vec![
                Subset {
                    name: "stable".into(),
                    labels: labels(&[("version", "v1")]),
                    weight: 90,
                },
                Subset {
                    name: "canary".into(),
                    labels: labels(&[("version", "v2")]),
                    weight: 10,
                },
            ],
            caller_routes: vec![CallerRoute {
                from: CallerMatch {
                    labels: labels(&[("group", "beta")]),
                    identities: vec![],
                },
                subset: "canary".into(),
            }],
        }
    );
    // Weights by workload, zones by node.
    let endpoints: Vec<(SocketAddr, u32, Option<&str>, bool)> = echo.ports[0]
        .endpoints
        .iter()
        .map(|e| (e.addr, e.weight, e.zone.as_deref(), e.local))
        .collect();
    assert_eq!(
        endpoints,
        [
            (sock("10.1.0.3:8080"), 2, Some("zone-1"), true),
            (sock("10.1.0.4:8080"), 1, Some("zone-1"), true),
            (sock("10.2.0.3:8080"), 1, Some("zone-2"), false),
        ]
    );

    let client = spiffe("spiffe://cluster.local/ns/demo/sa/client");
    assert_eq!(
        config.policies.rate_limits,
        [RateLimitPolicy {
            name: "echo-limits".into(),
            namespace: "demo".into(),
            selector: Some(labels(&[("app", "echo")])),
            connections: Some(Rate {
                per_second: 100,
                burst: 20,
            }),
            bandwidth: Some(Bandwidth {
                bytes_per_second: 12_500_000,
                burst_bytes: 1_250_000,
            }),
            per_source: Some(PerSource {
                connections: Some(Rate {
                    per_second: 10,
                    burst: 10,
                }),
                bandwidth: None,
                overrides: vec![SourceOverride {
                    identities: vec![client],
                    connections: Some(Rate {
                        per_second: 50,
                        burst: 50,
                    }),
                    bandwidth: None,
                }],
            }),
            on_limit: OnLimit::Wait {
                max_wait: Duration::from_millis(200),
            },
        }]
    );
    assert_eq!(
        config.policies.egress_limits,
        [EgressLimitPolicy {
            name: "client-egress".into(),
            namespace: "demo".into(),
            selector: Some(labels(&[("app", "client")])),
            connections: Some(Rate {
                per_second: 50,
                burst: 10,
            }),
            bandwidth: None,
            on_limit: OnLimit::Reject,
        }]
    );
    assert_eq!(
        config.policies.rate_limits[0].qualified_name().to_string(),
        "demo/echo-limits"
    );
}

#[test]
fn every_field_of_a_traffic_policy() {
    let p = policy(&[
        "      loadBalancer: {algorithm: maglev, hashOn: sourceIdentity}",
        "      locality: {enabled: false, minHealthyPercent: 0}",
        "      outlierDetection:",
        "        consecutiveFailures: 1000",
        "        baseEjectionMs: 1",
        "        maxEjectionMs: 86400000",
        "        maxEjectedPercent: 100",
        "      healthCheck: {intervalMs: 100, timeoutMs: 100, unhealthyThreshold: 3,",
        "                    healthyThreshold: 4}",
        "      retries: {attempts: 0, budgetPercent: 0, minRetriesPerSecond: 0}",
        "      connectTimeoutMs: 600000",
        "      idleTimeoutMs: 604800000",
        "      maxConnectionLifetimeMs: 1",
        "      circuitBreaker: {maxConnections: 16777216, maxPendingConnects: 1,",
        "                       maxConnectionsPerEndpoint: 2, maxPendingConnectsPerEndpoint: 3}",
        "      subsets:",
        "        - {name: a, labels: {app: web}, weight: 10000}",
        "        - {name: b, labels: {app: web, v: '2'}, weight: 0}",
        "      callerRoutes:",
        "        - from: {identities: [\"spiffe://cluster.local/ns/x/sa/y\"]}",
        "          subset: b",
        "        - from: {labels: {team: qa}, identities: [\"spiffe://td/ns/x/sa/z\"]}",
        "          subset: a",
    ]);
    assert_eq!(
        p,
        TrafficPolicy {
            load_balancer: LoadBalancer::Maglev {
                hash_on: HashOn::SourceIdentity
            },
            locality: Locality {
                enabled: false,
                min_healthy_percent: 0,
            },
            outlier_detection: Some(OutlierDetection {
                consecutive_failures: 1000,
                base_ejection: Duration::from_millis(1),
                max_ejection: Duration::from_secs(24 * 3600),
                max_ejected_percent: 100,
            }),
            health_check: Some(HealthCheck {
                interval: Duration::from_millis(100),
                timeout: Duration::from_millis(100),
                unhealthy_threshold: 3,
                healthy_threshold: 4,
            }),
            retries: Retries {
                attempts: 0,
                budget_percent: 0,
                min_retries_per_second: 0,
            },
            connect_timeout: Some(Duration::from_secs(600)),
            idle_timeout: Some(Duration::from_secs(7 * 24 * 3600)),
            max_connection_lifetime: Some(Duration::from_millis(1)),
            circuit_breaker: CircuitBreaker {
                max_connections: Some(1 << 24),
                max_pending: Some(1),
                max_connections_per_endpoint: Some(2),
                max_pending_per_endpoint: Some(3),
            },
            subsets: vec![
                Subset {
                    name: "a".into(),
                    labels: labels(&[("app", "web")]),
                    weight: 10000,
                },
                Subset {
                    name: "b".into(),
                    labels: labels(&[("app", "web"), ("v", "2")]),
                    weight: 0,
                },
            ],
            caller_routes: vec![
                CallerRoute {
                    from: CallerMatch {
                        labels: BTreeMap::new(),
                        identities: vec![spiffe("spiffe://cluster.local/ns/x/sa/y")],
                    },
                    subset: "b".into(),
                },
                CallerRoute {
                    from: CallerMatch {
                        labels: labels(&[("team", "qa")]),
                        identities: vec![spiffe("spiffe://td/ns/x/sa/z")],
                    },
                    subset: "a".into(),
                },
            ],
        }
    );
    // Each algorithm by its name; maglev hashes on the source IP by default.
    for (name, expected) in [
        ("roundRobin", LoadBalancer::RoundRobin),
        ("random", LoadBalancer::Random),
        ("weighted", LoadBalancer::Weighted),
        ("leastConnections", LoadBalancer::LeastConnections),
        ("peakEwma", LoadBalancer::PeakEwma),
        (
            "maglev",
            LoadBalancer::Maglev {
                hash_on: HashOn::SourceIp,
            },
        ),
    ] {
        let line: &'static str =
            Box::leak(format!("      loadBalancer: {{algorithm: {name}}}").into_boxed_str());
        assert_eq!(policy(&[line]).load_balancer, expected, "{name}");
    }
    assert_eq!(
        policy(&["      loadBalancer: {algorithm: maglev, hashOn: sourceIp}"]).load_balancer,
        LoadBalancer::Maglev {
            hash_on: HashOn::SourceIp
        }
    );
}

#[test]
fn traffic_policy_defaults() {
    let config = ok(BASE);
    let service = &config.services[0];
    assert_eq!(*service.traffic, TrafficPolicy::default());
    assert_eq!(
        *service.traffic,
        TrafficPolicy {
            load_balancer: LoadBalancer::PeakEwma,
            locality: Locality {
                enabled: true,
                min_healthy_percent: 50,
            },
            outlier_detection: Some(OutlierDetection {
                consecutive_failures: 5,
                base_ejection: Duration::from_secs(30),
                max_ejection: Duration::from_secs(300),
                max_ejected_percent: 50,
            }),
            health_check: None,
            retries: Retries {
                attempts: 2,
                budget_percent: 20,
                min_retries_per_second: 10,
            },
            connect_timeout: None,
            idle_timeout: None,
            max_connection_lifetime: None,
            circuit_breaker: CircuitBreaker::default(),
            subsets: vec![],
            caller_routes: vec![],
        }
    );
    assert!(
        service.ports[0]
            .endpoints
            .iter()
            .all(|e| e.weight == 1 && e.zone.is_none())
    );
    assert!(config.nodes.is_empty());
    assert_eq!(config.local_zone(), None);

    // A key with no value under the service means the defaults; `{}` blocks too.
    assert_eq!(policy(&[]), TrafficPolicy::default());
    assert_eq!(
        policy(&[
            "      loadBalancer: {}",
            "      locality: {}",
            "      outlierDetection: {}",
            "      retries: {}",
            "      circuitBreaker: {}",
        ]),
        TrafficPolicy::default()
    );
    // Health checks: `{}` turns them on with the defaults.
    assert_eq!(
        policy(&["      healthCheck: {}"]).health_check,
        Some(HealthCheck {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 1,
        })
    );
    // `enabled: false` turns a block off; its other fields are still checked.
    let off = policy(&[
        "      outlierDetection: {enabled: false, consecutiveFailures: 2}",
        "      healthCheck: {enabled: false, intervalMs: 5000}",
        "      locality: {enabled: false}",
    ]);
    assert_eq!(off.outlier_detection, None);
    assert_eq!(off.health_check, None);
    assert_eq!(
        off.locality,
        Locality {
            enabled: false,
            min_healthy_percent: 50
        }
    );
    assert_eq!(
        error(&with_traffic(&[
            "      outlierDetection: {enabled: false, consecutiveFailures: 0}"
        ])),
        "mesh.yaml:20:63: services[0].trafficPolicy.outlierDetection.consecutiveFailures: 0 is \
         out of range 1..=1000"
    );
}

#[test]
fn traffic_policy_unknown_fields_and_values() {
    assert_eq!(
        error(&with_traffic(&["      lb: {}"])),
        "mesh.yaml:20:7: services[0].trafficPolicy.lb: unknown field `lb`, expected one of \
         loadBalancer, locality, outlierDetection, healthCheck, retries, connectTimeoutMs, \
         idleTimeoutMs, maxConnectionLifetimeMs, circuitBreaker, subsets, callerRoutes"
    );
    assert_eq!(
        error(&with_traffic(&[
            "      loadBalancer: {algorithm: leastRequest}"
        ])),
        "mesh.yaml:20:33: services[0].trafficPolicy.loadBalancer.algorithm: unknown variant \
         `leastRequest`, expected one of roundRobin, random, weighted, leastConnections, \
         peakEwma, maglev"
    );
    assert_eq!(
        error(&with_traffic(&[
            "      loadBalancer: {algorithm: maglev, hashOn: sourcePort}"
        ])),
        "mesh.yaml:20:49: services[0].trafficPolicy.loadBalancer.hashOn: unknown variant \
         `sourcePort`, expected one of sourceIp, sourceIdentity"
    );
    assert_eq!(
        error(&with_traffic(&[
            "      outlierDetection: {consecutive5xx: 5}"
        ])),
        "mesh.yaml:20:26: services[0].trafficPolicy.outlierDetection.consecutive5xx: unknown \
         field `consecutive5xx`, expected one of enabled, consecutiveFailures, baseEjectionMs, \
         maxEjectionMs, maxEjectedPercent"
    );
    assert_eq!(
        error(&with_traffic(&["      outlierDetection: off"])),
        "mesh.yaml:20:25: services[0].trafficPolicy.outlierDetection: expected mapping start"
    );
    assert_eq!(
        error(&with_traffic(&["      connectTimeoutMs: 2s"])),
        "mesh.yaml:20:25: services[0].trafficPolicy.connectTimeoutMs: invalid u64"
    );
    assert_eq!(
        error(&with_traffic(&[
            "      subsets: [{name: v1, labels: {v: '1'}}]"
        ])),
        "mesh.yaml:20:28: services[0].trafficPolicy.subsets[0]: missing field `weight`"
    );
    assert_eq!(
        error(&with_traffic(&[
            "      callerRoutes: [{from: {labels: {a: b}}}]"
        ])),
        "mesh.yaml:20:23: services[0].trafficPolicy.callerRoutes[0]: missing field `subset`"
    );
}

#[test]
fn traffic_policy_blocks_written_without_a_value() {
    assert_eq!(
        error(&with_traffic(&["      outlierDetection:"])),
        "mesh.yaml:20:23: services[0].trafficPolicy.outlierDetection: must not be empty (write \
         {} for the defaults, {enabled: false} to turn it off)"
    );
    assert_eq!(
        error(&with_traffic(&["      healthCheck:"])),
        "mesh.yaml:20:18: services[0].trafficPolicy.healthCheck: must not be empty (write {} to \
         check with the defaults, omit it for no checks)"
    );
    for (line, path, column) in [
        ("      loadBalancer:", "loadBalancer", 19),
        ("      locality:", "locality", 15),
        ("      retries:", "retries", 14),
    ] {
        assert_eq!(
            error(&with_traffic(&[line])),
            format!(
                "mesh.yaml:20:{column}: services[0].trafficPolicy.{path}: must not be empty \
                 (omit it for the defaults)"
            )
        );
    }
    assert_eq!(
        error(&with_traffic(&["      circuitBreaker:"])),
        "mesh.yaml:20:21: services[0].trafficPolicy.circuitBreaker: must not be empty (omit it \
         for no limits)"
    );
    assert_eq!(
        error(&with_traffic(&["      subsets:"])),
        "mesh.yaml:20:14: services[0].trafficPolicy.subsets: must list at least one subset \
         (omit `subsets` for none)"
    );
    assert_eq!(
        error(&with_traffic(&["      subsets: []"])),
        "mesh.yaml:20:16: services[0].trafficPolicy.subsets: must list at least one subset \
         (omit `subsets` for none)"
    );
    assert_eq!(
        error(&with_traffic(&["      callerRoutes: []"])),
        "mesh.yaml:20:21: services[0].trafficPolicy.callerRoutes: must list at least one route \
         (omit `callerRoutes` for none)"
    );
}

#[test]
fn load_balancer_hash_on_only_with_maglev() {
    assert_eq!(
        error(&with_traffic(&["      loadBalancer: {hashOn: sourceIp}"])),
        "mesh.yaml:20:30: services[0].trafficPolicy.loadBalancer.hashOn: only applies to \
         algorithm: maglev"
    );
    assert_eq!(
        error(&with_traffic(&[
            "      loadBalancer:",
            "        algorithm: roundRobin",
            "        hashOn: sourceIdentity",
        ])),
        "mesh.yaml:22:17: services[0].trafficPolicy.loadBalancer.hashOn: only applies to \
         algorithm: maglev"
    );
}

#[test]
fn percents_counts_and_limits_have_ranges() {
    for (line, message) in [
        (
            "      locality: {minHealthyPercent: 101}",
            "20:37: services[0].trafficPolicy.locality.minHealthyPercent: 101 is out of range \
             0..=100",
        ),
        (
            "      outlierDetection: {consecutiveFailures: 0}",
            "20:47: services[0].trafficPolicy.outlierDetection.consecutiveFailures: 0 is out of \
             range 1..=1000",
        ),
        (
            "      outlierDetection: {maxEjectedPercent: 150}",
            "20:45: services[0].trafficPolicy.outlierDetection.maxEjectedPercent: 150 is out of \
             range 0..=100",
        ),
        (
            "      healthCheck: {unhealthyThreshold: 0}",
            "20:41: services[0].trafficPolicy.healthCheck.unhealthyThreshold: 0 is out of range \
             1..=1000",
        ),
        (
            "      healthCheck: {healthyThreshold: 1001}",
            "20:39: services[0].trafficPolicy.healthCheck.healthyThreshold: 1001 is out of range \
             1..=1000",
        ),
        (
            "      retries: {attempts: 11}",
            "20:27: services[0].trafficPolicy.retries.attempts: 11 is out of range 0..=10",
        ),
        (
            "      retries: {budgetPercent: 101}",
            "20:32: services[0].trafficPolicy.retries.budgetPercent: 101 is out of range 0..=100",
        ),
        (
            "      retries: {minRetriesPerSecond: 10001}",
            "20:38: services[0].trafficPolicy.retries.minRetriesPerSecond: 10001 is out of range \
             0..=10000",
        ),
        (
            "      circuitBreaker: {maxConnections: 0}",
            "20:40: services[0].trafficPolicy.circuitBreaker.maxConnections: 0 is out of range \
             1..=16777216",
        ),
        (
            "      circuitBreaker: {maxPendingConnects: 16777217}",
            "20:44: services[0].trafficPolicy.circuitBreaker.maxPendingConnects: 16777217 is \
             out of range 1..=16777216",
        ),
        (
            "      circuitBreaker: {maxConnectionsPerEndpoint: 0}",
            "20:51: services[0].trafficPolicy.circuitBreaker.maxConnectionsPerEndpoint: 0 is out \
             of range 1..=16777216",
        ),
        (
            "      circuitBreaker: {maxPendingConnectsPerEndpoint: 0}",
            "20:55: services[0].trafficPolicy.circuitBreaker.maxPendingConnectsPerEndpoint: 0 is \
             out of range 1..=16777216",
        ),
    ] {
        assert_eq!(
            error(&with_traffic(&[line])),
            format!("mesh.yaml:{message}"),
            "{line}"
        );
    }
}

#[test]
fn timeouts_have_ranges() {
    for (line, message) in [
        (
            "      connectTimeoutMs: 0",
            "20:25: services[0].trafficPolicy.connectTimeoutMs: 0 is out of range 1..=600000 \
             (milliseconds, at most 10 minutes)",
        ),
        (
            "      connectTimeoutMs: 600001",
            "20:25: services[0].trafficPolicy.connectTimeoutMs: 600001 is out of range \
             1..=600000 (milliseconds, at most 10 minutes)",
        ),
        (
            "      idleTimeoutMs: 604800001",
            "20:22: services[0].trafficPolicy.idleTimeoutMs: 604800001 is out of range \
             1..=604800000 (milliseconds, at most 7 days)",
        ),
        (
            "      maxConnectionLifetimeMs: 0",
            "20:32: services[0].trafficPolicy.maxConnectionLifetimeMs: 0 is out of range \
             1..=604800000 (milliseconds, at most 7 days)",
        ),
        (
            "      outlierDetection: {baseEjectionMs: 0}",
            "20:42: services[0].trafficPolicy.outlierDetection.baseEjectionMs: 0 is out of range \
             1..=86400000 (milliseconds, at most 1 day)",
        ),
        (
            "      outlierDetection: {maxEjectionMs: 86400001}",
            "20:41: services[0].trafficPolicy.outlierDetection.maxEjectionMs: 86400001 is out of \
             range 1..=86400000 (milliseconds, at most 1 day)",
        ),
        (
            "      healthCheck: {intervalMs: 99}",
            "20:33: services[0].trafficPolicy.healthCheck.intervalMs: 99 is out of range \
             100..=3600000 (milliseconds, at most 1 hour)",
        ),
        (
            "      healthCheck: {timeoutMs: 0}",
            "20:32: services[0].trafficPolicy.healthCheck.timeoutMs: 0 is out of range \
             1..=600000 (milliseconds, at most 10 minutes)",
        ),
    ] {
        assert_eq!(
            error(&with_traffic(&[line])),
            format!("mesh.yaml:{message}"),
            "{line}"
        );
    }
}

#[test]
fn ejection_and_health_check_durations_are_ordered() {
    assert_eq!(
        error(&with_traffic(&[
            "      outlierDetection: {baseEjectionMs: 60000, maxEjectionMs: 30000}"
        ])),
        "mesh.yaml:20:64: services[0].trafficPolicy.outlierDetection.maxEjectionMs: \
         baseEjectionMs (60000 ms) must not exceed maxEjectionMs (30000 ms)"
    );
    // Against a default, the refusal points at the value written and names the default.
    assert_eq!(
        error(&with_traffic(&[
            "      outlierDetection: {baseEjectionMs: 600000}"
        ])),
        "mesh.yaml:20:42: services[0].trafficPolicy.outlierDetection.baseEjectionMs: \
         baseEjectionMs (600000 ms) must not exceed maxEjectionMs (300000 ms (the default))"
    );
    assert_eq!(
        error(&with_traffic(&[
            "      outlierDetection: {maxEjectionMs: 1000}"
        ])),
        "mesh.yaml:20:41: services[0].trafficPolicy.outlierDetection.maxEjectionMs: \
         baseEjectionMs (30000 ms (the default)) must not exceed maxEjectionMs (1000 ms)"
    );
    assert_eq!(
        error(&with_traffic(&["      healthCheck: {intervalMs: 500}"])),
        "mesh.yaml:20:33: services[0].trafficPolicy.healthCheck.intervalMs: timeoutMs (1000 ms \
         (the default)) must not exceed intervalMs (500 ms)"
    );
    assert_eq!(
        error(&with_traffic(&["      healthCheck: {timeoutMs: 20000}"])),
        "mesh.yaml:20:32: services[0].trafficPolicy.healthCheck.timeoutMs: timeoutMs (20000 ms) \
         must not exceed intervalMs (10000 ms (the default))"
    );
    // Equal is fine.
    policy(&["      healthCheck: {intervalMs: 1000, timeoutMs: 1000}"]);
}

#[test]
fn subsets_are_checked() {
    assert_eq!(
        error(&with_traffic(&[
            "      subsets:",
            "        - {name: v1, labels: {v: '1'}, weight: 1}",
            "        - {name: v1, labels: {v: '2'}, weight: 1}",
        ])),
        "mesh.yaml:22:18: services[0].trafficPolicy.subsets[1].name: subset v1 is already \
         defined by services[0].trafficPolicy.subsets[0]"
    );
    assert_eq!(
        error(&with_traffic(&[
            "      subsets: [{name: v1.2, labels: {v: '1'}, weight: 1}]"
        ])),
        format!(
            "mesh.yaml:20:24: services[0].trafficPolicy.subsets[0].name: `v1.2` is not a valid \
             subset name: {LABEL_RULE}"
        )
    );
    assert_eq!(
        error(&with_traffic(&[
            "      subsets: [{name: v1, labels: {}, weight: 1}]"
        ])),
        "mesh.yaml:20:36: services[0].trafficPolicy.subsets[0].labels: must not be empty (a \
         subset is the endpoints whose workload has these labels)"
    );
    assert_eq!(
        error(&with_traffic(&[
            "      subsets: [{name: v1, labels: {v: '1'}, weight: 10001}]"
        ])),
        "mesh.yaml:20:54: services[0].trafficPolicy.subsets[0].weight: 10001 is out of range \
         0..=10000"
    );
    assert_eq!(
        error(&with_traffic(&[
            "      subsets:",
            "        - {name: v1, labels: {v: '1'}, weight: 0}",
            "        - {name: v2, labels: {v: '2'}, weight: 0}",
            "      callerRoutes: [{from: {labels: {a: b}}, subset: v2}]",
        ])),
        "mesh.yaml:21:9: services[0].trafficPolicy.subsets: at least one subset needs a weight \
         above 0 (callers that no route matches go by weight)"
    );
}

#[test]
fn caller_routes_are_checked() {
    let subsets = [
        "      subsets:",                                    // 20
        "        - {name: v1, labels: {v: '1'}, weight: 1}", // 21
        "        - {name: v2, labels: {v: '2'}, weight: 0}", // 22
        "      callerRoutes:",                               // 23
    ];
    let with_routes = |routes: &[&'static str]| {
        let mut lines = with_traffic(&subsets);
        lines.extend_from_slice(routes);
        lines
    };
    assert_eq!(
        error(&with_routes(&[
            "        - {from: {labels: {a: b}}, subset: v3}"
        ])),
        "mesh.yaml:24:44: services[0].trafficPolicy.callerRoutes[0].subset: no subset v3 (the \
         subsets are v1, v2)"
    );
    assert_eq!(
        error(&with_traffic(&[
            "      callerRoutes: [{from: {labels: {a: b}}, subset: v1}]"
        ])),
        "mesh.yaml:20:55: services[0].trafficPolicy.callerRoutes[0].subset: no subset v1: the \
         service has no subsets"
    );
    assert_eq!(
        error(&with_routes(&["        - {from: {}, subset: v2}"])),
        "mesh.yaml:24:18: services[0].trafficPolicy.callerRoutes[0].from: must set at least one \
         of labels, identities"
    );
    assert_eq!(
        error(&with_routes(&["        - {subset: v2}"])),
        "mesh.yaml:24:11: services[0].trafficPolicy.callerRoutes[0].from: must set at least one \
         of labels, identities"
    );
    assert_eq!(
        error(&with_routes(&["        - from:", "          subset: v2"])),
        "mesh.yaml:24:15: services[0].trafficPolicy.callerRoutes[0].from: must set at least one \
         of labels, identities"
    );
    assert_eq!(
        error(&with_routes(&[
            "        - {from: {labels: {}}, subset: v2}"
        ])),
        "mesh.yaml:24:27: services[0].trafficPolicy.callerRoutes[0].from.labels: must not be \
         empty (omit `labels` for any)"
    );
    assert_eq!(
        error(&with_routes(&[
            "        - {from: {identities: []}, subset: v2}"
        ])),
        "mesh.yaml:24:31: services[0].trafficPolicy.callerRoutes[0].from.identities: must list \
         at least one identity (omit `identities` for any)"
    );
    assert_eq!(
        error(&with_routes(&[
            "        - {from: {identities: [\"spiffe://cluster.local/ns/a\"]}, subset: v2}"
        ])),
        "mesh.yaml:24:32: services[0].trafficPolicy.callerRoutes[0].from.identities[0]: \
         identity \"spiffe://cluster.local/ns/a\": the path must be \
         /ns/<namespace>/sa/<serviceAccount>"
    );
    assert_eq!(
        error(&with_routes(&[
            "        - from:",
            "            identities:",
            "              - spiffe://cluster.local/ns/a/sa/b",
            "              - spiffe://cluster.local/ns/a/sa/b",
            "          subset: v2",
        ])),
        "mesh.yaml:27:17: services[0].trafficPolicy.callerRoutes[0].from.identities[1]: \
         spiffe://cluster.local/ns/a/sa/b is listed twice"
    );
    assert_eq!(
        error(&with_routes(&[
            "        - {from: {namespaces: [a]}, subset: v2}"
        ])),
        "mesh.yaml:24:19: services[0].trafficPolicy.callerRoutes[0].from.namespaces: unknown \
         field `namespaces`, expected one of labels, identities"
    );
}

// ---- endpoints.weights and nodes -----------------------------------------------------------

/// BASE with `weights` (line 17) in its endpoints block, the ports on one line (18).
fn with_weights(weights: &'static str) -> Vec<&'static str> {
    base_with(&[(17, weights), (18, "    ports: [{port: 80}]")], &[])
}

#[test]
fn endpoint_weights() {
    // Selector mode: by workload name, every IP of it.
    let config = ok(&with_weights("      weights: {web-2: 7}"));
    let weights: Vec<(SocketAddr, u32)> = config.services[0].ports[0]
        .endpoints
        .iter()
        .map(|e| (e.addr, e.weight))
        .collect();
    assert_eq!(
        weights,
        [(sock("10.1.0.2:80"), 1), (sock("10.1.0.3:80"), 7)]
    );
    // Workloads and addresses modes.
    let config = ok(&base_with(
        &[
            (16, "      workloads: [web-1]"),
            (17, "      weights: {web-1: 10000}"),
            (18, "    ports: [{port: 80}]"),
        ],
        &[
            "  - name: db",
            "    vips: [10.96.0.20]",
            "    ports: [{port: 5432}]",
            "    endpoints:",
            "      addresses: [192.168.7.9, 10.1.0.3, \"fd00::9\"]",
            "      weights: {192.168.7.9: 3, \"::ffff:10.1.0.3\": 2}",
        ],
    ));
    assert_eq!(config.services[0].ports[0].endpoints[0].weight, 10000);
    let weights: Vec<u32> = config.services[1].ports[0]
        .endpoints
        .iter()
        .map(|e| e.weight)
        .collect();
    assert_eq!(weights, [3, 2, 1]);

    for (line, message) in [
        (
            "      weights: {web-3: 2}",
            "17:24: services[0].endpoints.weights.web-3: `web-3` is not an endpoint of this \
             service (a workload its endpoints select)",
        ),
        (
            "      weights: {web-1: 0}",
            "17:24: services[0].endpoints.weights.web-1: 0 is out of range 1..=10000",
        ),
        (
            "      weights: {web-1: 10001}",
            "17:24: services[0].endpoints.weights.web-1: 10001 is out of range 1..=10000",
        ),
        (
            "      weights: {}",
            "17:16: services[0].endpoints.weights: must not be empty (omit it: every endpoint \
             then weighs 1)",
        ),
        (
            "      weights:",
            "17:14: services[0].endpoints.weights: must not be empty (omit it: every endpoint \
             then weighs 1)",
        ),
        (
            "      weights: {web-1: heavy}",
            "17:24: services[0].endpoints.weights.web-1: invalid u64",
        ),
        (
            "      weights: {value: heavy}",
            "17:24: services[0].endpoints.weights.value: invalid u64",
        ),
    ] {
        assert_eq!(
            error(&with_weights(line)),
            format!("mesh.yaml:{message}"),
            "{line}"
        );
    }
    // A workload of the namespace that the selector does not select is not an endpoint.
    let mut lines = with_weights("      weights: {web-2: 2}");
    lines[10] = "    labels: {app: db}";
    assert_eq!(
        error(&lines),
        "mesh.yaml:17:24: services[0].endpoints.weights.web-2: `web-2` is not an endpoint of \
         this service (a workload its endpoints select)"
    );
    let mut lines = with_weights("      weights: {web-1: 2}");
    lines[15] = "      addresses: [192.168.7.9]";
    assert_eq!(
        error(&lines),
        "mesh.yaml:17:24: services[0].endpoints.weights.web-1: `web-1` is not an endpoint of \
         this service (one of its addresses)"
    );
}

#[test]
fn nodes_give_endpoints_and_the_agent_their_zone() {
    let config = ok(&base_with(
        &[],
        &[
            "nodes:",
            "  - name: node-a",
            "    labels: {topology.kubernetes.io/zone: z1, rack: r1}",
            "  - name: node-b",
            "    labels: {topology.kubernetes.io/zone: z2}",
        ],
    ));
    assert_eq!(config.local_zone(), Some("z1"));
    assert_eq!(config.nodes[0].zone(), Some("z1"));
    let zones: Vec<Option<&str>> = config.services[0].ports[0]
        .endpoints
        .iter()
        .map(|e| e.zone.as_deref())
        .collect();
    assert_eq!(zones, [Some("z1"), Some("z2")]);

    // A node without the label, a node not listed: no zone.
    let config = ok(&base_with(&[], &["nodes: [{name: node-a}]"]));
    assert_eq!(config.nodes[0].labels, BTreeMap::new());
    assert_eq!(config.local_zone(), None);
    assert!(
        config.services[0].ports[0]
            .endpoints
            .iter()
            .all(|e| e.zone.is_none())
    );

    assert_eq!(
        error(&base_with(&[], &["nodes: [{name: n1}, {name: n1}]"])),
        "mesh.yaml:19:28: nodes[1].name: node n1 is already defined at line 19"
    );
    assert_eq!(
        error(&base_with(&[], &["nodes: [{name: Node_1}]"])),
        format!(
            "mesh.yaml:19:16: nodes[0].name: `Node_1` is not a valid node name: {SUBDOMAIN_RULE}"
        )
    );
    assert_eq!(
        error(&base_with(
            &[],
            &["nodes: [{name: n1, labels: {topology.kubernetes.io/zone: ''}}]"]
        )),
        "mesh.yaml:19:58: nodes[0].labels.topology.kubernetes.io/zone: the zone must not be \
         empty (omit the label when the zone is unknown)"
    );
    assert_eq!(
        error(&base_with(&[], &["nodes: [{name: n1, zone: z1}]"])),
        "mesh.yaml:19:20: nodes[0].zone: unknown field `zone`, expected one of name, labels"
    );
}
