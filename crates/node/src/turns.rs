//! The platform's turns: one query's protocol at a time, handed out round
//! robin between analysts (first come, first served within one analyst), so
//! an analyst with many queries waiting delays another analyst's query by at
//! most one of its own, not by all of them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

#[derive(Debug, Default)]
struct State {
    /// Whether a turn is held.
    busy: bool,
    /// Analysts with waiters, in the order they get their next turn.
    rotation: VecDeque<String>,
    /// Each analyst's waiters, oldest first.
    waiting: HashMap<String, VecDeque<oneshot::Sender<Turn>>>,
}

/// Round-robin turns (cheap to clone: one shared queue).
#[derive(Clone, Debug, Default)]
pub struct Turns {
    state: Arc<Mutex<State>>,
}

/// A turn, held until dropped; then the next waiter gets one.
#[derive(Debug)]
pub struct Turn {
    /// `None` once passed on (or never taken).
    turns: Option<Turns>,
}

impl Turns {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for a turn for `analyst`. Cancel-safe: a waiter dropped before
    /// or after its turn was handed over passes the turn on.
    pub async fn take(&self, analyst: &str) -> Turn {
        loop {
            let rx = {
                let mut s = self.lock();
                if !s.busy {
                    s.busy = true;
                    return Turn {
                        turns: Some(self.clone()),
                    };
                }
                let (tx, rx) = oneshot::channel();
                let queue = s.waiting.entry(analyst.to_string()).or_default();
                let first = queue.is_empty();
                queue.push_back(tx);
                if first {
                    s.rotation.push_back(analyst.to_string());
                }
                rx
            };
            // `pass` never drops a waiter's sender unsent, so this waits
            // for the turn; if it ever did, wait again.
            if let Ok(turn) = rx.await {
                return turn;
            }
        }
    }

    /// Whether a turn is held, and how many wait.
    pub fn load(&self) -> (bool, usize) {
        let s = self.lock();
        (s.busy, s.waiting.values().map(VecDeque::len).sum())
    }

    /// Hands the turn to the next waiter in the rotation, or frees it.
    fn pass(&self) {
        let mut s = self.lock();
        while let Some(analyst) = s.rotation.pop_front() {
            let Some(queue) = s.waiting.get_mut(&analyst) else {
                continue;
            };
            let next = queue.pop_front();
            let more = !queue.is_empty();
            if !more {
                s.waiting.remove(&analyst);
            }
            // The turn travels in the channel: if its waiter has gone, it
            // comes back (here, or dropped with the channel) and is passed
            // on; the analyst keeps its place for its next waiter.
            let sent = next.map(|tx| {
                tx.send(Turn {
                    turns: Some(self.clone()),
                })
            });
            match sent {
                Some(Ok(())) => {
                    if more {
                        s.rotation.push_back(analyst);
                    }
                    return;
                }
                Some(Err(mut turn)) => {
                    // Disarmed: this loop passes the turn on instead.
                    turn.turns = None;
                    if more {
                        s.rotation.push_front(analyst);
                    }
                }
                None => {}
            }
        }
        s.busy = false;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(turns) = self.turns.take() {
            turns.pass();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waiters enqueue in this order: a1..a4 then b1 (a0 holds the turn).
    /// Round robin gives a1, b1, a2, a3, a4 (FIFO would be a1..a4, b1).
    #[tokio::test]
    async fn turns_go_round_robin_between_analysts() {
        let turns = Turns::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = turns.take("a").await;
        let mut tasks = Vec::new();
        for name in ["a1", "a2", "a3", "a4", "b1"] {
            let (turns, order) = (turns.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _t = turns.take(&name[..1]).await;
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }));
            // Enqueued in this order.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a1", "b1", "a2", "a3", "a4"]);
    }

    /// A task waiting for a turn for `analyst`; a `doomed` one must be
    /// aborted before it runs with its turn.
    fn waiter(turns: &Turns, analyst: &'static str, doomed: bool) -> tokio::task::JoinHandle<()> {
        let turns = turns.clone();
        tokio::spawn(async move {
            let _t = turns.take(analyst).await;
            assert!(!doomed, "aborted before it ran with its turn");
        })
    }

    /// A waiter that goes away (its future dropped) does not keep the turn.
    #[tokio::test]
    async fn a_waiter_that_goes_away_passes_its_turn_on() {
        let turns = Turns::default();
        let first = turns.take("a").await;
        let gone = waiter(&turns, "b", true);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let next = waiter(&turns, "c", false);
        tokio::time::sleep(Duration::from_millis(5)).await;
        gone.abort();
        let _ = gone.await;
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("the turn was lost")
            .unwrap();
        // And the turn is free again.
        tokio::time::timeout(Duration::from_secs(5), turns.take("d"))
            .await
            .expect("the turn was not freed");
    }

    /// A waiter that goes away after its turn was sent to it, before it ran
    /// (on this single-threaded runtime nothing runs between the two), does
    /// not keep the turn either: it is dropped with the channel and passed on.
    #[tokio::test]
    async fn a_turn_sent_to_a_waiter_that_then_goes_away_is_passed_on() {
        let turns = Turns::default();
        let first = turns.take("a").await;
        let gone = waiter(&turns, "b", true);
        let next = waiter(&turns, "c", false);
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(first); // sends the turn to "b"
        gone.abort(); // before "b" is polled again
        let _ = gone.await;
        tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("the turn was lost")
            .unwrap();
    }
}
