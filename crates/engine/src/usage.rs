//! What each principal holds, for its quotas: kept beside a table, changed
//! wherever the table gains or loses an entry, and rebuilt after a restore.

use std::collections::HashMap;

use crate::EngineError;

/// A count per principal ("" is never counted: nothing without
/// authentication has a quota). Only principals holding something are
/// kept, so it is bounded by the table it counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage(HashMap<String, u64>);

impl Usage {
    pub(crate) fn of(&self, principal: &str) -> u64 {
        self.0.get(principal).copied().unwrap_or(0)
    }

    pub(crate) fn add(&mut self, principal: &str, n: u64) {
        if principal.is_empty() || n == 0 {
            return;
        }
        match self.0.get_mut(principal) {
            Some(c) => *c = c.saturating_add(n),
            None => {
                self.0.insert(principal.to_owned(), n);
            }
        }
    }

    pub(crate) fn sub(&mut self, principal: &str, n: u64) {
        if let Some(c) = self.0.get_mut(principal) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.0.remove(principal);
            }
        }
    }

    /// `OverQuota` if `principal` holding `extra` more would pass `quota`
    /// (`None`: no quota).
    pub(crate) fn check(
        &self,
        principal: &str,
        extra: u64,
        quota: Option<u64>,
        what: &'static str,
    ) -> Result<(), EngineError> {
        match quota {
            Some(quota) if !principal.is_empty() && self.of(principal) + extra > quota => {
                Err(EngineError::OverQuota {
                    principal: principal.to_owned(),
                    what: what.into(),
                    quota,
                })
            }
            _ => Ok(()),
        }
    }
}
