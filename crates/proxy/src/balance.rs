//! Choosing an endpoint of a service: per request for HTTP, per connection
//! for TCP. Istio's two common policies (a DestinationRule's
//! `trafficPolicy.loadBalancer.simple`): `LEAST_REQUEST`, Istio's default —
//! two endpoints drawn at random, the one with fewer requests in flight
//! wins (Envoy's "power of two choices") — `ROUND_ROBIN` and `RANDOM`.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How a service's endpoints share its traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LbPolicy {
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
}

impl LbPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            LbPolicy::LeastRequest => "LEAST_REQUEST",
            LbPolicy::RoundRobin => "ROUND_ROBIN",
            LbPolicy::Random => "RANDOM",
        }
    }
}

impl FromStr for LbPolicy {
    type Err = String;

    /// Istio's names. `LEAST_CONN` is Istio's deprecated name for
    /// `LEAST_REQUEST`; `UNSPECIFIED` is the default.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "UNSPECIFIED" | "LEAST_REQUEST" | "LEAST_CONN" => Ok(LbPolicy::LeastRequest),
            "ROUND_ROBIN" => Ok(LbPolicy::RoundRobin),
            "RANDOM" => Ok(LbPolicy::Random),
            other => Err(format!(
                "load balancer {other:?} is not supported: use LEAST_REQUEST, ROUND_ROBIN or RANDOM"
            )),
        }
    }
}

/// A set of endpoints and what is in flight at each.
pub struct Balancer<T> {
    policy: LbPolicy,
    slots: Vec<Slot<T>>,
    next: AtomicUsize,
}

struct Slot<T> {
    value: T,
    active: AtomicUsize,
}

impl<T> Balancer<T> {
    pub fn new(policy: LbPolicy, values: Vec<T>) -> Balancer<T> {
        Balancer {
            policy,
            slots: values
                .into_iter()
                .map(|value| Slot {
                    value,
                    active: AtomicUsize::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn policy(&self) -> LbPolicy {
        self.policy
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().map(|s| &s.value)
    }

    /// Chooses an endpoint; it counts as busy until the [`Picked`] is
    /// dropped. `None` when there is no endpoint.
    pub fn pick(self: &Arc<Self>) -> Option<Picked<T>> {
        let n = self.slots.len();
        let index = match (n, self.policy) {
            (0, _) => return None,
            (1, _) => 0,
            (_, LbPolicy::RoundRobin) => self.next.fetch_add(1, Ordering::Relaxed) % n,
            (_, LbPolicy::Random) => fastrand::usize(..n),
            (_, LbPolicy::LeastRequest) => {
                let a = fastrand::usize(..n);
                // A second, different endpoint.
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let load = |i: usize| self.slots[i].active.load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
        };
        self.slots[index].active.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            balancer: self.clone(),
            index,
        })
    }
}

/// One chosen endpoint, busy while this lives.
pub struct Picked<T> {
    balancer: Arc<Balancer<T>>,
    index: usize,
}

impl<T> std::ops::Deref for Picked<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.balancer.slots[self.index].value
    }
}

impl<T> Drop for Picked<T> {
    fn drop(&mut self) {
        self.balancer.slots[self.index]
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(balancer: &Arc<Balancer<usize>>, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; balancer.len()];
        for _ in 0..picks {
            counts[*balancer.pick().unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_takes_each_in_turn() {
        let balancer = Arc::new(Balancer::new(LbPolicy::RoundRobin, vec![0, 1, 2]));
        assert_eq!(counts(&balancer, 9), vec![3, 3, 3]);
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let balancer = Arc::new(Balancer::new(LbPolicy::LeastRequest, vec![0, 1]));
        // Endpoint 0 holds a request: with two endpoints both are always
        // drawn, so every new request goes to the idle one.
        let busy = loop {
            let p = balancer.pick().unwrap();
            if *p == 0 {
                break p;
            }
        };
        assert_eq!(counts(&balancer, 50), vec![0, 50]);
        drop(busy);
        // Idle again: both are chosen (at random, so each well above zero).
        let spread = counts(&balancer, 400);
        assert!(spread.iter().all(|c| *c > 100), "{spread:?}");
    }

    #[test]
    fn least_request_spreads_sequential_requests() {
        let balancer = Arc::new(Balancer::new(LbPolicy::LeastRequest, vec![0, 1, 2]));
        let spread = counts(&balancer, 900);
        assert!(spread.iter().all(|c| *c > 200), "{spread:?}");
    }

    #[test]
    fn nothing_to_pick_from_empty() {
        let balancer: Arc<Balancer<usize>> = Arc::new(Balancer::new(LbPolicy::default(), vec![]));
        assert!(balancer.pick().is_none());
    }

    #[test]
    fn istio_names_parse() {
        assert_eq!(
            "ROUND_ROBIN".parse::<LbPolicy>().unwrap(),
            LbPolicy::RoundRobin
        );
        assert_eq!(
            "LEAST_CONN".parse::<LbPolicy>().unwrap(),
            LbPolicy::LeastRequest
        );
        assert!("PASSTHROUGH".parse::<LbPolicy>().is_err());
    }
}
