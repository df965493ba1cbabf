//! Pure-CPU micro-benchmarks: the state machine, confirm tracking of 100k messages, the
//! backoff schedule and the AMQP conversion of a row. No services needed.

use std::time::{Duration, Instant};

use courier::{
    config::BackoffConfig,
    testing::backoff,
    testing::{Answer, InFlightTable, Settled},
    testing::{Delivery, FailureReason},
    OutboxMessage,
};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};

fn state_machine(c: &mut Criterion) {
    let backoff_cfg = BackoffConfig::default();
    let template = OutboxMessage::new("orders", "order.created", vec![0u8; 256]);
    c.bench_function("delivery claim+ack", |b| {
        b.iter(|| {
            let mut d = Delivery::claimed(black_box(template.clone()), 3);
            d.ack().expect("ack");
            black_box(d.state())
        })
    });
    c.bench_function("delivery claim+fail", |b| {
        b.iter(|| {
            let mut d = Delivery::claimed(black_box(template.clone()), 3);
            black_box(d.fail(&FailureReason::Nacked, &backoff_cfg).expect("fail"))
        })
    });
    c.bench_function("backoff delay", |b| {
        b.iter(|| backoff::delay(black_box(&backoff_cfg), black_box(7)))
    });
}

/// 100k messages through the in-flight table: tracked, then settled by acks arriving in
/// groups of 1,000 (as lapin expands one `multiple=true` ack), each ack applied through the
/// state machine; one in seven returned first.
fn confirm_tracking(c: &mut Criterion) {
    let template = OutboxMessage::new("orders", "order.created", vec![0u8; 256]);
    let rows: Vec<OutboxMessage> = (0..100_000)
        .map(|_| {
            let mut m = template.clone().with_id(uuid::Uuid::new_v4());
            m.attempts = 1;
            m
        })
        .collect();
    let mut group = c.benchmark_group("confirm tracking");
    group.sample_size(10);
    group.bench_function("100k messages, multiple acks of 1000", |b| {
        b.iter_batched(
            || -> Vec<Delivery> {
                rows.iter()
                    .map(|m| Delivery::claimed(m.clone(), 3))
                    .collect()
            },
            |deliveries| {
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut table = InFlightTable::new();
                let ids: Vec<uuid::Uuid> = deliveries.iter().map(|d| d.message.id).collect();
                for (token, d) in deliveries.into_iter().enumerate() {
                    table.insert(d, token as u64, deadline);
                }
                let mut confirmed = 0usize;
                for (chunk_no, chunk) in ids.chunks(1000).enumerate() {
                    for (i, id) in chunk.iter().enumerate() {
                        if i % 7 == 0 {
                            table.note_return(
                                *id,
                                FailureReason::Returned {
                                    code: 312,
                                    text: "NO_ROUTE".into(),
                                },
                            );
                        }
                    }
                    for (i, id) in chunk.iter().enumerate() {
                        let token = (chunk_no * 1000 + i) as u64;
                        if let Some((Settled::Ack(mut d), _)) =
                            table.settle(*id, token, Answer::Ack)
                        {
                            d.ack().expect("ack");
                            confirmed += 1;
                        }
                    }
                }
                black_box(confirmed)
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn amqp_conversion(c: &mut Criterion) {
    let m = OutboxMessage::new("orders", "order.created", vec![0u8; 256])
        .with_content_type("application/json")
        .with_header("tenant", "a")
        .with_header("n", 5);
    c.bench_function("row to AMQP properties", |b| {
        b.iter(|| black_box(&m).amqp_properties().expect("properties"))
    });
}

criterion_group!(benches, state_machine, confirm_tracking, amqp_conversion);
criterion_main!(benches);
