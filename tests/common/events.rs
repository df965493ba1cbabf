//! Awaiting engine events in tests: every wait is bounded and fails the test naming what
//! it waited for.

use courier::EngineEvent;

use super::within;

/// Waits for the first event for which `pick` is true.
pub async fn wait_event(
    rx: &mut tokio::sync::broadcast::Receiver<EngineEvent>,
    secs: u64,
    what: &str,
    pick: impl Fn(&EngineEvent) -> bool,
) {
    next_event(rx, secs, what, |e| pick(e).then_some(())).await
}

/// Waits for the first event from which `pick` takes a value, and returns it.
pub async fn next_event<T>(
    rx: &mut tokio::sync::broadcast::Receiver<EngineEvent>,
    secs: u64,
    what: &str,
    mut pick: impl FnMut(&EngineEvent) -> Option<T>,
) -> T {
    within(secs, what, async {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    if let Some(v) = pick(&e) {
                        return v;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
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
