//! Probing an exchange on a channel of its own before the publishing channel sees it.
//!
//! A passive declare says an exchange exists, not that this user may publish to it: an
//! `internal` exchange, or one the user has no write permission on, exists and still closes
//! the channel (403) on the first publish — and a closed publishing channel fails every
//! pending confirm of the good rows beside it, which are then published again. So the first
//! row to an exchange not seen lately is published alone on a channel opened for it (in
//! confirm mode) and its confirm awaited, bounded: only then do the other rows to that
//! exchange go to the publishing channel. A refusal closes the probe's channel, never the
//! publishing one. The probe's channel closes once its confirm is answered (lapin closes a
//! channel when its last handle drops).

use std::time::Duration;

use futures::FutureExt;
use lapin::{options::BasicPublishOptions, Channel};

use super::Prepared;
use crate::{actors::confirms::Confirm, broker::ChannelClose};

/// How the broker answered a probe.
pub(super) enum Probe {
    /// It took the publish: its confirm (resolved, or still pending after the bound) goes
    /// to the ConfirmTracker like any other.
    Published(Confirm),
    /// It closed the probe's channel naming the probe's exchange: the row is charged.
    Refused(ChannelClose),
    /// Anything else (the probe's channel broke, no answer in time): the row is refunded.
    Failed(String),
}

/// Publishes one row on `channel` and awaits its confirm for at most `bound`.
pub(super) async fn probe(
    channel: Channel,
    exchange: &str,
    p: Prepared,
    payload: &[u8],
    bound: Duration,
) -> Probe {
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let publish = channel.basic_publish(p.exchange, p.routing_key, options, payload, p.properties);
    let mut confirm = match tokio::time::timeout(bound, publish).await {
        Ok(Ok(confirm)) => confirm.boxed(),
        Ok(Err(e)) => return refused_or_failed(exchange, &e),
        Err(_) => return Probe::Failed(format!("probe publish not written within {bound:?}")),
    };
    match tokio::time::timeout(bound, &mut confirm).await {
        Ok(Ok(answer)) => Probe::Published(futures::future::ready(Ok(answer)).boxed()),
        Ok(Err(e)) => refused_or_failed(exchange, &e),
        // Still unanswered: the tracker's confirm deadline takes it from here, and the
        // channel stays open until it is answered.
        Err(_) => Probe::Published(
            async move {
                let answer = confirm.await;
                drop(channel);
                answer
            }
            .boxed(),
        ),
    }
}

fn refused_or_failed(exchange: &str, e: &lapin::Error) -> Probe {
    match ChannelClose::from_error(e) {
        Some(close) if close.exchange() == Some(exchange) => Probe::Refused(close),
        _ => Probe::Failed(e.to_string()),
    }
}
