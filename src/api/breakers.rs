//! `arbiter.v1.Breakers`: shared circuit breakers. Each call is decided in
//! memory by the member that decides the name's slot (`node/breakers.rs`),
//! as a rate-limit check is; `Watch` streams phase changes.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::authz::{authorize, authorized};
use super::{convert, error, watch_stream, Shared};
use crate::engine::{Breaker, BreakerDef, CallOutcome, Phase};
use crate::limits::breakers::Thresholds;
use crate::node::{BreakerAction, BreakerAnswer, BreakerCall, Change};
use crate::proto::breakers_server::Breakers;
use crate::proto::{
    breaker_event, BreakerAllowRequest, BreakerAllowResponse, BreakerConfig, BreakerEvent,
    BreakerPhase, BreakerReportRequest, BreakerReportResponse, BreakerState, GetBreakerRequest,
    WatchBreakerRequest,
};

pub struct BreakersService(pub Shared);

fn phase(p: Phase) -> i32 {
    (match p {
        Phase::Closed => BreakerPhase::Closed,
        Phase::Open => BreakerPhase::Open,
        Phase::HalfOpen => BreakerPhase::HalfOpen,
    }) as i32
}

fn config_of(def: &BreakerDef) -> BreakerConfig {
    BreakerConfig {
        window_ms: def.window_ms,
        min_calls: def.min_calls,
        failure_percent: def.failure_percent,
        open_ms: def.open_ms,
        probes: def.probes,
        probes_to_close: def.probes_to_close,
        probe_ttl_ms: def.probe_ttl_ms,
    }
}

/// A breaker's state as an answer: `def` the thresholds judged by (none
/// for a watch, which has no call's thresholds).
fn state(name: &str, b: Option<Breaker>, def: Option<&BreakerDef>, now_ms: u64) -> BreakerState {
    let b = b.unwrap_or_default();
    let now = now_ms.max(b.seen_ms);
    let phase_now = b.phase_at(now);
    let retry_after_ms = match phase_now {
        Phase::Open => b.open_until_ms.saturating_sub(now),
        Phase::HalfOpen if def.is_some_and(|d| b.probes.len() >= d.probes as usize) => b
            .probes
            .iter()
            .map(|p| p.until_ms.saturating_sub(now))
            .min()
            .unwrap_or(0),
        _ => 0,
    };
    let live = |p: &&crate::engine::breakers::Probe| p.until_ms > now;
    BreakerState {
        name: name.to_owned(),
        phase: phase(phase_now),
        retry_after_ms,
        calls: b.calls[1],
        failures: b.failures[1],
        previous_calls: b.calls[0],
        previous_failures: b.failures[0],
        probes_out: b.probes.iter().filter(live).count() as u32,
        probe_successes: b.probe_successes,
        config: def.map(config_of),
    }
}

impl BreakersService {
    /// The thresholds of a call on `name`: each the call sets, else the
    /// limits files', else the default; within their bounds.
    fn def(&self, name: &str, config: Option<BreakerConfig>) -> Result<BreakerDef, Status> {
        let c = config.unwrap_or_default();
        let set = |v: u64| (v != 0).then_some(v);
        let set32 = |v: u32| (v != 0).then_some(v);
        let call = Thresholds {
            window_ms: set(c.window_ms),
            min_calls: set32(c.min_calls),
            failure_percent: set32(c.failure_percent),
            open_ms: set(c.open_ms),
            probes: set32(c.probes),
            probes_to_close: set32(c.probes_to_close),
            probe_ttl_ms: set(c.probe_ttl_ms),
        };
        let limits = self.0.limits.current();
        let file = limits.breakers.get(name).copied().unwrap_or_default();
        let def = call.over(file.over(BreakerDef::default()));
        convert::breaker_def(&def, "config")?;
        Ok(def)
    }

    /// Validates and sends one call; counts it by what it asked.
    async fn call(
        &self,
        caller: &crate::security::Caller,
        name: String,
        config: Option<BreakerConfig>,
        action: BreakerAction,
    ) -> Result<(BreakerAnswer, BreakerDef), Status> {
        convert::key(&name, || "name".into())?;
        let def = self.def(&name, config)?;
        let call = BreakerCall {
            name,
            def,
            action,
            principal: caller.name().to_owned(),
            quota: caller.limit_key_quota(&self.0.bounds.caps),
        };
        let answer = self
            .0
            .node
            .breaker(authorized(caller, call)?)
            .await
            .map_err(error::node_status)?;
        Ok((answer, def))
    }
}

#[tonic::async_trait]
impl Breakers for BreakersService {
    async fn allow(
        &self,
        request: Request<BreakerAllowRequest>,
    ) -> Result<Response<BreakerAllowResponse>, Status> {
        let caller = self.0.caller(&request)?;
        let r = request.into_inner();
        let (answer, _) = self
            .call(&caller, r.name, r.config, BreakerAction::Allow)
            .await?;
        let v = answer
            .verdict
            .ok_or_else(|| Status::internal("no verdict"))?;
        let answer = match (v.phase, v.allowed) {
            (Phase::Closed, _) => "closed",
            (Phase::Open, _) => "open",
            (Phase::HalfOpen, true) => "probe",
            (Phase::HalfOpen, false) => "no_probe",
        };
        metrics::counter!("arbiter_breaker_allow_total", "answer" => answer).increment(1);
        Ok(Response::new(BreakerAllowResponse {
            phase: phase(v.phase),
            allowed: v.allowed,
            probe_token: v.probe_token,
            retry_after_ms: v.retry_after_ms,
        }))
    }

    async fn report(
        &self,
        request: Request<BreakerReportRequest>,
    ) -> Result<Response<BreakerReportResponse>, Status> {
        let caller = self.0.caller(&request)?;
        let r = request.into_inner();
        let outcome = match crate::proto::CallOutcome::try_from(r.outcome) {
            Ok(crate::proto::CallOutcome::Success) => CallOutcome::Success,
            Ok(crate::proto::CallOutcome::Failure) => CallOutcome::Failure,
            Ok(crate::proto::CallOutcome::Timeout) => CallOutcome::Timeout,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "outcome: must be SUCCESS, FAILURE or TIMEOUT (0 to 2), got {}",
                    r.outcome
                )))
            }
        };
        let action = BreakerAction::Report {
            outcome,
            probe_token: r.probe_token,
        };
        let (answer, _) = self.call(&caller, r.name, r.config, action).await?;
        let reported = answer
            .reported
            .ok_or_else(|| Status::internal("no report"))?;
        let label = match (reported.counted, outcome) {
            (false, _) => "ignored",
            (true, CallOutcome::Success) => "success",
            (true, CallOutcome::Failure) => "failure",
            (true, CallOutcome::Timeout) => "timeout",
        };
        metrics::counter!("arbiter_breaker_reports_total", "outcome" => label).increment(1);
        Ok(Response::new(BreakerReportResponse {
            phase: phase(reported.phase),
            counted: reported.counted,
        }))
    }

    async fn get(
        &self,
        request: Request<GetBreakerRequest>,
    ) -> Result<Response<BreakerState>, Status> {
        let caller = self.0.caller(&request)?;
        let r = request.into_inner();
        let name = r.name.clone();
        let (answer, def) = self
            .call(&caller, r.name, r.config, BreakerAction::Get)
            .await?;
        Ok(Response::new(state(
            &name,
            answer.breaker,
            Some(&def),
            answer.now_ms,
        )))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<BreakerEvent, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchBreakerRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.0.caller(&request)?;
        let name = request.into_inner().name;
        convert::key(&name, || "name".into())?;
        let probe = BreakerCall {
            name: name.clone(),
            def: BreakerDef::default(),
            action: BreakerAction::Get,
            principal: caller.name().to_owned(),
            quota: None,
        };
        authorize(&caller, &probe)?;
        let node = self.0.node.clone();
        let quota = caller.watch_quota(&self.0.bounds.caps);
        let watch = node
            .watch_breaker(&name, caller.name(), quota)
            .map_err(error::node_status)?;
        let current = |name: String| {
            move |b: Option<Breaker>, now: u64| BreakerEvent {
                kind: breaker_event::Kind::Current as i32,
                state: Some(state(&name, b, None, now)),
            }
        };
        let feed = watch_stream::Feed {
            what: "breaker",
            first: current(name.clone()),
            change: |change, now| match change {
                Change::Breaker(c) => Some(BreakerEvent {
                    kind: breaker_event::Kind::Changed as i32,
                    state: Some(state(&c.name, Some(c.breaker), None, now)),
                }),
                _ => None,
            },
            current: |node: &crate::node::Node, name: &str| {
                let (b, now) = node.breaker_local(name);
                BreakerEvent {
                    kind: breaker_event::Kind::Current as i32,
                    state: Some(state(name, b, None, now)),
                }
            },
        };
        let auth = self.0.auth.clone();
        let stream = watch_stream::serve(node, auth, caller, name, watch, feed);
        Ok(Response::new(Box::pin(stream)))
    }
}
