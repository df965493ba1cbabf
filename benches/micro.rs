//! Pure-CPU micro-benchmarks: the state machine, the backoff schedule and the AMQP
//! conversion of a row. No services needed.

use courier::{
    backoff,
    config::BackoffConfig,
    state::{Delivery, FailureReason},
    OutboxMessage,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

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

fn amqp_conversion(c: &mut Criterion) {
    let m = OutboxMessage::new("orders", "order.created", vec![0u8; 256])
        .with_content_type("application/json")
        .with_header("tenant", "a")
        .with_header("n", 5);
    c.bench_function("row to AMQP properties", |b| {
        b.iter(|| black_box(&m).amqp_properties().expect("properties"))
    });
}

criterion_group!(benches, state_machine, amqp_conversion);
criterion_main!(benches);
