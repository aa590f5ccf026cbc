//! How the snapshot serializes for the admin API's `/config_dump`: under the YAML's names,
//! with durations in the unit the YAML writes them in (`connectTimeoutMs: 2000`, not a
//! `{secs, nanos}` pair), so a dump reads like the file it came from.

use std::time::Duration;

use serde::Serializer;

/// A duration as whole milliseconds (`...Ms` keys).
pub(super) fn millis<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

/// An optional duration as whole milliseconds, `null` when unset.
pub(super) fn millis_opt<S: Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => millis(duration, serializer),
        None => serializer.serialize_none(),
    }
}

/// A duration as whole minutes (`certLifetimeMinutes`).
pub(super) fn minutes<S: Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(duration.as_secs() / 60)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn a_dump_uses_the_yaml_names_and_units_and_leaves_out_the_lookups() {
        let yaml = "agent: {node: a, connectTimeoutMs: 2500, certLifetimeMinutes: 90}\n\
             workloads:\n\
             \x20 - {name: srv, namespace: demo, ips: [10.1.0.4], node: a, netns: /n/s, labels: {app: srv}}\n\
             services:\n\
             \x20 - name: web\n\
             \x20   namespace: demo\n\
             \x20   vips: [10.96.0.10]\n\
             \x20   ports: [{port: 80, targetPort: 8080}]\n\
             \x20   endpoints: {selector: {app: srv}}\n\
             \x20   trafficPolicy:\n\
             \x20     loadBalancer: {algorithm: maglev, hashOn: sourceIdentity}\n\
             \x20     maxConnectionLifetimeMs: 60000\n\
             policies:\n\
             \x20 rateLimits:\n\
             \x20   - {name: rl, namespace: demo, connections: {perSecond: 5}, onLimit: {action: wait, maxWaitMs: 100}}\n";
        let config = Config::from_yaml_str(yaml, "dump.yaml").unwrap_or_else(|e| panic!("{e}"));
        let dump = serde_json::to_value(&config).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dump["agent"]["connectTimeoutMs"], 2500);
        assert_eq!(dump["agent"]["certLifetimeMinutes"], 90);
        assert_eq!(dump["agent"]["adminAddr"], "127.0.0.1:15000");
        let workload = &dump["workloads"][0];
        assert_eq!(workload["serviceAccount"], "default");
        assert_eq!(
            workload["identity"],
            "spiffe://cluster.local/ns/demo/sa/default"
        );
        assert_eq!(workload["ips"][0], "10.1.0.4");
        assert_eq!(workload["failMode"], "open");
        let service = &dump["services"][0];
        assert_eq!(service["endpoints"]["selector"]["app"], "srv");
        assert_eq!(service["ports"][0]["targetPort"], 8080);
        assert_eq!(
            service["ports"][0]["endpoints"][0]["address"],
            "10.1.0.4:8080"
        );
        let traffic = &service["trafficPolicy"];
        assert_eq!(traffic["loadBalancer"]["algorithm"], "maglev");
        assert_eq!(traffic["loadBalancer"]["hashOn"], "sourceIdentity");
        assert_eq!(traffic["maxConnectionLifetimeMs"], 60000);
        assert_eq!(traffic["outlierDetection"]["baseEjectionMs"], 30000);
        let limit = &dump["policies"]["rateLimits"][0];
        assert_eq!(limit["connections"]["perSecond"], 5);
        assert_eq!(limit["onLimit"]["action"], "wait");
        assert_eq!(limit["onLimit"]["maxWaitMs"], 100);
        for lookup in ["byVip", "by_vip", "byIp", "local", "authzByWorkload"] {
            assert!(dump.get(lookup).is_none(), "{lookup} is left out");
        }
    }
}
