//! Unit tests of the balancers (no network). Random algorithms are checked over 2,000 picks
//! against tolerances of at least 4.5 standard deviations, so they do not flake; Maglev's
//! hash is fixed, so its figures are exact.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use super::*;
use crate::config::{
    CallerMatch, CallerRoute, CircuitBreaker, HashOn, LoadBalancer, Node, OutlierDetection,
    Retries, Subset, TrafficPolicy, traffic::defaults::ZONE_LABEL,
};

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// One workload per `(node, version)`, `w{i}` at 10.1.0.{i+1} (and fd00::{i+1} when `dual`),
/// behind service `demo/web` port 80 -> 8080; this agent is on node `a`; the client is
/// `demo/client` on `a`.
fn config_with(endpoints: &[(&str, &str)], dual: bool) -> Config {
    let mut yaml = String::from(
        "agent: {node: a}\nworkloads:\n  - {name: client, namespace: demo, serviceAccount: client, ips: [10.0.0.1], node: a, netns: /n/client, labels: {app: client}}\n",
    );
    for (i, (node, version)) in endpoints.iter().enumerate() {
        let v6 = if dual {
            format!(", \"fd00::{:x}\"", i + 1)
        } else {
            String::new()
        };
        yaml.push_str(&format!(
            "  - {{name: w{i}, namespace: demo, ips: [10.1.{}.{}{v6}], node: {node}, netns: /n/w{i}, labels: {{app: web, version: {version}}}}}\n",
            i / 200,
            i % 200 + 1,
        ));
    }
    yaml.push_str(
        "services:\n  - {name: web, namespace: demo, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], endpoints: {selector: {app: web}}}\n",
    );
    Config::from_yaml_str(&yaml, "balance.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn config(n: usize) -> Config {
    let nodes = vec![("b", "v1"); n];
    config_with(&nodes, false)
}

fn with_policy(mut config: Config, policy: TrafficPolicy) -> Config {
    std::sync::Arc::make_mut(&mut config.services[0]).traffic = Arc::new(policy);
    config
}

/// Nodes `a` and `b` in zone `z1`, `c` in `z2`; endpoint zones filled in from them.
fn with_zones(mut config: Config) -> Config {
    let zone = |node: &str| if node == "c" { "z2" } else { "z1" };
    config.nodes = ["a", "b", "c"]
        .iter()
        .map(|n| Node {
            name: (*n).to_owned(),
            labels: BTreeMap::from([(ZONE_LABEL.to_owned(), zone(n).to_owned())]),
        })
        .collect();
    for e in &mut std::sync::Arc::make_mut(&mut config.services[0]).ports[0].endpoints {
        e.zone = e.node.as_deref().map(|n| zone(n).to_owned());
    }
    config
}

fn policy(load_balancer: LoadBalancer) -> TrafficPolicy {
    TrafficPolicy {
        load_balancer,
        ..TrafficPolicy::default()
    }
}

fn balancer(config: &Config) -> (Balancers, Arc<ServiceBalancer>) {
    let balancers = Balancers::new();
    balancers.sync(config);
    let b = balancers.get("demo/web", 80).expect("balancer");
    (balancers, b)
}

fn caller(ip: &str) -> Caller<'static> {
    Caller {
        ip: ip.parse().expect("ip"),
        identity: None,
        labels: &NO_LABELS,
        ipv4: true,
    }
}

fn ep(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 1, (i / 200) as u8, (i % 200 + 1) as u8], 8080))
}

fn pick(b: &Arc<ServiceBalancer>, caller: &Caller) -> SocketAddr {
    b.pick(caller, &[]).expect("pick").endpoint().addr
}

/// `n` picks (each dropped unresolved), counted per endpoint.
fn counts(b: &Arc<ServiceBalancer>, caller: &Caller, n: usize) -> BTreeMap<SocketAddr, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        *counts.entry(pick(b, caller)).or_default() += 1;
    }
    counts
}

fn count(counts: &BTreeMap<SocketAddr, usize>, addr: SocketAddr) -> usize {
    counts.get(&addr).copied().unwrap_or(0)
}

fn state(b: &ServiceBalancer, addr: SocketAddr) -> EndpointState {
    b.status()
        .endpoints
        .into_iter()
        .find(|e| e.address == addr.to_string())
        .expect("endpoint in status")
        .state
}

fn fail(b: &Arc<ServiceBalancer>, addr: SocketAddr) -> bool {
    b.pick(&caller("10.0.0.1"), &others(b, addr))
        .expect("pick")
        .failed()
}

/// Every endpoint but `addr`, to force a pick onto it.
fn others(b: &ServiceBalancer, addr: SocketAddr) -> Vec<SocketAddr> {
    b.endpoints()
        .map(|e| e.addr)
        .filter(|a| *a != addr)
        .collect()
}

#[test]
fn round_robin_gives_each_endpoint_exactly_its_turn() {
    let (_, b) = balancer(&with_policy(config(4), policy(LoadBalancer::RoundRobin)));
    let counts = counts(&b, &caller("10.0.0.1"), 2000);
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), [500; 4]);
}

#[test]
fn random_is_uniform_within_100_of_500_each() {
    // sigma = sqrt(2000 x 1/4 x 3/4) = 19.4: 100 is 5 sigma.
    let (_, b) = balancer(&with_policy(config(4), policy(LoadBalancer::Random)));
    let counts = counts(&b, &caller("10.0.0.1"), 2000);
    assert_eq!(counts.len(), 4);
    assert!(
        counts.values().all(|c| c.abs_diff(500) <= 100),
        "{counts:?}"
    );
}

#[test]
fn weighted_follows_endpoint_weights_within_5_points() {
    let mut config = with_policy(config(4), policy(LoadBalancer::Weighted));
    for (i, e) in std::sync::Arc::make_mut(&mut config.services[0]).ports[0]
        .endpoints
        .iter_mut()
        .enumerate()
    {
        e.weight = i as u32 + 1; // 10%, 20%, 30%, 40%
    }
    let (_, b) = balancer(&config);
    let counts = counts(&b, &caller("10.0.0.1"), 2000);
    // Largest sigma (p = 0.4): 21.9 picks; 5 points = 100 picks = 4.6 sigma.
    for i in 0..4 {
        let expected = 200 * (i + 1);
        assert!(
            count(&counts, ep(i)).abs_diff(expected) <= 100,
            "{counts:?}"
        );
    }
}

#[test]
fn least_connections_is_even_when_idle_and_avoids_a_loaded_endpoint() {
    let (_, b) = balancer(&with_policy(
        config(4),
        policy(LoadBalancer::LeastConnections),
    ));
    let idle = counts(&b, &caller("10.0.0.1"), 2000);
    assert!(idle.values().all(|c| c.abs_diff(500) <= 100), "{idle:?}");
    let guards: Vec<ActiveGuard> = (0..20)
        .map(|_| {
            b.pick(&caller("10.0.0.1"), &others(&b, ep(0)))
                .expect("pick")
                .connected(Duration::from_millis(1))
        })
        .collect();
    let loaded = counts(&b, &caller("10.0.0.1"), 2000);
    // Of two distinct choices the loaded one always loses.
    assert_eq!(count(&loaded, ep(0)), 0, "{loaded:?}");
    drop(guards);
    assert_eq!(b.status().circuit.active, 0);
}

#[test]
fn peak_ewma_avoids_a_slow_endpoint_and_weighs_load() {
    let (_, b) = balancer(&with_policy(config(4), TrafficPolicy::default()));
    assert_eq!(
        b.policy().load_balancer,
        LoadBalancer::PeakEwma,
        "the default"
    );
    let even = counts(&b, &caller("10.0.0.1"), 2000);
    assert!(even.values().all(|c| c.abs_diff(500) <= 100), "{even:?}");
    for i in 0..4 {
        let latency = Duration::from_millis(if i == 0 { 50 } else { 1 });
        drop(
            b.pick(&caller("10.0.0.1"), &others(&b, ep(i)))
                .expect("pick")
                .connected(latency),
        );
    }
    let slow = counts(&b, &caller("10.0.0.1"), 2000);
    assert_eq!(count(&slow, ep(0)), 0, "{slow:?}");
    let status = b.status();
    let latency = status.endpoints[0].latency_ms.expect("measured");
    assert!((49.0..=50.0).contains(&latency), "{latency}");
    // A busy fast endpoint (1 ms x 60) costs more than the idle slow one (50 ms x 1).
    let busy: Vec<ActiveGuard> = (1..4)
        .flat_map(|i| (0..60).map(move |_| i))
        .map(|i| {
            b.pick(&caller("10.0.0.1"), &others(&b, ep(i)))
                .expect("pick")
                .connected(Duration::from_millis(1))
        })
        .collect();
    // ep(0) wins whenever it is one of the two choices: half the time.
    let counts = counts(&b, &caller("10.0.0.1"), 2000);
    assert!(count(&counts, ep(0)).abs_diff(1000) <= 100, "{counts:?}");
    drop(busy);
}

#[test]
fn peak_ewma_decays_so_a_slow_endpoint_is_tried_again() {
    let (_, b) = balancer(&with_policy(config(2), TrafficPolicy::default()));
    let slow = b.pick(&caller("10.0.0.1"), &[ep(1)]).expect("pick");
    drop(slow.connected(Duration::from_millis(100)));
    let fast = b.pick(&caller("10.0.0.1"), &[ep(0)]).expect("pick");
    drop(fast.connected(Duration::from_millis(1)));
    assert_eq!(count(&counts(&b, &caller("10.0.0.1"), 100), ep(0)), 0);
    // 50 s (5 tau) later the slow one, not refreshed, is at 100 ms x e^-5 = 0.67 ms; the
    // fast one is measured again at 1 ms.
    clock::advance(Duration::from_secs(50));
    drop(
        b.pick(&caller("10.0.0.1"), &[ep(0)])
            .expect("pick")
            .connected(Duration::from_millis(1)),
    );
    assert!(count(&counts(&b, &caller("10.0.0.1"), 100), ep(0)) > 0);
}

fn maglev_config(n: usize) -> Config {
    with_policy(
        config(n),
        policy(LoadBalancer::Maglev {
            hash_on: HashOn::SourceIp,
        }),
    )
}

fn source(i: u32) -> String {
    let [_, b, c, d] = i.to_be_bytes();
    format!("172.{b}.{c}.{d}")
}

/// The endpoint of each of `n` sources.
fn assignment(b: &Arc<ServiceBalancer>, n: u32) -> Vec<SocketAddr> {
    (0..n).map(|i| pick(b, &caller(&source(i)))).collect()
}

#[test]
fn maglev_is_sticky_and_even() {
    let (_, b) = balancer(&maglev_config(10));
    let first = assignment(&b, 2000);
    assert_eq!(
        first,
        assignment(&b, 2000),
        "every source keeps its endpoint"
    );
    let mut per_endpoint: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for addr in &first {
        *per_endpoint.entry(*addr).or_default() += 1;
    }
    // 200 each expected; sigma = 13.4, and the hash is fixed.
    println!(
        "maglev: 2000 sources over 10 endpoints: {:?}",
        per_endpoint.values()
    );
    assert_eq!(per_endpoint.len(), 10);
    assert!(
        per_endpoint.values().all(|c| c.abs_diff(200) <= 60),
        "{per_endpoint:?}"
    );
}

#[test]
fn maglev_moves_about_one_nth_of_sources_when_an_endpoint_goes() {
    let config = maglev_config(10);
    let (balancers, b) = balancer(&config);
    let before = assignment(&b, 10_000);
    let mut fewer = config.clone();
    std::sync::Arc::make_mut(&mut fewer.services[0]).ports[0]
        .endpoints
        .retain(|e| e.addr != ep(3));
    balancers.sync(&fewer);
    let b = balancers.get("demo/web", 80).expect("balancer");
    let after = assignment(&b, 10_000);
    let on_removed = before.iter().filter(|a| **a == ep(3)).count();
    let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
    // Those on the removed endpoint must move (~10%); the others barely.
    let share = moved as f64 / 10_000.0;
    println!(
        "maglev: removing 1 of 10 endpoints moved {:.2}% of sources ({on_removed} were on it)",
        share * 100.0
    );
    assert!(moved >= on_removed);
    assert!(moved - on_removed <= 100, "at most 1% of the others move");
    assert!((0.08..=0.13).contains(&share), "moved {share}");
}

#[test]
fn maglev_probes_onward_past_tried_or_unavailable_and_returns() {
    let (_, b) = balancer(&maglev_config(5));
    let me = caller("172.16.0.9");
    let home = pick(&b, &me);
    let retry = b.pick(&me, &[home]).expect("retry").endpoint().addr;
    assert_ne!(retry, home);
    assert_eq!(b.pick(&me, &[home]).expect("again").endpoint().addr, retry);
    b.set_health(home, false);
    assert_eq!(pick(&b, &me), retry, "the same spill-over as a retry");
    b.set_health(home, true);
    assert_eq!(pick(&b, &me), home);
    let all: Vec<SocketAddr> = b.endpoints().map(|e| e.addr).collect();
    assert_eq!(b.pick(&me, &all).unwrap_err(), PickError::NoneAvailable);
}

#[test]
fn maglev_on_identity_keeps_a_service_account_together() {
    let config = with_policy(
        config(10),
        policy(LoadBalancer::Maglev {
            hash_on: HashOn::SourceIdentity,
        }),
    );
    let (_, b) = balancer(&config);
    let id = crate::tls::SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/client").expect("id");
    let picks: BTreeSet<SocketAddr> = (0..50)
        .map(|i| {
            let mut c = caller(&source(i));
            c.identity = Some(&id);
            pick(&b, &c)
        })
        .collect();
    assert_eq!(
        picks.len(),
        1,
        "one identity, one endpoint, whatever the IP"
    );
}

fn outlier(consecutive_failures: u32, max_ejected_percent: u8) -> TrafficPolicy {
    TrafficPolicy {
        load_balancer: LoadBalancer::RoundRobin,
        outlier_detection: Some(OutlierDetection {
            consecutive_failures,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(35),
            max_ejected_percent,
        }),
        ..TrafficPolicy::default()
    }
}

#[test]
fn consecutive_failures_eject_for_growing_times_that_expire() {
    let (_, b) = balancer(&with_policy(config(4), outlier(3, 50)));
    let bad = ep(0);
    for (round, secs) in [10u64, 20, 35].into_iter().enumerate() {
        assert!(!fail(&b, bad) && !fail(&b, bad), "round {round}");
        assert!(
            fail(&b, bad),
            "the third failure in a row ejects (round {round})"
        );
        assert!(matches!(state(&b, bad), EndpointState::Ejected { .. }));
        assert_eq!(count(&counts(&b, &caller("10.0.0.1"), 300), bad), 0);
        clock::advance(Duration::from_secs(secs - 1));
        assert_eq!(count(&counts(&b, &caller("10.0.0.1"), 30), bad), 0);
        clock::advance(Duration::from_secs(1));
        assert_eq!(count(&counts(&b, &caller("10.0.0.1"), 40), bad), 10, "back");
        assert_eq!(state(&b, bad), EndpointState::Healthy);
    }
    let status = b.status();
    assert_eq!(status.endpoints[0].ejections, 3);
}

#[test]
fn a_success_clears_the_streak_and_resets_before_a_reply_count() {
    let (_, b) = balancer(&with_policy(config(4), outlier(3, 50)));
    let bad = ep(1);
    assert!(!fail(&b, bad) && !fail(&b, bad));
    let ok = b.pick(&caller("10.0.0.1"), &others(&b, bad)).expect("pick");
    drop(ok.connected(Duration::from_millis(1)));
    assert!(!fail(&b, bad) && !fail(&b, bad), "the streak started over");
    assert!(fail(&b, bad));
    // An endpoint that accepts and then resets every connection.
    let resets = ep(2);
    let ejected: Vec<bool> = (0..3)
        .map(|_| {
            let guard = b
                .pick(&caller("10.0.0.1"), &others(&b, resets))
                .expect("pick")
                .connected(Duration::from_millis(1));
            let ejected = guard.reset_before_reply();
            assert!(!guard.reset_before_reply(), "counted once");
            ejected
        })
        .collect();
    assert_eq!(ejected, [false, false, true]);
}

#[test]
fn never_more_than_max_ejected_percent_at_once_and_off_means_off() {
    let (_, b) = balancer(&with_policy(config(4), outlier(1, 50)));
    assert!(fail(&b, ep(0)));
    assert!(fail(&b, ep(1)));
    assert!(!fail(&b, ep(2)), "a third of four would exceed 50%");
    assert_eq!(state(&b, ep(2)), EndpointState::Healthy);
    let mut off = outlier(1, 50);
    off.outlier_detection = None;
    let (_, b) = balancer(&with_policy(config(4), off));
    assert!(!(0..10).any(|_| fail(&b, ep(0))));
}

#[test]
fn service_and_endpoint_circuit_limits() {
    let mut limited = policy(LoadBalancer::RoundRobin);
    limited.circuit_breaker = CircuitBreaker {
        max_connections: Some(2),
        max_pending: Some(2),
        ..CircuitBreaker::default()
    };
    let (_, b) = balancer(&with_policy(config(2), limited.clone()));
    let c = caller("10.0.0.1");
    let (p1, p2) = (b.pick(&c, &[]).expect("1"), b.pick(&c, &[]).expect("2"));
    assert_eq!(
        b.pick(&c, &[]).unwrap_err(),
        PickError::CircuitOpen("max_pending")
    );
    let g1 = p1.connected(Duration::from_millis(1));
    let g2 = p2.connected(Duration::from_millis(1));
    assert_eq!(
        b.pick(&c, &[]).unwrap_err(),
        PickError::CircuitOpen("max_connections")
    );
    drop(g1);
    assert!(b.pick(&c, &[]).is_ok());
    let status = b.status().circuit;
    assert_eq!((status.active, status.pending), (1, 0));
    assert_eq!(
        (status.refused_max_pending, status.refused_max_connections),
        (1, 1)
    );
    drop(g2);

    limited.circuit_breaker = CircuitBreaker {
        max_connections_per_endpoint: Some(1),
        max_pending_per_endpoint: Some(1),
        ..CircuitBreaker::default()
    };
    let (_, b) = balancer(&with_policy(config(2), limited));
    let g0 = b
        .pick(&c, &[ep(1)])
        .expect("pick")
        .connected(Duration::ZERO);
    assert_eq!(
        count(&counts(&b, &c, 50), ep(1)),
        50,
        "the full one is skipped"
    );
    let pending = b.pick(&c, &[]).expect("pick");
    assert_eq!(pending.endpoint().addr, ep(1));
    assert_eq!(b.pick(&c, &[]).unwrap_err(), PickError::NoneAvailable);
    drop((g0, pending));
}

#[test]
fn retries_stay_within_the_budget_over_10_seconds() {
    let mut budgeted = policy(LoadBalancer::RoundRobin);
    budgeted.retries = Retries {
        attempts: 2,
        budget_percent: 20,
        min_retries_per_second: 1,
    };
    let (_, b) = balancer(&with_policy(config(2), budgeted));
    let c = caller("10.0.0.1");
    assert_eq!(
        (0..20).filter(|_| b.try_retry()).count(),
        10,
        "the floor: 1/s x 10 s"
    );
    for _ in 0..100 {
        drop(b.pick(&c, &[]).expect("pick"));
    }
    // Retries (a non-empty `tried`) are not first attempts.
    drop(b.pick(&c, &[ep(0)]).expect("retry pick"));
    assert_eq!(
        (0..20).filter(|_| b.try_retry()).count(),
        10,
        "20% of 100, 10 used"
    );
    let status = b.status().retry_budget;
    assert_eq!(
        (
            status.first_attempts,
            status.retries,
            status.allowed,
            status.refused
        ),
        (100, 20, 20, 20)
    );
    clock::advance(Duration::from_secs(10));
    assert_eq!(
        (0..20).filter(|_| b.try_retry()).count(),
        10,
        "a new window"
    );
}

/// Two endpoints on this node (a), two in its zone (b), two elsewhere (c).
fn locality_config() -> Config {
    let endpoints = [
        ("a", "v1"),
        ("a", "v1"),
        ("b", "v1"),
        ("b", "v1"),
        ("c", "v1"),
        ("c", "v1"),
    ];
    with_zones(with_policy(
        config_with(&endpoints, false),
        policy(LoadBalancer::RoundRobin),
    ))
}

fn picked(b: &Arc<ServiceBalancer>) -> BTreeSet<SocketAddr> {
    counts(b, &caller("10.0.0.1"), 60).into_keys().collect()
}

#[test]
fn locality_prefers_this_node_then_its_zone_and_widens_below_min_healthy() {
    let (_, b) = balancer(&locality_config());
    assert_eq!(picked(&b), BTreeSet::from([ep(0), ep(1)]));
    // A retry stays local while 50% of the tier is available.
    assert_eq!(
        b.pick(&caller("10.0.0.1"), &[ep(0)])
            .expect("retry")
            .endpoint()
            .addr,
        ep(1)
    );
    b.set_health(ep(0), false);
    assert_eq!(
        picked(&b),
        BTreeSet::from([ep(1)]),
        "1 of 2 is 50%: still local"
    );
    b.set_health(ep(1), false);
    assert_eq!(
        picked(&b),
        BTreeSet::from([ep(2), ep(3)]),
        "the zone: 2 of 4"
    );
    b.set_health(ep(2), false);
    assert_eq!(
        picked(&b),
        BTreeSet::from([ep(3), ep(4), ep(5)]),
        "1 of 4 in zone: all"
    );
    for i in 0..3 {
        b.set_health(ep(i), true);
    }
    assert_eq!(picked(&b), BTreeSet::from([ep(0), ep(1)]), "back home");

    let mut config = locality_config();
    std::sync::Arc::make_mut(&mut std::sync::Arc::make_mut(&mut config.services[0]).traffic)
        .locality
        .enabled = false;
    let (_, b) = balancer(&config);
    assert_eq!(picked(&b).len(), 6);
    // Without zone labels the zone tier is this node's.
    let mut config = locality_config();
    config.nodes.clear();
    let (_, b) = balancer(&config);
    b.set_health(ep(0), false);
    b.set_health(ep(1), false);
    assert_eq!(picked(&b).len(), 4, "straight to all");
}

fn canary(v2_weight: u32) -> Config {
    let endpoints = [("b", "v1"), ("b", "v1"), ("b", "v2"), ("b", "v2")];
    let mut policy = policy(LoadBalancer::RoundRobin);
    let subset = |name: &str, weight| Subset {
        name: name.to_owned(),
        labels: BTreeMap::from([("version".to_owned(), name.to_owned())]),
        weight,
    };
    policy.subsets = vec![subset("v1", 100 - v2_weight), subset("v2", v2_weight)];
    policy.caller_routes = vec![CallerRoute {
        from: CallerMatch {
            labels: BTreeMap::from([("group".to_owned(), "beta".to_owned())]),
            identities: Vec::new(),
        },
        subset: "v2".to_owned(),
    }];
    with_policy(config_with(&endpoints, false), policy)
}

#[test]
fn subsets_split_by_weight_within_3_points() {
    let (_, b) = balancer(&canary(10));
    let mut v2 = 0usize;
    for _ in 0..2000 {
        let pick = b.pick(&caller("10.0.0.1"), &[]).expect("pick");
        if pick.subset() == Some("v2") {
            v2 += 1;
            assert!([ep(2), ep(3)].contains(&pick.endpoint().addr));
        }
    }
    // 200 expected; sigma = 13.4; 3 points = 60 picks = 4.5 sigma.
    assert!(v2.abs_diff(200) <= 60, "v2 took {v2} of 2000");
    let status = b.status();
    assert_eq!(status.endpoints[2].subsets, ["v2"]);
}

#[test]
fn caller_routes_fix_the_subset_strictly_and_weights_fail_over() {
    let config = canary(10);
    let (balancers, b) = balancer(&config);
    let beta_labels = BTreeMap::from([("group".to_owned(), "beta".to_owned())]);
    let mut beta = caller("10.0.0.1");
    beta.labels = &beta_labels;
    assert_eq!(picked_by(&b, &beta), BTreeSet::from([ep(2), ep(3)]));
    b.set_health(ep(2), false);
    b.set_health(ep(3), false);
    assert_eq!(
        b.pick(&beta, &[]).unwrap_err(),
        PickError::NoneAvailable,
        "strict"
    );
    assert_eq!(picked(&b), BTreeSet::from([ep(0), ep(1)]));
    b.set_health(ep(2), true);
    b.set_health(ep(3), true);
    b.set_health(ep(0), false);
    b.set_health(ep(1), false);
    assert_eq!(
        picked(&b),
        BTreeSet::from([ep(2), ep(3)]),
        "v1 down: all to v2"
    );
    // A weight change applies to the next pick (health carried over).
    balancers.sync(&canary(0));
    let b = balancers.get("demo/web", 80).expect("balancer");
    assert_eq!(
        b.pick(&caller("10.0.0.1"), &[]).unwrap_err(),
        PickError::NoneAvailable
    );
    b.set_health(ep(0), true);
    assert_eq!(picked(&b), BTreeSet::from([ep(0)]));
}

fn picked_by(b: &Arc<ServiceBalancer>, c: &Caller) -> BTreeSet<SocketAddr> {
    counts(b, c, 60).into_keys().collect()
}

#[test]
fn live_stats_carry_across_sync_by_address() {
    let config = with_policy(config(3), outlier(1, 50));
    let (balancers, b) = balancer(&config);
    balancers.sync(&config);
    let same = balancers.get("demo/web", 80).expect("balancer");
    assert!(
        Arc::ptr_eq(&b, &same),
        "an unchanged service port keeps its balancer"
    );
    let guard = b
        .pick(&caller("10.0.0.1"), &others(&b, ep(0)))
        .expect("pick")
        .connected(Duration::from_millis(3));
    assert!(fail(&b, ep(1)));
    b.set_health(ep(2), false);

    let mut changed = config.clone();
    std::sync::Arc::make_mut(&mut changed.services[0]).ports[0]
        .endpoints
        .retain(|e| e.addr != ep(2));
    std::sync::Arc::make_mut(&mut std::sync::Arc::make_mut(&mut changed.services[0]).traffic)
        .load_balancer = LoadBalancer::LeastConnections;
    balancers.sync(&changed);
    let new = balancers.get("demo/web", 80).expect("balancer");
    assert!(!Arc::ptr_eq(&b, &new));
    let status = new.status();
    assert_eq!(status.algorithm, "leastConnections");
    assert_eq!(status.endpoints.len(), 2);
    assert_eq!(status.endpoints[0].active, 1);
    assert!(status.endpoints[0].latency_ms.is_some());
    assert!(matches!(
        status.endpoints[1].state,
        EndpointState::Ejected { .. }
    ));
    assert_eq!(status.circuit.active, 1);
    drop(guard);
    assert_eq!(new.status().endpoints[0].active, 0);
    assert_eq!(new.status().circuit.active, 0);
    // The removed unhealthy endpoint no longer counts: with the ejection over, no scan.
    clock::advance(Duration::from_secs(11));
    drop(new.pick(&caller("10.0.0.1"), &[]).expect("pick"));
    assert_eq!(
        new.shared
            .flagged
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    let mut gone = changed.clone();
    gone.services.clear();
    balancers.sync(&gone);
    assert!(balancers.get("demo/web", 80).is_none());
    assert!(balancers.status().is_empty());
    assert!(
        !new.pick(&caller("10.0.0.1"), &others(&new, ep(0)))
            .expect("pick")
            .failed()
    );
}

#[test]
fn the_callers_address_family_is_preferred() {
    let (_, b) = balancer(&with_policy(
        config_with(&[("b", "v1"), ("b", "v1")], true),
        policy(LoadBalancer::RoundRobin),
    ));
    let v4: BTreeSet<bool> = picked(&b).iter().map(SocketAddr::is_ipv4).collect();
    assert_eq!(v4, BTreeSet::from([true]));
    let mut c = caller("fd00::99");
    c.ipv4 = false;
    let v6: BTreeSet<SocketAddr> = counts(&b, &c, 10).into_keys().collect();
    assert_eq!(v6.len(), 2);
    assert!(v6.iter().all(SocketAddr::is_ipv6));
    // Only IPv4 endpoints: an IPv6 caller still gets one.
    let (_, b) = balancer(&with_policy(config(2), policy(LoadBalancer::RoundRobin)));
    assert!(pick(&b, &c).is_ipv4());
}

#[test]
fn empty_ports_dropped_picks_and_status_serialization() {
    let mut config = config(2);
    std::sync::Arc::make_mut(&mut config.services[0]).ports[0]
        .endpoints
        .clear();
    let (_, b) = balancer(&config);
    assert_eq!(
        b.pick(&caller("10.0.0.1"), &[]).unwrap_err(),
        PickError::NoEndpoints
    );

    let (balancers, b) = balancer(&with_policy(self::config(2), outlier(1, 50)));
    let p = b.pick(&caller("10.0.0.1"), &[]).expect("pick");
    assert_eq!(b.status().circuit.pending, 1);
    drop(p);
    assert_eq!(
        b.status().circuit.pending,
        0,
        "a cancelled connect is no longer pending"
    );
    assert!(fail(&b, ep(0)));
    let json = serde_json::to_value(balancers.status()).expect("json");
    let service = &json[0];
    assert_eq!(service["service"], "demo/web");
    assert_eq!(service["algorithm"], "roundRobin");
    assert_eq!(service["endpoints"][0]["state"], "ejected");
    assert!(service["endpoints"][0]["until"].as_u64().expect("until") > 1_700_000_000);
    assert_eq!(service["endpoints"][1]["state"], "healthy");
    assert_eq!(service["endpoints"][1]["node"], "b");
    let back: Vec<ServiceStatus> = serde_json::from_value(json).expect("round trip");
    assert_eq!(back[0].endpoints[1], balancers.status()[0].endpoints[1]);
}

/// A snapshot that hands services over as the same shared values (as the Kubernetes source
/// does for those it did not rebuild) keeps their balancers without looking; a replaced
/// value is looked at again and a dropped one is gone, its balancer retired.
#[test]
fn shared_services_are_kept_and_replaced_or_dropped_ones_synced() {
    let mut config = config(2);
    let mut other = (*config.services[0]).clone();
    other.name = "api".into();
    other.vips = vec!["10.96.0.2".parse().expect("vip")];
    config.services.push(Arc::new(other));
    let balancers = Balancers::new();
    balancers.sync(&config);
    let web = balancers.get("demo/web", 80).expect("web");
    let api = balancers.get("demo/api", 80).expect("api");

    // The same values again: the same balancers.
    let again = config.clone();
    balancers.sync(&again);
    assert!(Arc::ptr_eq(
        &web,
        &balancers.get("demo/web", 80).expect("web")
    ));
    assert!(Arc::ptr_eq(
        &api,
        &balancers.get("demo/api", 80).expect("api")
    ));

    // web replaced by a value with one endpoint less, api dropped.
    let mut next = config.clone();
    Arc::make_mut(&mut next.services[0]).ports[0]
        .endpoints
        .pop();
    next.services.pop();
    balancers.sync(&next);
    let web2 = balancers.get("demo/web", 80).expect("web stays");
    assert!(!Arc::ptr_eq(&web, &web2));
    assert_eq!(web2.status().endpoints.len(), 1);
    assert!(balancers.get("demo/api", 80).is_none(), "api is gone");
    assert_eq!(balancers.status().len(), 1);

    // A value equal to the synced one but not shared is looked at: same inputs, kept.
    let mut copy = next.clone();
    copy.services[0] = Arc::new((*next.services[0]).clone());
    balancers.sync(&copy);
    assert!(Arc::ptr_eq(
        &web2,
        &balancers.get("demo/web", 80).expect("web")
    ));
}

/// A port's balancer is built on its first pick, not at the sync: until then the health
/// checker does not see it and status shows it as it would start; a port with a health
/// check is built at once, and one that was used keeps its live state when its service
/// changes.
#[test]
fn a_balancer_is_built_on_first_use_unless_it_must_exist_before() {
    let config = config(2);
    let balancers = Balancers::new();
    balancers.sync(&config);
    assert!(balancers.all().is_empty(), "nothing built at the sync");
    let status = balancers.status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].endpoints.len(), 2);
    assert!(balancers.all().is_empty(), "status builds nothing it keeps");

    let b = balancers.get("demo/web", 80).expect("built on use");
    assert_eq!(balancers.all().len(), 1);
    assert!(Arc::ptr_eq(
        &b,
        &balancers.get("demo/web", 80).expect("same")
    ));
    // Used: its live state (here an ejection) carries over to the changed service.
    let addr = pick(&b, &caller("10.0.0.1"));
    for _ in 0..5 {
        if fail(&b, addr) {
            break;
        }
    }
    let mut changed = config.clone();
    Arc::make_mut(&mut changed.services[0]).ports[0]
        .endpoints
        .push(crate::config::Endpoint {
            addr: "10.1.0.9:8080".parse().expect("addr"),
            node: Some("b".into()),
            local: false,
            weight: 1,
            zone: None,
        });
    balancers.sync(&changed);
    assert_eq!(
        balancers.all().len(),
        1,
        "a used port is built again at once"
    );
    let again = balancers.get("demo/web", 80).expect("web");
    assert!(!Arc::ptr_eq(&b, &again));
    assert!(matches!(state(&again, addr), EndpointState::Ejected { .. }));

    // A health check needs the balancer before any pick.
    let mut policy = policy(LoadBalancer::RoundRobin);
    policy.health_check = Some(crate::config::HealthCheck::default());
    let checked = with_policy(config, policy);
    let fresh = Balancers::new();
    fresh.sync(&checked);
    assert_eq!(fresh.all().len(), 1);
}
