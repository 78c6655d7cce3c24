//! Who may do what: each operation declares once what it touches
//! ([`Scoped`]), and [`authorize`] decides from that alone, for a client's
//! call (in its handler) and for a call a follower forwarded (on the
//! leader) alike, so the two paths cannot drift apart.

use tonic::Status;

use crate::engine::{
    Abort, Acquire, Begin, Complete, LimitCheck, Release, Renew, SemAcquire, SemRelease, SemRenew,
};
use crate::node::{
    with_call, AddMember, Call, CheckLimits, GetLease, GetRecord, MemberMetrics, Phase, Rebalance,
    RemoveMember, SpanningCheck,
};
use crate::security::Caller;

/// The keys an operation uses.
pub enum Keys<'a> {
    One(&'a str),
    Checks(&'a [LimitCheck]),
    /// Keys derived from a request (Envoy's descriptors).
    Derived(&'a [String]),
}

/// What an operation touches.
pub enum Scope<'a> {
    /// Keys of one kind (`what` names it in refusals: "lease",
    /// "idempotency key", "key"), each of which must lie in the caller's
    /// namespaces. `acts_as`: the principal the operation is recorded
    /// under (a lease's or a record's owner), which must be the caller.
    Keys {
        what: &'static str,
        keys: Keys<'a>,
        acts_as: Option<&'a str>,
    },
    /// A membership change (`call` names it): admins only.
    Admin(&'static str),
}

/// An operation's [`Scope`], declared next to nothing else but used by
/// every path that authorises it.
pub trait Scoped {
    fn scope(&self) -> Scope<'_>;
}

fn keys<'a>(what: &'static str, key: &'a str, acts_as: Option<&'a str>) -> Scope<'a> {
    Scope::Keys {
        what,
        keys: Keys::One(key),
        acts_as,
    }
}

impl Scoped for Acquire {
    fn scope(&self) -> Scope<'_> {
        keys("lease", &self.name, Some(&self.principal))
    }
}

impl Scoped for Renew {
    fn scope(&self) -> Scope<'_> {
        keys("lease", &self.name, Some(&self.principal))
    }
}

impl Scoped for Release {
    fn scope(&self) -> Scope<'_> {
        keys("lease", &self.name, Some(&self.principal))
    }
}

impl Scoped for GetLease {
    fn scope(&self) -> Scope<'_> {
        keys("lease", &self.name, None)
    }
}

impl Scoped for SemAcquire {
    fn scope(&self) -> Scope<'_> {
        keys("semaphore", &self.name, Some(&self.principal))
    }
}

impl Scoped for SemRenew {
    fn scope(&self) -> Scope<'_> {
        keys("semaphore", &self.name, Some(&self.principal))
    }
}

impl Scoped for SemRelease {
    fn scope(&self) -> Scope<'_> {
        keys("semaphore", &self.name, Some(&self.principal))
    }
}

impl Scoped for crate::node::BreakerCall {
    fn scope(&self) -> Scope<'_> {
        keys("breaker", &self.name, None)
    }
}

impl Scoped for crate::node::GetSemaphore {
    fn scope(&self) -> Scope<'_> {
        keys("semaphore", &self.name, None)
    }
}

impl Scoped for Begin {
    fn scope(&self) -> Scope<'_> {
        keys("idempotency key", &self.key, Some(&self.principal))
    }
}

impl Scoped for Complete {
    fn scope(&self) -> Scope<'_> {
        keys("idempotency key", &self.key, Some(&self.principal))
    }
}

impl Scoped for Abort {
    fn scope(&self) -> Scope<'_> {
        keys("idempotency key", &self.key, Some(&self.principal))
    }
}

impl Scoped for GetRecord {
    fn scope(&self) -> Scope<'_> {
        keys("idempotency key", &self.key, None)
    }
}

impl Scoped for [LimitCheck] {
    fn scope(&self) -> Scope<'_> {
        Scope::Keys {
            what: "key",
            keys: Keys::Checks(self),
            acts_as: None,
        }
    }
}

/// The engine keys of named limits, as an Envoy request derives them.
impl Scoped for [String] {
    fn scope(&self) -> Scope<'_> {
        Scope::Keys {
            what: "key",
            keys: Keys::Derived(self),
            acts_as: None,
        }
    }
}

impl Scoped for CheckLimits {
    fn scope(&self) -> Scope<'_> {
        // The keys' owner is whoever the leader stamps (the caller).
        self.checks.scope()
    }
}

impl Scoped for SpanningCheck {
    fn scope(&self) -> Scope<'_> {
        match &self.phase {
            Phase::Reserve { checks, .. } => checks.scope(),
            // Only the principal that made the reservation may end it (the
            // owner compares them); no keys are named.
            Phase::Confirm | Phase::Release => <[LimitCheck]>::scope(&[]),
        }
    }
}

impl Scoped for AddMember {
    fn scope(&self) -> Scope<'_> {
        Scope::Admin("AddMember")
    }
}

impl Scoped for MemberMetrics {
    fn scope(&self) -> Scope<'_> {
        Scope::Admin("Metrics")
    }
}

impl Scoped for Rebalance {
    fn scope(&self) -> Scope<'_> {
        Scope::Admin("Rebalance")
    }
}

impl Scoped for RemoveMember {
    fn scope(&self) -> Scope<'_> {
        Scope::Admin("RemoveMember")
    }
}

impl Scoped for Call {
    fn scope(&self) -> Scope<'_> {
        with_call!(self, op => op.scope())
    }
}

/// Whether `caller` may run `op`: its keys in the caller's namespaces
/// (`PERMISSION_DENIED` naming the key and the namespaces), recorded under
/// the caller's own principal, and membership changes by admins only.
/// Without authentication everything passes.
pub fn authorize<S: Scoped + ?Sized>(caller: &Caller, op: &S) -> Result<(), Status> {
    if matches!(caller, Caller::Anyone) {
        return Ok(());
    }
    match op.scope() {
        Scope::Admin(call) => caller.admin(call),
        Scope::Keys {
            what,
            keys,
            acts_as,
        } => {
            if let Some(principal) = acts_as.filter(|p| *p != caller.name()) {
                crate::security::auth::refused(caller.name(), "permission_denied");
                return Err(Status::permission_denied(format!(
                    "a call for principal {principal:?} was made as {:?}",
                    caller.name()
                )));
            }
            match keys {
                Keys::One(key) => caller.may_use(what, key),
                Keys::Checks(checks) => {
                    checks.iter().try_for_each(|c| caller.may_use(what, &c.key))
                }
                Keys::Derived(keys) => keys.iter().try_for_each(|k| caller.may_use(what, k)),
            }
        }
    }
}

/// `op`, if `caller` may run it ([`authorize`]).
pub fn authorized<S: Scoped>(caller: &Caller, op: S) -> Result<S, Status> {
    authorize(caller, &op)?;
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::auth::Rules;

    fn caller(name: &str) -> Caller {
        let rules = Rules::parse(
            "principals:
  - name: alice
    certificate: alice
    namespaces: [\"a/\"]
  - name: ops
    certificate: ops
    admin: true
",
        )
        .unwrap();
        Caller::Principal(rules.principal(name).unwrap().clone())
    }

    fn acquire(name: &str, principal: &str) -> Acquire {
        Acquire {
            name: name.into(),
            holder: "h".into(),
            ttl_ms: 1,
            principal: principal.into(),
            quota: None,
        }
    }

    /// The same rules whether the operation comes typed (a handler) or
    /// as a forwarded `Call`.
    #[test]
    fn one_rule_for_handlers_and_forwarded_calls() {
        let alice = caller("alice");
        for (op, allowed) in [
            (acquire("a/x", "alice"), true),
            (acquire("b/x", "alice"), false),
            // Recorded under another principal: refused even in alice's
            // namespace.
            (acquire("a/x", "bob"), false),
        ] {
            assert_eq!(authorize(&alice, &op).is_ok(), allowed, "{op:?}");
            assert_eq!(authorize(&alice, &Call::Acquire(op)).is_ok(), allowed);
        }
        let add = AddMember {
            id: 4,
            peer_addr: "x:1".into(),
            force: false,
        };
        assert!(authorize(&alice, &add).is_err());
        assert!(authorize(&caller("ops"), &Call::AddMember(add)).is_ok());
        let checks = vec![
            LimitCheck {
                key: "a/k".into(),
                limit: crate::engine::LimitDef::FixedWindow {
                    limit: 1,
                    window_ms: 1000,
                },
                cost: 1,
                dry_run: false,
                max_delay_ms: 0,
            };
            2
        ];
        assert!(authorize(&alice, checks.as_slice()).is_ok());
        let mut outside = checks.clone();
        outside[1].key = "b/k".into();
        let e = authorize(&alice, outside.as_slice()).unwrap_err();
        assert!(e.message().contains("\"b/k\""), "{e:?}");
        assert!(authorize(&Caller::Anyone, outside.as_slice()).is_ok());
    }
}
