//! Awaiting engine events in tests: every wait is bounded and fails the test naming what
//! it waited for.

use courier::events::EngineEvent;

use super::within;

/// Waits for the first event for which `pick` is true.
pub async fn wait_event(
    rx: &mut tokio::sync::broadcast::Receiver<EngineEvent>,
    secs: u64,
    what: &str,
    pick: impl Fn(&EngineEvent) -> bool,
) {
    within(secs, what, async {
        loop {
            match rx.recv().await {
                Ok(e) if pick(&e) => return,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
}

/// Waits until at least `n` messages have been confirmed (by events).
pub async fn confirmed_at_least(rx: &mut tokio::sync::broadcast::Receiver<EngineEvent>, n: usize) {
    let mut seen = 0;
    within(60, &format!("{n} confirmations"), async {
        while seen < n {
            match rx.recv().await {
                Ok(EngineEvent::Confirmed(ids)) => seen += ids.len(),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
}
