//! Observers of the hub's records outside the protocol (the admin endpoint's
//! event stream): each gets the records as they are, then every change as the
//! hub's clients see it, in the order the hub decided them.
//!
//! Changes are handed over under the state's lock, so that must never wait:
//! each subscriber has a queue whose size in bytes is counted. One that would
//! go past its budget *loses its place*: its queue is emptied and nothing more
//! is queued for it, so a stalled reader costs at most its budget and never
//! slows the hub. When it reads again it is told, and takes the records as
//! they are then (see `Shared::resync`), as a connection that falls behind
//! the hub's feed is caught up from the registry.

use crate::registry::record::Record;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

/// A record with the time its current version was stored.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The record, its owner included.
    pub record: Record,
    /// When the hub stored this version of it.
    pub stored_at: SystemTime,
}

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
    /// A record was stored, new or changed.
    Registered(Listed),
    /// A record was freed.
    Freed {
        /// Its id.
        id: String,
    },
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
    /// Bytes of the changes queued.
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

    /// Bytes of changes waiting to be taken.
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
    /// Whether anyone listens (a change is made only then).
    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// A new subscriber with a budget of `budget` bytes.
    pub(crate) fn add(&mut self, budget: usize) -> Subscription {
        let queue = Arc::new(Mutex::new(Queue::default()));
        self.list.push((queue.clone(), budget));
        Subscription { queue, budget }
    }

    /// Hands `change`, weighing `weight` bytes, to every subscriber that
    /// has its place; one that would go past its budget loses it.
    pub(crate) fn send(&mut self, change: Change, weight: usize) {
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

    #[tokio::test]
    async fn a_subscriber_past_its_budget_loses_its_place_until_it_is_found() {
        let mut subscribers = Subscribers::default();
        let mut slow = subscribers.add(100);
        let mut fast = subscribers.add(1000);
        subscribers.send(freed("a"), 60);
        assert!(matches!(fast.next().await, Received::Change(_)));
        assert_eq!(slow.queued(), 60);
        subscribers.send(freed("b"), 60);
        assert_eq!(slow.queued(), 0, "what it had is dropped at once");
        subscribers.send(freed("c"), 60);
        assert_eq!(slow.queued(), 0, "and nothing more is queued");
        assert!(matches!(fast.next().await, Received::Change(_)));
        assert!(matches!(slow.next().await, Received::Lost { budget: 100 }));
        subscribers.found(&slow);
        subscribers.send(freed("d"), 60);
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
}
