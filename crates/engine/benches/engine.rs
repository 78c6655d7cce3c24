//! Engine micro-benchmarks: rate-limit decisions on one hot key and across
//! 1M keys, draining changed cells for a sync entry, lease grant/release and
//! idempotency Begin. Single-threaded, so
//! the per-iteration time is the per-core cost.
//!
//! cargo bench --bench engine

use std::hint::black_box;

use arbiter_engine::{
    Acquire, Begin, Command, Engine, EngineConfig, LimitCheck, LimitDef, Release,
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const BUCKET: LimitDef = LimitDef::TokenBucket {
    capacity: 1_000_000_000,
    refill_tokens: 1000,
    refill_interval_ms: 1,
};

fn check(key: String) -> LimitCheck {
    LimitCheck {
        key,
        limit: BUCKET,
        cost: 1,
        dry_run: false,
        max_delay_ms: 0,
    }
}

fn token_bucket(c: &mut Criterion) {
    let mut g = c.benchmark_group("token_bucket");
    g.throughput(Throughput::Elements(1));

    let engine = Engine::new(EngineConfig::default());
    let hot = [check("tenant:42:user:1001".into())];
    let mut now = 1_700_000_000_000u64;
    g.bench_function("hot_key", |b| {
        b.iter(|| {
            now += 1;
            black_box(engine.check(black_box(&hot), false, now).expect("decided"))
        })
    });

    const KEYS: usize = 1_000_000;
    let engine = Engine::new(EngineConfig::default());
    let checks: Vec<[LimitCheck; 1]> = (0..KEYS)
        .map(|i| [check(format!("tenant:{}:user:{i}", i % 97))])
        .collect();
    for c in &checks {
        engine.check(c, false, now).expect("decided");
    }
    // Requests are walked in order (as a server reads each request's key from
    // its own fresh buffer); the table slots they hit are still spread at
    // random by the hash, so table lookups miss the cache as real traffic
    // over 1M keys would.
    let mut i = 0usize;
    g.bench_function("1M_keys", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(engine.check(&checks[i], false, now).expect("decided"))
        })
    });
    g.finish();
}

/// A leader's sync: 10,000 of 100,000 keys changed, drained into one
/// entry's cells. Per changed cell.
fn sync(c: &mut Criterion) {
    const KEYS: usize = 100_000;
    const CHANGED: usize = 10_000;
    let mut g = c.benchmark_group("sync");
    g.throughput(Throughput::Elements(CHANGED as u64));
    let engine = Engine::new(EngineConfig::default());
    let checks: Vec<[LimitCheck; 1]> = (0..KEYS)
        .map(|i| [check(format!("bench:user:{i}"))])
        .collect();
    let now = 1_700_000_000_000u64;
    for c in &checks {
        engine.check(c, false, now).expect("decided");
    }
    let mut next = 0usize;
    let mut change = || {
        // A stride coprime with KEYS spreads the changed keys over the table.
        for _ in 0..CHANGED {
            next = (next + 7_919) % KEYS;
            engine.check(&checks[next], false, now).expect("decided");
        }
    };
    change();
    engine.drain_dirty_limits(usize::MAX, usize::MAX);
    g.bench_function("drain_10k_of_100k", |b| {
        b.iter_batched(
            &mut change,
            |()| black_box(engine.drain_dirty_limits(usize::MAX, usize::MAX)),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// The floor for a 1M-key table on this machine: one lookup in a 1M-entry
/// hash map whose slots are as large as the rate-limit table's (56 bytes),
/// with no lock, no key comparison and no algorithm, pays the same cache and
/// TLB misses (the table is larger than the last-level cache).
fn baseline(c: &mut Criterion) {
    let mut g = c.benchmark_group("baseline");
    g.throughput(Throughput::Elements(1));
    const KEYS: u64 = 1_000_000;
    let map: hashbrown::HashMap<u64, [u64; 6]> = (0..KEYS).map(|i| (i, [i; 6])).collect();
    let mut i = 0u64;
    g.bench_function("hashmap_1M_56B_slots", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(map.get(&black_box(i)))
        })
    });
    g.finish();
}

fn leases(c: &mut Criterion) {
    let mut g = c.benchmark_group("leases");
    g.throughput(Throughput::Elements(1));
    let engine = Engine::new(EngineConfig::default());
    let mut now = 0u64;
    g.bench_function("acquire_release", |b| {
        b.iter_batched(
            || {
                now += 1;
                ("lease:orders".to_owned(), "worker-7".to_owned(), now)
            },
            |(name, holder, now)| {
                let a = engine
                    .apply(
                        Command::Acquire(Acquire {
                            quota: Default::default(),
                            principal: String::new(),
                            name: name.clone(),
                            holder: holder.clone(),
                            ttl_ms: 10_000,
                        }),
                        now,
                    )
                    .expect("granted");
                let token = match a.outcome {
                    arbiter_engine::Outcome::Acquire(a) => a.lease.fencing_token,
                    other => panic!("{other:?}"),
                };
                engine
                    .apply(
                        Command::Release(Release {
                            principal: String::new(),
                            name,
                            holder,
                            fencing_token: token,
                        }),
                        now,
                    )
                    .expect("released")
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn idempotency(c: &mut Criterion) {
    let mut g = c.benchmark_group("idempotency");
    g.throughput(Throughput::Elements(1));
    let engine = Engine::new(EngineConfig {
        max_records: usize::MAX,
        max_record_bytes: usize::MAX,
        ..EngineConfig::default()
    });
    let mut n = 0u64;
    g.bench_function("begin_new_key", |b| {
        b.iter_batched(
            || {
                n += 1;
                (format!("order:{n}"), n)
            },
            |(key, n)| {
                engine
                    .apply(
                        Command::Begin(Begin {
                            quota: Default::default(),
                            principal: String::new(),
                            key,
                            fingerprint: b"sha256:0123456789abcdef".to_vec(),
                            lock_ttl_ms: 30_000,
                            retention_ms: 86_400_000,
                        }),
                        n,
                    )
                    .expect("begun")
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, token_bucket, sync, baseline, leases, idempotency);
criterion_main!(benches);
