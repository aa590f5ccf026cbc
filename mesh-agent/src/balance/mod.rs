//! Endpoint selection. Stage one ships round robin; the balancing issue adds P2C peak-EWMA,
//! least connections, Maglev and outlier ejection behind the same trait.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::config::Endpoint;

/// Picks one endpoint of a service port for a new connection.
pub trait Balancer: Send + Sync {
    /// `key` names the service port (its state survives config snapshots); `candidates` are
    /// its usable endpoints. `None` only when there are none.
    fn pick<'a>(&self, key: &str, candidates: &[&'a Endpoint]) -> Option<&'a Endpoint>;
}

/// Each service port cycles through its endpoints in order.
#[derive(Default)]
pub struct RoundRobin {
    next: Mutex<HashMap<String, usize>>,
}

impl Balancer for RoundRobin {
    fn pick<'a>(&self, key: &str, candidates: &[&'a Endpoint]) -> Option<&'a Endpoint> {
        if candidates.is_empty() {
            return None;
        }
        let mut next = self.next.lock();
        let turn = match next.get_mut(key) {
            Some(turn) => turn,
            None => next.entry(key.to_owned()).or_default(),
        };
        let chosen = candidates.get(*turn % candidates.len()).copied();
        *turn = turn.wrapping_add(1);
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::{Balancer, RoundRobin};
    use crate::config::Endpoint;

    fn endpoint(last: u8) -> Endpoint {
        Endpoint {
            addr: format!("10.0.0.{last}:80").parse().expect("valid"),
            workload: None,
            node: None,
            local: true,
        }
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn_per_service_port() {
        let (a, b, c) = (endpoint(1), endpoint(2), endpoint(3));
        let rr = RoundRobin::default();
        let picks: Vec<_> = (0..6)
            .map(|_| rr.pick("web:80", &[&a, &b, &c]).expect("some").addr)
            .collect();
        assert_eq!(picks, [a.addr, b.addr, c.addr, a.addr, b.addr, c.addr]);
        // Another service port has its own turn.
        assert_eq!(rr.pick("db:5432", &[&a, &b]).expect("some").addr, a.addr);
        assert!(rr.pick("empty:1", &[]).is_none());
    }
}
