//! Observers of the hub's records outside the protocol (the admin endpoint's
//! event stream): each gets the records as they are, then every change as the
//! hub's clients see it, in the order the hub decided them.
//!
//! Changes are handed over under the state's lock, so that must never wait,
//! nor decode anything: a registered record is handed over as its row, shared
//! with the registry, and decoded by the subscriber. Each subscriber has a
//! queue whose size in bytes is counted (see [`Change::weight`]). One that
//! would go past its budget *loses its place*: its queue is emptied and
//! nothing more is queued for it, so a stalled reader costs at most its
//! budget and never slows the hub. When it reads again it is told, and takes
//! the records as they are then (see `Shared::resync`), as a connection that
//! falls behind the hub's feed is caught up from the registry.

use crate::registry::StoredRow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// What one queued change costs a subscriber besides its bytes of row or id:
/// the change itself, its share of the queue and its shared allocation,
/// rounded up.
pub const ENTRY_OVERHEAD: usize = {
    let exact = std::mem::size_of::<Change>()
        + std::mem::size_of::<(Arc<Change>, usize)>()
        + 2 * std::mem::size_of::<usize>();
    exact.next_multiple_of(64)
};

/// Where a listing of the hub's records, taken a part at a time, is: the
/// records there were when it began, as they are when their part is taken
/// (a change meanwhile also comes as a change, after the listing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listing {
    /// Arrival number of the last record listed.
    pub(crate) after: u64,
    /// The registry's arrival mark when the listing began.
    pub(crate) until: u64,
    /// Whether every part was taken.
    pub(crate) done: bool,
}

impl Listing {
    /// A listing of the records before arrival mark `until`.
    pub(crate) fn until(until: u64) -> Self {
        Listing {
            after: 0,
            until,
            done: false,
        }
    }

    /// Whether every part was taken.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// One change of the hub's records, as its clients see it.
#[derive(Debug, Clone)]
pub enum Change {
    /// A record was stored, new or changed: the record as it is held,
    /// undecoded ([`StoredRow::record`] decodes it).
    Registered(StoredRow),
    /// A record was freed.
    Freed {
        /// Its id.
        id: String,
    },
}

impl Change {
    /// What the change weighs in a subscriber's queue, in bytes: its row (or
    /// the freed id) plus [`ENTRY_OVERHEAD`], so that a budget bounds the
    /// memory a subscriber's queue holds, however small its changes.
    pub fn weight(&self) -> usize {
        let bytes = match self {
            Change::Registered(row) => row.row().len(),
            Change::Freed { id } => id.len(),
        };
        bytes + ENTRY_OVERHEAD
    }
}

/// What a [`Subscription`] gives next.
#[derive(Debug)]
pub enum Received {
    /// The next change.
    Change(Arc<Change>),
    /// The subscriber fell more than its budget behind and lost its place:
    /// the changes since are not queued. List the records afresh with
    /// [`crate::hub::HubView::resync`]; changes queue again from then on.
    Lost {
        /// The budget, in bytes.
        budget: usize,
    },
    /// The hub stopped.
    Closed,
}

/// One subscriber's queue, shared by the hub and the subscriber.
#[derive(Debug, Default)]
struct Queue {
    changes: VecDeque<(Arc<Change>, usize)>,
    /// Weight of the changes queued (see [`Change::weight`]).
    bytes: usize,
    /// Fell past its budget: nothing is queued until it resyncs.
    lost: bool,
    /// The hub stopped.
    closed: bool,
    /// The subscriber waiting for a change.
    waker: Option<Waker>,
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(|p| p.into_inner())
}

/// A subscriber's end: the changes since it subscribed.
#[derive(Debug)]
pub struct Subscription {
    queue: Arc<Mutex<Queue>>,
    budget: usize,
}

impl Subscription {
    /// The next change, once there is one.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Received> {
        let mut queue = lock(&self.queue);
        if let Some((change, weight)) = queue.changes.pop_front() {
            queue.bytes -= weight;
            return Poll::Ready(Received::Change(change));
        }
        if queue.lost {
            return Poll::Ready(Received::Lost {
                budget: self.budget,
            });
        }
        if queue.closed {
            return Poll::Ready(Received::Closed);
        }
        queue.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next change.
    pub async fn next(&mut self) -> Received {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Weight of the changes waiting to be taken, in bytes (see
    /// [`Change::weight`]).
    pub fn queued(&self) -> usize {
        lock(&self.queue).bytes
    }
}

/// Every subscriber of one hub.
#[derive(Debug, Default)]
pub(crate) struct Subscribers {
    list: Vec<(Arc<Mutex<Queue>>, usize)>,
}

impl Subscribers {
    /// Whether any subscriber has its place (only then is a change made).
    pub(crate) fn any_listening(&self) -> bool {
        self.list.iter().any(|(queue, _)| !lock(queue).lost)
    }

    /// A new subscriber with a budget of `budget` bytes (see
    /// [`Change::weight`]).
    pub(crate) fn add(&mut self, budget: usize) -> Subscription {
        let queue = Arc::new(Mutex::new(Queue::default()));
        self.list.push((queue.clone(), budget));
        Subscription { queue, budget }
    }

    /// Hands `change` to every subscriber that has its place; one that would
    /// go past its budget loses it.
    pub(crate) fn send(&mut self, change: Change) {
        let weight = change.weight();
        let change = Arc::new(change);
        for (queue, budget) in &self.list {
            let mut queue = lock(queue);
            if queue.lost {
                continue;
            }
            if queue.bytes.saturating_add(weight) > *budget {
                tracing::info!(
                    budget,
                    "an event subscriber fell behind the hub's changes: its queue is \
                     dropped, and it takes the records afresh when it reads again"
                );
                queue.changes.clear();
                queue.bytes = 0;
                queue.lost = true;
            } else {
                queue.changes.push_back((change.clone(), weight));
                queue.bytes += weight;
            }
            if let Some(waker) = queue.waker.take() {
                waker.wake();
            }
        }
    }

    /// `subscription` takes its place again: changes queue from now on.
    pub(crate) fn found(&self, subscription: &Subscription) {
        lock(&subscription.queue).lost = false;
    }

    /// Forgets the subscribers whose end was dropped.
    pub(crate) fn prune(&mut self) {
        self.list.retain(|(queue, _)| Arc::strong_count(queue) > 1);
    }

    /// The hub stops: every subscription ends.
    pub(crate) fn close(&mut self) {
        for (queue, _) in self.list.drain(..) {
            let mut queue = lock(&queue);
            queue.closed = true;
            if let Some(waker) = queue.waker.take() {
                waker.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn freed(id: &str) -> Change {
        Change::Freed { id: id.into() }
    }

    #[test]
    fn a_change_weighs_its_row_or_id_and_a_fixed_overhead() {
        assert_eq!(freed("abc").weight(), 3 + ENTRY_OVERHEAD);
        assert!(ENTRY_OVERHEAD >= std::mem::size_of::<Change>());
    }

    #[tokio::test]
    async fn a_subscriber_past_its_budget_loses_its_place_until_it_is_found() {
        let weight = freed("a").weight();
        let budget = weight * 3 / 2;
        let mut subscribers = Subscribers::default();
        let mut slow = subscribers.add(budget);
        let mut fast = subscribers.add(weight * 10);
        subscribers.send(freed("a"));
        assert!(matches!(fast.next().await, Received::Change(_)));
        assert_eq!(slow.queued(), weight);
        subscribers.send(freed("b"));
        assert_eq!(slow.queued(), 0, "what it had is dropped at once");
        assert!(!subscribers.list.is_empty() && subscribers.any_listening());
        subscribers.send(freed("c"));
        assert_eq!(slow.queued(), 0, "and nothing more is queued");
        assert!(matches!(fast.next().await, Received::Change(_)));
        assert!(matches!(slow.next().await, Received::Lost { budget: b } if b == budget));
        subscribers.found(&slow);
        subscribers.send(freed("d"));
        assert!(matches!(
            slow.next().await,
            Received::Change(c) if matches!(&*c, Change::Freed { id } if id == "d")
        ));
    }

    #[tokio::test]
    async fn subscriptions_end_with_the_hub_and_dropped_ones_are_forgotten() {
        let mut subscribers = Subscribers::default();
        drop(subscribers.add(100));
        let mut kept = subscribers.add(100);
        subscribers.prune();
        assert_eq!(subscribers.list.len(), 1);
        subscribers.close();
        assert!(matches!(kept.next().await, Received::Closed));
    }

    #[test]
    fn none_listens_once_every_subscriber_lost_its_place() {
        let mut subscribers = Subscribers::default();
        assert!(!subscribers.any_listening());
        let _small = subscribers.add(ENTRY_OVERHEAD);
        assert!(subscribers.any_listening());
        subscribers.send(freed("past the budget"));
        assert!(!subscribers.any_listening());
    }
}
