//! Rate limits per client and per class (governor): `[rate_limits]` in the
//! config file gives each class a rate per client per second (0 or absent:
//! none). A client is its auth user when its token is one this gateway saw
//! handed out (Authenticate goes through it), else its peer IP address: a
//! user has one budget over all their connections and addresses, and
//! authenticating again does not give a new one. Over its limit a client
//! gets etcd's `etcdserver: too many requests` (`RESOURCE_EXHAUSTED`),
//! which clientv3 does not retry.

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

/// Whom a limit counts against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Client {
    User(String),
    Ip(IpAddr),
}

impl Client {
    /// The user when known, else the peer address.
    pub fn of(user: Option<String>, conn: Option<SocketAddr>) -> Option<Self> {
        user.map(Client::User).or(conn.map(|c| Client::Ip(c.ip())))
    }
}

/// The limiters, one per limited class.
pub struct Limiter {
    classes: [(LimitedClass, Option<DefaultKeyedRateLimiter<Client>>); 4],
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
    pub fn admit(&self, class: Class, client: Option<Client>) -> Result<(), Status> {
        let (Some(limited), Some(client)) = (of(class), client) else { return Ok(()) };
        let limiter = self.classes.iter().find(|(c, _)| *c == limited).and_then(|(_, l)| l.as_ref());
        match limiter {
            Some(l) if l.check_key(&client).is_err() => {
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
        let a = Client::of(None, "127.0.0.1:1000".parse().ok());
        let b = Client::of(None, "127.0.0.2:1000".parse().ok());
        let alice = |port: u16| Client::of(Some("alice".into()), format!("127.0.0.{port}:1000").parse().ok());
        assert!(limiter.admit(Class::Write, a.clone()).is_ok());
        assert!(limiter.admit(Class::Write, a.clone()).is_ok());
        let refused = limiter.admit(Class::Write, a.clone()).unwrap_err();
        assert_eq!(
            (refused.code(), refused.message()),
            (tonic::Code::ResourceExhausted, "etcdserver: too many requests")
        );
        assert!(limiter.admit(Class::Write, b).is_ok(), "another client has its own budget");
        assert!(limiter.admit(Class::Read(Consistency::Linearizable), a).is_ok(), "reads are not limited here");
        // A user's budget is theirs from any address, and apart from the address's.
        assert!(limiter.admit(Class::Write, alice(1)).is_ok());
        assert!(limiter.admit(Class::Write, alice(2)).is_ok());
        assert!(limiter.admit(Class::Write, alice(3)).is_err(), "the same user from a third address");
    }
}
