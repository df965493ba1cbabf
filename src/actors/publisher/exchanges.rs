//! Which exchanges the publishing channel may see: passive declares and probes on the side
//! channel (see the Publisher's module documentation and `probe`).

use std::{collections::HashMap, time::Duration};

use lapin::{
    options::ExchangeDeclareOptions,
    types::{FieldTable, ShortString},
    Channel, Connection, ExchangeKind,
};

use super::{confirm_channel, probe, Prepared};
use crate::{
    actors::confirms::Published,
    broker::ChannelClose,
    state::{Delivery, FailureReason},
};

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 404)
}

/// Passive declare on the side channel (reopened as needed: a 404 closes it).
pub(super) async fn exchange_exists(
    conn: &Connection,
    side: &mut Option<Channel>,
    name: &str,
) -> Result<bool, String> {
    let channel = side_channel(conn, side).await?;
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let name = ShortString::try_new(name).map_err(|e| e.to_string())?;
    match channel
        .exchange_declare(name, ExchangeKind::Direct, options, FieldTable::default())
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if is_not_found(&e) => {
            *side = None;
            Ok(false)
        }
        Err(e) => {
            *side = None;
            Err(e.to_string())
        }
    }
}

/// The side channel (passive declares and probes), opened in confirm mode when missing.
async fn side_channel(conn: &Connection, side: &mut Option<Channel>) -> Result<Channel, String> {
    if let Some(c) = side.as_ref().filter(|c| c.status().connected()) {
        return Ok(c.clone());
    }
    let c = confirm_channel(conn).await.map_err(|e| e.to_string())?;
    *side = Some(c.clone());
    Ok(c)
}

/// What probing new exchanges produced.
#[derive(Default)]
pub(super) struct Probed {
    pub(super) published: Vec<Published>,
    pub(super) unsent: Vec<(Delivery, FailureReason)>,
    pub(super) refused: Vec<(String, ChannelClose)>,
}

/// Probes each exchange the passive declares just found (see `probe`) with its first row in
/// `to_send`. Rows to an exchange the probe found refused leave `to_send`, charged.
pub(super) async fn probe_new_exchanges(
    conn: &Connection,
    side: &mut Option<Channel>,
    exchanges: &HashMap<String, bool>,
    to_send: &mut Vec<(Delivery, Prepared, u64)>,
    bound: Duration,
) -> Probed {
    let mut out = Probed::default();
    for name in exchanges
        .iter()
        .filter(|(_, exists)| **exists)
        .map(|(n, _)| n)
    {
        let Some(first) = to_send
            .iter()
            .position(|(d, _, _)| &d.message.exchange == name)
        else {
            continue;
        };
        let channel = match tokio::time::timeout(bound, side_channel(conn, side)).await {
            Ok(Ok(c)) => c,
            // No side channel: the rows go to the publishing channel unprobed, as before.
            _ => {
                *side = None;
                break;
            }
        };
        let (d, p, token) = to_send.remove(first);
        match probe::probe(&channel, name, p, &d.message.payload, bound).await {
            probe::Probe::Published(confirm) => out.published.push(Published {
                delivery: d,
                token,
                channel: 0, // not the publishing channel: never blamed for its closes
                confirm,
            }),
            probe::Probe::Refused(close) => {
                *side = None;
                tracing::warn!(exchange = %name, code = close.code, reason = %close.text,
                    "the broker refused an exchange on the side channel; rows to it are failed unpublished for a while");
                let behind = format!("{} (not published: refused moments ago)", close.text);
                let (refused, keep): (Vec<_>, Vec<_>) = std::mem::take(to_send)
                    .into_iter()
                    .partition(|(d, _, _)| &d.message.exchange == name);
                *to_send = keep;
                out.unsent.extend(refused.into_iter().map(|(d, _, _)| {
                    let why = FailureReason::Refused {
                        code: close.code,
                        text: behind.clone(),
                    };
                    (d, why)
                }));
                let why = FailureReason::Refused {
                    code: close.code,
                    text: close.text.clone(),
                };
                out.unsent.push((d, why));
                out.refused.push((name.clone(), close));
            }
            probe::Probe::Failed(why) => {
                *side = None;
                let why = FailureReason::ChannelLost(format!("exchange probe failed: {why}"));
                out.unsent.push((d, why));
            }
        }
    }
    out
}
