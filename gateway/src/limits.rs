//! Rate limits per client and per class (governor): `[rate_limits]` in the
//! config file gives each class a rate per client per second (0 or absent:
//! none). A client is its peer IP address (the auth user, once auth
//! exists). Over its limit a client gets etcd's `etcdserver: too many
//! requests` (`RESOURCE_EXHAUSTED`), which clientv3 does not retry.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use tonic::Status;

use crate::route::{Class, Consistency};

/// Requests per second per client, by class.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    pub write: u32,
    pub read: u32,
    /// Watch streams opened.
    pub watch: u32,
    pub lease: u32,
}

/// The limiters, one per limited class.
pub struct Limiter {
    classes: [(LimitedClass, Option<DefaultKeyedRateLimiter<IpAddr>>); 4],
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LimitedClass {
    Write,
    Read,
    Watch,
    Lease,
}

fn of(class: Class) -> Option<LimitedClass> {
    match class {
        Class::Write => Some(LimitedClass::Write),
        Class::Read(Consistency::Linearizable | Consistency::Bounded { .. }) => Some(LimitedClass::Read),
        Class::Watch => Some(LimitedClass::Watch),
        Class::Lease => Some(LimitedClass::Lease),
        Class::Maintenance => None,
    }
}

impl Limiter {
    pub fn new(limits: &RateLimits) -> Self {
        let make = |per_second: u32| NonZeroU32::new(per_second).map(|n| RateLimiter::keyed(Quota::per_second(n)));
        Self {
            classes: [
                (LimitedClass::Write, make(limits.write)),
                (LimitedClass::Read, make(limits.read)),
                (LimitedClass::Watch, make(limits.watch)),
                (LimitedClass::Lease, make(limits.lease)),
            ],
        }
    }

    /// Admits one request of `class` from `client`, or refuses it.
    ///
    /// # Errors
    ///
    /// `RESOURCE_EXHAUSTED` "etcdserver: too many requests" over the limit.
    pub fn admit(&self, class: Class, client: Option<SocketAddr>) -> Result<(), Status> {
        let (Some(limited), Some(addr)) = (of(class), client) else { return Ok(()) };
        let limiter = self.classes.iter().find(|(c, _)| *c == limited).and_then(|(_, l)| l.as_ref());
        match limiter {
            Some(l) if l.check_key(&addr.ip()).is_err() => {
                Err(Status::resource_exhausted(meridian_wire::etcd::TOO_MANY_REQUESTS))
            }
            _ => Ok(()),
        }
    }

    /// Forgets clients that have not been seen in a while, every minute,
    /// so the limiters' memory follows the clients that are active.
    pub async fn run_cleanup(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            for (_, l) in self.classes.iter() {
                if let Some(l) = l {
                    l.retain_recent();
                    l.shrink_to_fit();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_and_class_has_its_own_budget() {
        let limiter = Limiter::new(&RateLimits { write: 2, ..Default::default() });
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:1000".parse().unwrap();
        assert!(limiter.admit(Class::Write, Some(a)).is_ok());
        assert!(limiter.admit(Class::Write, Some(a)).is_ok());
        let refused = limiter.admit(Class::Write, Some(a)).unwrap_err();
        assert_eq!(
            (refused.code(), refused.message()),
            (tonic::Code::ResourceExhausted, "etcdserver: too many requests")
        );
        assert!(limiter.admit(Class::Write, Some(b)).is_ok(), "another client has its own budget");
        assert!(limiter.admit(Class::Read(Consistency::Linearizable), Some(a)).is_ok(), "reads are not limited here");
    }
}
