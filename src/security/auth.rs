//! Principals and namespaces from `--auth-file`: who a caller is (a client
//! certificate name or a bearer token) and which keys it may use.
//!
//! ```yaml
//! principals:
//!   - name: alice
//!     certificate: alice        # the client certificate's CN, or a DNS/URI SAN
//!     namespaces: ["a/"]        # key prefixes it may use; "*" = all
//!   - name: ops
//!     certificate: ops
//!     admin: true               # may add and remove members
//!   - name: ci
//!     token_sha256: "<hex>"     # SHA-256 of a bearer token
//!     namespaces: ["ci/"]
//!     quota: {leases: 100, watchers: unlimited}
//! default_quota: {records: 10000}   # for principals without their own
//! ```
//!
//! A quota bounds what one principal holds: leases, idempotency records
//! and their bytes, rate-limit keys and watch streams. A bound not set by
//! the principal's `quota` nor by `default_quota` is half of the server's
//! global cap for an ordinary principal (so no one tenant can use a
//! resource up alone) and unlimited for an admin.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use tonic::Status;

use super::reload::Reloading;
use super::tls::ConnInfo;

/// gRPC metadata a follower forwards a call with: the principal of the
/// caller it authenticated, so the leader authorises the call as that
/// caller.
pub const PRINCIPAL_HEADER: &str = "x-arbiter-principal";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    principals: Vec<Entry>,
    #[serde(default)]
    default_quota: QuotaEntry,
}

/// A quota as written: a number or `unlimited`.
#[derive(Clone, Deserialize)]
#[serde(untagged)]
enum Bound {
    Count(u64),
    Word(String),
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaEntry {
    leases: Option<Bound>,
    records: Option<Bound>,
    record_bytes: Option<Bound>,
    limit_keys: Option<Bound>,
    watchers: Option<Bound>,
}

/// One of a principal's quotas, as resolved from the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    At(u64),
    Unlimited,
    /// Not set: half of the global cap.
    HalfOfCap,
}

impl Limit {
    /// The bound against a global cap of `cap` (`None`: none).
    pub fn of(self, cap: usize) -> Option<u64> {
        match self {
            Limit::At(n) => Some(n),
            Limit::Unlimited => None,
            Limit::HalfOfCap => Some((cap as u64).div_ceil(2)),
        }
    }
}

/// A principal's quotas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    pub leases: Limit,
    pub records: Limit,
    pub record_bytes: Limit,
    pub limit_keys: Limit,
    pub watchers: Limit,
}

impl Quotas {
    pub const UNLIMITED: Quotas = Quotas {
        leases: Limit::Unlimited,
        records: Limit::Unlimited,
        record_bytes: Limit::Unlimited,
        limit_keys: Limit::Unlimited,
        watchers: Limit::Unlimited,
    };

    /// `own` over `defaults` over the built-in default (`fallback`).
    fn resolve(own: &QuotaEntry, defaults: &QuotaEntry, fallback: Limit) -> Result<Quotas, String> {
        let one = |name: &str, a: &Option<Bound>, b: &Option<Bound>| -> Result<Limit, String> {
            match a.as_ref().or(b.as_ref()) {
                None => Ok(fallback),
                Some(Bound::Count(n)) => Ok(Limit::At(*n)),
                Some(Bound::Word(w)) if w == "unlimited" => Ok(Limit::Unlimited),
                Some(Bound::Word(w)) => Err(format!(
                    "{name} must be a number or \"unlimited\", got {w:?}"
                )),
            }
        };
        Ok(Quotas {
            leases: one("leases", &own.leases, &defaults.leases)?,
            records: one("records", &own.records, &defaults.records)?,
            record_bytes: one("record_bytes", &own.record_bytes, &defaults.record_bytes)?,
            limit_keys: one("limit_keys", &own.limit_keys, &defaults.limit_keys)?,
            watchers: one("watchers", &own.watchers, &defaults.watchers)?,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    #[serde(default)]
    certificate: Option<String>,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    quota: QuotaEntry,
}

/// A known caller.
#[derive(Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    /// Key prefixes it may use (`"*"` is every key).
    pub namespaces: Vec<String>,
    /// May add and remove members.
    pub admin: bool,
    pub quotas: Quotas,
}

/// What ends a key segment: a namespace ending in one covers every key
/// that starts with it; any other namespace covers the key it names and
/// the keys under it (it followed by a separator), so `a` never covers
/// `admin/...`.
pub const SEPARATORS: [char; 3] = ['/', ':', '.'];

impl Principal {
    pub fn may_use(&self, key: &str) -> bool {
        self.namespaces.iter().any(|ns| covers(ns, key))
    }
}

/// Whether namespace `ns` covers `key` (see [`SEPARATORS`]).
pub fn covers(ns: &str, key: &str) -> bool {
    if ns == "*" {
        return true;
    }
    let Some(rest) = key.strip_prefix(ns) else {
        return false;
    };
    ns.ends_with(SEPARATORS) || rest.is_empty() || rest.starts_with(SEPARATORS)
}

/// The loaded auth file.
#[derive(Debug, Default)]
pub struct Rules {
    by_cert: HashMap<String, Arc<Principal>>,
    by_token: HashMap<[u8; 32], Arc<Principal>>,
    by_name: HashMap<String, Arc<Principal>>,
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn sha256(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Rules {
    /// Parses and checks an auth file's text.
    pub fn parse(text: &str) -> Result<Rules, String> {
        let file: File = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let mut rules = Rules::default();
        Quotas::resolve(
            &file.default_quota,
            &QuotaEntry::default(),
            Limit::HalfOfCap,
        )
        .map_err(|m| format!("default_quota.{m}"))?;
        for (i, e) in file.principals.into_iter().enumerate() {
            let at = format!("principals[{i}] ({:?})", e.name);
            if e.name.is_empty() {
                return Err(format!("principals[{i}]: name is empty"));
            }
            if e.certificate.is_none() && e.token_sha256.is_none() {
                return Err(format!("{at}: needs a certificate or a token_sha256"));
            }
            if e.namespaces.iter().any(String::is_empty) {
                return Err(format!(
                    "{at}: an empty namespace would match every key; write \"*\" for that"
                ));
            }
            let fallback = if e.admin {
                Limit::Unlimited
            } else {
                Limit::HalfOfCap
            };
            let quotas = Quotas::resolve(&e.quota, &file.default_quota, fallback)
                .map_err(|m| format!("{at}: quota.{m}"))?;
            let p = Arc::new(Principal {
                name: e.name.clone(),
                namespaces: e.namespaces,
                admin: e.admin,
                quotas,
            });
            if rules.by_name.insert(e.name, p.clone()).is_some() {
                return Err(format!("{at}: the name is used twice"));
            }
            if let Some(c) = e.certificate {
                if rules.by_cert.insert(c.clone(), p.clone()).is_some() {
                    return Err(format!("{at}: certificate {c:?} is named twice"));
                }
            }
            if let Some(t) = e.token_sha256 {
                let h = hex32(&t).ok_or_else(|| {
                    format!("{at}: token_sha256 must be 64 hex digits (a SHA-256)")
                })?;
                if rules.by_token.insert(h, p).is_some() {
                    return Err(format!("{at}: the token is used twice"));
                }
            }
        }
        Ok(rules)
    }

    pub fn principal(&self, name: &str) -> Option<&Arc<Principal>> {
        self.by_name.get(name)
    }

    /// The principal a call comes from: the first name of its client
    /// certificate that the file knows, else its bearer token's.
    pub fn identify(
        &self,
        conn: Option<&ConnInfo>,
        authorization: Option<&str>,
    ) -> Option<Arc<Principal>> {
        if let Some(conn) = conn {
            if let Some(p) = conn.cert_names.iter().find_map(|n| self.by_cert.get(n)) {
                return Some(p.clone());
            }
        }
        let token = authorization?.trim();
        let (scheme, token) = token.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.by_token.get(&sha256(token.trim())).cloned()
    }
}

/// The auth file, re-read when it changes.
pub type Auth = Arc<Reloading<Rules>>;

/// The principal a call was identified as before its handler ran (a
/// request extension set by the client port's gate), so that it is looked
/// up once per call.
#[derive(Clone, Debug)]
pub struct Identified(pub Arc<Principal>);

/// What a caller the auth file does not know is told.
pub const UNKNOWN_CALLER: &str = "unknown caller: present a client certificate or an \
     `authorization: Bearer` token named in the server's auth file";

/// Loads `path` (an error stops the server) and watches it.
pub fn watch(path: PathBuf) -> Result<Auth, String> {
    let p = path.clone();
    Reloading::start("auth file", vec![path], move || {
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Rules::parse(&text).map_err(|e| format!("{}: {e}", p.display()))
    })
}

/// Who is calling, as far as authorisation goes.
#[derive(Clone, Debug)]
pub enum Caller {
    /// Authentication is off: every call may do anything.
    Anyone,
    Principal(Arc<Principal>),
}

impl Caller {
    /// Authenticates a client call (`UNAUTHENTICATED` if the caller is
    /// not known).
    pub fn of<T>(auth: Option<&Auth>, request: &tonic::Request<T>) -> Result<Caller, Status> {
        let Some(auth) = auth else {
            return Ok(Caller::Anyone);
        };
        // Identified already by the client port's gate (`api::layer`).
        if let Some(Identified(p)) = request.extensions().get::<Identified>() {
            return Ok(Caller::Principal(p.clone()));
        }
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        auth.current()
            .identify(request.extensions().get::<ConnInfo>(), authorization)
            .map(Caller::Principal)
            .ok_or_else(|| {
                refused(UNIDENTIFIED, "unauthenticated");
                Status::unauthenticated(UNKNOWN_CALLER)
            })
    }

    /// The caller a follower forwarded a call for (by name, in
    /// [`PRINCIPAL_HEADER`]).
    pub fn forwarded(auth: Option<&Auth>, name: Option<&str>) -> Result<Caller, Status> {
        let Some(auth) = auth else {
            return Ok(Caller::Anyone);
        };
        let name = name.ok_or_else(|| {
            Status::unauthenticated(
                "a call was forwarded without its caller's principal; \
                 every member needs the same --auth-file",
            )
        })?;
        auth.current()
            .principal(name)
            .cloned()
            .map(Caller::Principal)
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "forwarded principal {name:?} is not in the auth file"
                ))
            })
    }

    /// The principal's name ("" for [`Caller::Anyone`]).
    pub fn name(&self) -> &str {
        match self {
            Caller::Anyone => "",
            Caller::Principal(p) => &p.name,
        }
    }

    /// `PERMISSION_DENIED` unless the caller may use `key` (`what` names
    /// the field: "key", "lease", "idempotency key").
    pub fn may_use(&self, what: &str, key: &str) -> Result<(), Status> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::Principal(p) if p.may_use(key) => Ok(()),
            Caller::Principal(p) => {
                refused(&p.name, "permission_denied");
                Err(Status::permission_denied(format!(
                    "principal {:?} may not use {what} {key:?}: it is outside its namespaces {:?}",
                    p.name, p.namespaces
                )))
            }
        }
    }

    /// Whether the auth file as it stands now still lets this caller use
    /// `key`: a principal removed at a reload gets `UNAUTHENTICATED`, one
    /// whose namespaces no longer cover it `PERMISSION_DENIED` (long-lived
    /// streams check this as they go).
    pub fn still_allowed(&self, auth: Option<&Auth>, what: &str, key: &str) -> Result<(), Status> {
        let (Caller::Principal(p), Some(auth)) = (self, auth) else {
            return Ok(());
        };
        let rules = auth.current();
        let Some(now) = rules.principal(&p.name) else {
            refused(&p.name, "unauthenticated");
            return Err(Status::unauthenticated(format!(
                "principal {:?} was removed from the auth file",
                p.name
            )));
        };
        Caller::Principal(now.clone()).may_use(what, key)
    }

    /// The caller's bound on one resource (`pick` chooses it) against a
    /// global cap of `cap`; `None`: no quota (and none without
    /// authentication).
    pub fn quota(&self, pick: impl Fn(&Quotas) -> Limit, cap: usize) -> Option<u64> {
        match self {
            Caller::Anyone => None,
            Caller::Principal(p) => pick(&p.quotas).of(cap),
        }
    }

    /// Whether the caller is an admin principal (not merely unauthenticated).
    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Principal(p) if p.admin)
    }

    /// `PERMISSION_DENIED` unless the caller is an admin.
    pub fn admin(&self, call: &str) -> Result<(), Status> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::Principal(p) if p.admin => Ok(()),
            Caller::Principal(p) => {
                refused(&p.name, "permission_denied");
                Err(Status::permission_denied(format!(
                    "{call} needs an admin principal; {:?} is not one",
                    p.name
                )))
            }
        }
    }
}

/// The `principal` label of a refusal whose caller the auth file does not
/// know.
pub const UNIDENTIFIED: &str = "(unidentified)";

/// Counts a call refused to `principal` (`arbiter_auth_refusals_total`):
/// labelled by the auth file's principals only, so the series are as few
/// as they are.
pub fn refused(principal: &str, code: &'static str) {
    metrics::counter!(
        "arbiter_auth_refusals_total",
        "principal" => principal.to_owned(),
        "code" => code
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_cover_whole_segments() {
        assert!(covers("a/", "a/x") && covers("a", "a") && covers("a", "a/x"));
        assert!(covers("a", "a:x") && covers("a", "a.x") && covers("tenant:", "tenant:1"));
        assert!(!covers("a", "admin/x") && !covers("a", "ab") && !covers("a/", "a"));
        assert!(!covers("tenant:", "tenant2:1") && covers("*", "anything"));
    }

    const FILE: &str = r#"
principals:
  - name: alice
    certificate: alice
    namespaces: ["a/"]
  - name: ops
    certificate: spiffe://cluster/ops
    admin: true
  - name: ci
    token_sha256: "TOKEN"
    namespaces: ["ci/", "shared/"]
"#;

    fn rules() -> Rules {
        let hash: String = sha256("s3cret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Rules::parse(&FILE.replace("TOKEN", &hash)).unwrap()
    }

    fn conn(names: &[&str]) -> ConnInfo {
        ConnInfo {
            remote: None,
            cert_names: names.iter().map(|s| s.to_string()).collect(),
            cert_hosts: std::sync::Arc::from([]),
        }
    }

    #[test]
    fn callers_are_known_by_certificate_name_or_token() {
        let r = rules();
        let name = |p: Option<Arc<Principal>>| p.map(|p| p.name.clone());
        assert_eq!(
            name(r.identify(Some(&conn(&["x", "alice"])), None)).as_deref(),
            Some("alice")
        );
        assert_eq!(
            name(r.identify(Some(&conn(&["spiffe://cluster/ops"])), None)).as_deref(),
            Some("ops")
        );
        assert_eq!(
            name(r.identify(None, Some("Bearer s3cret"))).as_deref(),
            Some("ci")
        );
        assert_eq!(
            name(r.identify(None, Some("bearer  s3cret "))).as_deref(),
            Some("ci")
        );
        assert_eq!(name(r.identify(None, Some("Bearer wrong"))), None);
        assert_eq!(name(r.identify(None, Some("Basic s3cret"))), None);
        assert_eq!(name(r.identify(Some(&conn(&["bob"])), None)), None);
    }

    #[test]
    fn namespaces_are_prefixes_and_star_is_all() {
        let r = rules();
        let alice = r.principal("alice").unwrap();
        assert!(alice.may_use("a/x") && !alice.may_use("b/x") && !alice.may_use("a"));
        let ops = Principal {
            name: "o".into(),
            namespaces: vec!["*".into()],
            admin: false,
            quotas: Quotas::UNLIMITED,
        };
        assert!(ops.may_use("anything"));
        // ops has no namespaces: admin only.
        assert!(!r.principal("ops").unwrap().may_use("a/x"));
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let bad = |text: &str, want: &str| {
            let e = Rules::parse(text).expect_err("refused");
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        };
        bad(
            "principals:\n  - name: a\n",
            "needs a certificate or a token_sha256",
        );
        bad(
            "principals:\n  - name: a\n    token_sha256: abc\n",
            "64 hex digits",
        );
        bad(
            "principals:\n  - name: a\n    certificate: a\n  - name: a\n    certificate: b\n",
            "used twice",
        );
        bad(
            "principals:\n  - name: a\n    certificate: c\n  - name: b\n    certificate: c\n",
            "named twice",
        );
        bad(
            "principals:\n  - name: a\n    certificat: a\n",
            "unknown field",
        );
        bad(
            "principals:\n  - name: a\n    certificate: a\n    namespaces: [\"\"]\n",
            "empty namespace",
        );
        bad(
            "principals:\n  - name: a\n    certificate: a\n    quota: {leases: lots}\n",
            "principals[0] (\"a\"): quota.leases must be a number or \"unlimited\", got \"lots\"",
        );
        bad(
            "default_quota: {watchers: some}\nprincipals: []\n",
            "default_quota.watchers must be a number",
        );
        bad(
            "principals:\n  - name: a\n    certificate: a\n    quota: {lease: 1}\n",
            "unknown field",
        );
    }

    /// A principal's own quota, then `default_quota`, then the built-in
    /// default: half of the global cap, unlimited for admins.
    #[test]
    fn quotas_come_from_the_principal_then_the_default_then_half_the_cap() {
        let r = Rules::parse(
            "default_quota: {leases: 7, records: unlimited}
principals:
  - name: a
    certificate: a
    quota: {leases: 2, watchers: unlimited}
  - name: b
    certificate: b
  - name: ops
    certificate: ops
    admin: true
",
        )
        .unwrap();
        let q = |n: &str| r.principal(n).unwrap().quotas;
        assert_eq!(q("a").leases, Limit::At(2));
        assert_eq!(q("a").watchers, Limit::Unlimited);
        assert_eq!(q("a").records, Limit::Unlimited);
        assert_eq!(q("b").leases, Limit::At(7));
        assert_eq!(q("b").limit_keys, Limit::HalfOfCap);
        assert_eq!(q("b").limit_keys.of(5), Some(3));
        assert_eq!(q("ops").watchers, Limit::Unlimited);
        assert_eq!(q("ops").leases, Limit::At(7));
        assert_eq!(Limit::Unlimited.of(5), None);
    }
}
