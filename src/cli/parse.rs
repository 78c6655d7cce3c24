//! Parsing the CLI's durations and rates (`10s`, `100:5/250ms`).

use crate::proto as pb;

pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = if num.is_empty() {
        1
    } else {
        num.parse().map_err(|e| format!("{s:?}: {e}"))?
    };
    let scale = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?}: too large"))
}

pub fn parse_rate(s: &str) -> Result<(u64, u64), String> {
    let (n, d) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected AMOUNT/DURATION, e.g. 100/1m"))?;
    let n = n.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Ok((n, parse_duration_ms(d)?))
}

pub fn parse_token_bucket(s: &str) -> Result<pb::TokenBucket, String> {
    let (cap, rate) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected CAPACITY:TOKENS/INTERVAL, e.g. 10:1/s"))?;
    let (refill_tokens, refill_interval_ms) = parse_rate(rate)?;
    Ok(pb::TokenBucket {
        capacity: cap.parse().map_err(|e| format!("{s:?}: {e}"))?,
        refill_tokens,
        refill_interval_ms,
    })
}

pub fn parse_sliding(s: &str) -> Result<pb::SlidingWindow, String> {
    let (limit, window_ms) = parse_rate(s)?;
    Ok(pb::SlidingWindow { limit, window_ms })
}

/// `RATE/INTERVAL` for a leaky bucket, e.g. `10/s`; the burst comes apart.
pub fn parse_leaky(s: &str) -> Result<pb::LeakyBucket, String> {
    let (rate, interval_ms) = parse_rate(s)?;
    Ok(pb::LeakyBucket {
        rate,
        interval_ms,
        burst: 1,
    })
}

pub fn parse_fixed(s: &str) -> Result<pb::FixedWindow, String> {
    let (limit, window_ms) = parse_rate(s)?;
    Ok(pb::FixedWindow { limit, window_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates_parse() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("s"), Ok(1000));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert_eq!(parse_duration_ms("1500"), Ok(1500));
        assert!(parse_duration_ms("5 weeks").is_err());
        let tb = parse_token_bucket("10:1/s").unwrap();
        assert_eq!(
            (tb.capacity, tb.refill_tokens, tb.refill_interval_ms),
            (10, 1, 1000)
        );
        assert!(parse_token_bucket("10/s").is_err());
        assert_eq!(parse_fixed("100/1m").unwrap().window_ms, 60_000);
        let lb = parse_leaky("10/s").unwrap();
        assert_eq!((lb.rate, lb.interval_ms, lb.burst), (10, 1000, 1));
        assert!(parse_leaky("10").is_err());
    }
}

/// A named limit's descriptor entries, `k=v[,k=v...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entries(pub Vec<(String, String)>);

pub fn parse_descriptor(s: &str) -> Result<Entries, String> {
    s.split(',')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(format!("expected KEY=VALUE[,KEY=VALUE...], got {pair:?}")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Entries)
}
