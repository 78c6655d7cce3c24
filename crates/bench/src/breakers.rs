//! The breaker workload.

use super::*;

/// Breakers.Allow on a name drawn from --keys. Each worker first makes its
/// share of the breakers (a success report each, not measured), so every
/// Allow finds a closed breaker in the table.
pub(super) async fn breaker_worker(
    args: &Args,
    run: &Run,
    channel: Channel,
    w: usize,
    rng: &mut Rng,
) -> Result<Tally, String> {
    let mut client = BreakersClient::new(channel);
    let name = |i: u64| padded(format!("bench:breaker:{i}"), args.key_bytes);
    for i in (w as u64..args.keys).step_by(args.inflight.max(1)) {
        client
            .report(pb::BreakerReportRequest {
                name: name(i),
                outcome: pb::CallOutcome::Success as i32,
                probe_token: 0,
                config: None,
            })
            .await
            .map_err(|e| format!("making breaker {i}: {e}"))?;
    }
    let mut t = Tally::new();
    while let Some(measured) = run.admit() {
        let sent = Instant::now();
        let answer = client
            .allow(pb::BreakerAllowRequest {
                name: name(rng.below(args.keys)),
                config: None,
            })
            .await;
        record(&mut t, measured, sent);
        match answer {
            Ok(a) if measured => {
                t.decisions += 1;
                t.allowed += u64::from(a.into_inner().allowed);
            }
            Ok(_) => {}
            Err(_) => t.errors += u64::from(measured),
        }
    }
    Ok(t)
}
