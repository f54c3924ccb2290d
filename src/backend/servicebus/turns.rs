//! Turns: the order in which a queue's leases reach its link.
//!
//! A turn is taken synchronously, when the engine starts a lease, and the
//! lease's task waits for every earlier turn to end before it queues its
//! command on the link. The link's task serves leases in the order their
//! commands arrive, so the messages each lease gets follow the order the
//! engine examines them in, whatever order the tasks run in.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Turnstile {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// The number the next turn gets.
    next: u64,
    /// The turn whose holder may go now.
    serving: u64,
    /// Turns that ended before they came up (their lease was dropped).
    ended_early: BTreeSet<u64>,
}

/// One place in line. Dropping it ends the turn: at once when it is the
/// turn being served, else when it comes up.
pub struct Turn {
    number: u64,
    turnstile: Arc<Turnstile>,
}

impl Turnstile {
    pub fn take(self: &Arc<Self>) -> Turn {
        let mut s = self.state.lock().expect("turnstile lock");
        let number = s.next;
        s.next += 1;
        Turn {
            number,
            turnstile: self.clone(),
        }
    }
}

impl Turn {
    /// Wait until every turn taken before this one has ended.
    pub async fn come_up(&self) {
        loop {
            let changed = self.turnstile.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so an end between the two wakes us.
            changed.as_mut().enable();
            if self.turnstile.state.lock().expect("turnstile lock").serving == self.number {
                return;
            }
            changed.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut s = self.turnstile.state.lock().expect("turnstile lock");
        if s.serving == self.number {
            s.serving += 1;
            loop {
                let next = s.serving;
                if !s.ended_early.remove(&next) {
                    break;
                }
                s.serving += 1;
            }
        } else {
            s.ended_early.insert(self.number);
        }
        drop(s);
        self.turnstile.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn turns_come_up_in_the_order_they_were_taken_whatever_order_they_wait_in() {
        let turnstile = Arc::new(Turnstile::default());
        let served = Arc::new(Mutex::new(Vec::new()));
        let turns: Vec<Turn> = (0..8).map(|_| turnstile.take()).collect();
        let mut tasks = Vec::new();
        // The last taken starts waiting first.
        for (i, turn) in turns.into_iter().enumerate().rev() {
            let served = served.clone();
            tasks.push(tokio::spawn(async move {
                turn.come_up().await;
                served.lock().unwrap().push(i);
            }));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*served.lock().unwrap(), (0..8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_turn_dropped_before_it_came_up_holds_nobody_up() {
        let turnstile = Arc::new(Turnstile::default());
        let first = turnstile.take();
        let dropped = turnstile.take();
        let third = turnstile.take();
        drop(dropped);
        let waiting = tokio::spawn(async move { third.come_up().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the first turn is still out");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the third turn comes up once the first ends")
            .unwrap();
    }
}
