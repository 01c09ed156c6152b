//! Observers of the hub's records outside the protocol (the admin endpoint's
//! event stream): each gets the records as they are, then the changes as the
//! hub's clients see them.
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
//!
//! While a subscriber's listing is under way, a change to a record the
//! listing has yet to reach (see [`Listing::will_list`]) is not queued: the
//! listing shows that record as it is when its part is taken. So a listing
//! slower than the changes to the records it has yet to reach does not make
//! its subscriber lose its place; only changes to records already listed,
//! records that arrived since it began, and frees (whose record's place the
//! hub no longer knows) are queued.
//!
//! A queue holds at most one change per record: its latest. A change to a
//! record that already has one queued takes that one's place (and weight),
//! so a subscriber's queue holds no more changes than there are records
//! changed (freed ones included), and one that reads slower than a few
//! records change only falls behind by those records' latest states. The
//! changes of one record come in the order the hub decided them, and once
//! its queue is read a subscriber holds the hub's records; changes of
//! different records may come in another order than the hub decided them
//! (a subscriber keeps the records by id). A free takes the place of a
//! register queued for a record the subscriber never saw rather than both
//! being dropped: whether it holds an earlier version of that id is not
//! known here.

use crate::registry::StoredRow;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// What one queued change costs a subscriber besides its bytes of row or id:
/// the change itself, its share of the queue and its shared allocation, its
/// entry in the queue's index by id (with the index 7/8 full), and the
/// counts of a freed id's shared allocation, rounded up.
pub const ENTRY_OVERHEAD: usize = {
    let exact = std::mem::size_of::<Change>()
        + std::mem::size_of::<(Arc<Change>, usize)>()
        + 2 * std::mem::size_of::<usize>()
        + (std::mem::size_of::<(Arc<str>, u64)>() + 1) * 8 / 7
        + 2 * std::mem::size_of::<usize>();
    exact.next_multiple_of(64)
};

/// Where a listing of the hub's records, taken a part at a time, is: the
/// records there were when it began, as they are when their part is taken.
/// A change meanwhile to a record already listed, or to one that arrived
/// since, also comes to a subscriber as a change, after the listing; a change
/// to a record still to be listed does not (see [`Listing::will_list`]).
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

    /// Whether the record that has arrival number `arrival` (see
    /// [`StoredRow::arrival`]) is still to be listed: it arrived before the
    /// listing began and its part was not taken yet.
    pub(crate) fn will_list(&self, arrival: u64) -> bool {
        !self.done && arrival > self.after && arrival < self.until
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
        id: Arc<str>,
    },
}

impl Change {
    /// The id of the changed record.
    pub fn id(&self) -> &str {
        self.key()
    }

    /// The id of the changed record, shared.
    fn key(&self) -> &Arc<str> {
        match self {
            Change::Registered(row) => row.shared_id(),
            Change::Freed { id } => id,
        }
    }

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

/// One subscriber's queue, shared by the hub and the subscriber: at most one
/// change per record, its latest.
#[derive(Debug, Default)]
struct Queue {
    /// The changes and their weights, first to be taken first.
    changes: VecDeque<(Arc<Change>, usize)>,
    /// The number of each queued change, by its record's id: its place in
    /// `changes` is its number less `taken`.
    places: HashMap<Arc<str>, u64>,
    /// Changes taken from the front of `changes` since it was last empty.
    taken: u64,
    /// Weight of the changes queued (see [`Change::weight`]).
    bytes: usize,
    /// Fell past its budget: nothing is queued until it resyncs.
    lost: bool,
    /// The hub stopped.
    closed: bool,
    /// Where the subscriber's listing is, while it is under way: changes to
    /// the records it will list are not queued.
    listing: Option<Listing>,
    /// The subscriber waiting for a change.
    waker: Option<Waker>,
}

impl Queue {
    /// Queues `change`, which weighs `weight`, in place of the change queued
    /// for the same record if there is one; false, queueing nothing, when
    /// the queue would then weigh more than `budget`.
    fn push(&mut self, change: &Arc<Change>, weight: usize, budget: usize) -> bool {
        let key = change.key();
        let place = self
            .places
            .get(&**key)
            .and_then(|number| usize::try_from(number.checked_sub(self.taken)?).ok());
        if let Some(queued) = place.and_then(|place| self.changes.get_mut(place)) {
            let bytes = (self.bytes - queued.1).saturating_add(weight);
            if bytes > budget {
                return false;
            }
            *queued = (change.clone(), weight);
            self.bytes = bytes;
            return true;
        }
        if self.bytes.saturating_add(weight) > budget {
            return false;
        }
        let number = self.taken + self.changes.len() as u64;
        self.places.insert(key.clone(), number);
        self.changes.push_back((change.clone(), weight));
        self.bytes += weight;
        true
    }

    /// Takes the first change.
    fn pop(&mut self) -> Option<Arc<Change>> {
        let (change, weight) = self.changes.pop_front()?;
        self.bytes -= weight;
        self.places.remove(change.id());
        self.taken += 1;
        if self.changes.is_empty() {
            self.taken = 0;
        }
        Some(change)
    }

    /// Drops every change, and the memory that held them.
    fn clear(&mut self) {
        self.changes = VecDeque::new();
        self.places = HashMap::new();
        self.taken = 0;
        self.bytes = 0;
    }
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
        if let Some(change) = queue.pop() {
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
    /// The hub has stopped: a subscription made now ends at once.
    closed: bool,
}

impl Subscribers {
    /// Whether any subscriber has its place (only then is a change made).
    pub(crate) fn any_listening(&self) -> bool {
        self.list.iter().any(|(queue, _)| !lock(queue).lost)
    }

    /// A new subscriber with a budget of `budget` bytes (see
    /// [`Change::weight`]), which takes `listing` first.
    pub(crate) fn add(&mut self, budget: usize, listing: &Listing) -> Subscription {
        let queue = Arc::new(Mutex::new(Queue {
            listing: Some(*listing).filter(|l| !l.done),
            closed: self.closed,
            ..Queue::default()
        }));
        if !self.closed {
            self.list.push((queue.clone(), budget));
        }
        Subscription { queue, budget }
    }

    /// Hands `change` to every subscriber that has its place, but for one
    /// whose listing will show the changed record, in place of the change to
    /// the same record it has queued if any; one that would go past its
    /// budget loses its place.
    pub(crate) fn send(&mut self, change: Change) {
        let weight = change.weight();
        let arrival = match &change {
            Change::Registered(row) => Some(row.arrival()),
            Change::Freed { .. } => None,
        };
        let change = Arc::new(change);
        for (queue, budget) in &self.list {
            let mut queue = lock(queue);
            if queue.lost {
                continue;
            }
            if let (Some(arrival), Some(listing)) = (arrival, &queue.listing)
                && listing.will_list(arrival)
            {
                continue;
            }
            if !queue.push(&change, weight, *budget) {
                tracing::info!(
                    budget,
                    "an event subscriber fell behind the hub's changes: its queue is \
                     dropped, and it takes the records afresh when it reads again"
                );
                queue.clear();
                queue.lost = true;
            }
            if let Some(waker) = queue.waker.take() {
                waker.wake();
            }
        }
    }

    /// `subscription` takes its place again, and takes `listing` first:
    /// changes queue from now on, but for those to records `listing` will
    /// show.
    pub(crate) fn found(&self, subscription: &Subscription, listing: &Listing) {
        let mut queue = lock(&subscription.queue);
        queue.lost = false;
        queue.listing = Some(*listing).filter(|l| !l.done);
    }

    /// `subscription`'s listing is now at `listing`. Called under the same
    /// lock as the part of the listing was taken, so that no change is made
    /// between: one to a record of that part is queued from now on.
    pub(crate) fn listed(&self, subscription: &Subscription, listing: &Listing) {
        lock(&subscription.queue).listing = Some(*listing).filter(|l| !l.done);
    }

    /// Forgets the subscribers whose end was dropped.
    pub(crate) fn prune(&mut self) {
        self.list.retain(|(queue, _)| Arc::strong_count(queue) > 1);
    }

    /// The hub stops: every subscription ends, and so will any made later.
    pub(crate) fn close(&mut self) {
        self.closed = true;
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
    use crate::protocol::wire::meta_of;
    use crate::registry::pattern::Pattern;
    use crate::registry::{Owner, Registry};
    use serde_json::json;

    fn freed(id: &str) -> Change {
        Change::Freed { id: id.into() }
    }

    /// A listing already taken: every change queues.
    const DONE: Listing = Listing {
        after: 0,
        until: 0,
        done: true,
    };

    fn store(registry: &mut Registry, id: &str, port: u16) -> Change {
        let meta = meta_of(json!({"role":"web","version":"1.0.0","port":port}));
        registry.register(id, meta, Owner(1));
        match registry.stored_row(id) {
            Some(row) => Change::Registered(row),
            None => freed(id),
        }
    }

    /// The ids of the changes queued for `subscription`, as `+id` for a
    /// register and `-id` for a free.
    fn queued_ids(subscription: &mut Subscription) -> Vec<String> {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut ids = Vec::new();
        while let Poll::Ready(Received::Change(change)) = subscription.poll_next(&mut cx) {
            ids.push(match &*change {
                Change::Registered(row) => format!("+{}", row.id()),
                Change::Freed { id } => format!("-{id}"),
            });
        }
        ids
    }

    #[test]
    fn changes_to_records_the_listing_will_show_are_not_queued() {
        let mut registry = Registry::new();
        for (n, id) in ["a", "b", "c"].into_iter().enumerate() {
            store(&mut registry, id, n as u16);
        }
        let mut listing = Listing::until(registry.arrival_mark());
        let mut subscribers = Subscribers::default();
        let mut subscription = subscribers.add(1024 * 1024, &listing);
        let mut done = subscribers.add(1024 * 1024, &DONE);
        // "a" is listed; "b" and "c" are not yet.
        let mut part = Vec::new();
        let web = Pattern::all();
        let after = registry.stored_between(&web, 0, listing.until, usize::MAX, 1, &mut part);
        listing.after = after.unwrap_or(listing.until);
        assert_eq!(part.len(), 1);
        subscribers.listed(&subscription, &listing);
        for change in [
            store(&mut registry, "a", 10),
            store(&mut registry, "b", 11),
            store(&mut registry, "d", 12),
            store(&mut registry, "c", 13),
        ] {
            subscribers.send(change);
        }
        registry.free("c");
        subscribers.send(freed("c"));
        assert_eq!(
            queued_ids(&mut subscription),
            ["+a", "+d", "-c"],
            "a listed record, a new one and a free"
        );
        assert_eq!(
            queued_ids(&mut done),
            ["+a", "+b", "+d", "-c"],
            "the free of c takes its register's place"
        );
        // Once the listing is done, every change queues.
        listing.done = true;
        subscribers.listed(&subscription, &listing);
        subscribers.send(store(&mut registry, "b", 14));
        assert_eq!(queued_ids(&mut subscription), ["+b"]);
        // A listing started afresh holds back changes to what it will list.
        subscribers.found(&subscription, &Listing::until(registry.arrival_mark()));
        subscribers.send(store(&mut registry, "a", 15));
        subscribers.send(store(&mut registry, "e", 16));
        assert_eq!(queued_ids(&mut subscription), ["+e"]);
    }

    /// The changes queued for `subscription`, as `+id:port` for a register
    /// and `-id` for a free.
    fn queued_states(subscription: &mut Subscription) -> Vec<String> {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut states = Vec::new();
        while let Poll::Ready(Received::Change(change)) = subscription.poll_next(&mut cx) {
            states.push(match &*change {
                Change::Registered(row) => {
                    let port = row.record().meta().get("port").cloned();
                    format!("+{}:{}", row.id(), port.unwrap_or_default())
                }
                Change::Freed { id } => format!("-{id}"),
            });
        }
        states
    }

    #[test]
    fn a_queue_holds_the_latest_change_of_each_record_where_its_first_was() {
        let mut registry = Registry::new();
        let mut subscribers = Subscribers::default();
        let mut subscription = subscribers.add(1024 * 1024, &DONE);
        let a = store(&mut registry, "a", 1);
        let b = store(&mut registry, "b", 2);
        let (a_weight, b_weight) = (a.weight(), b.weight());
        subscribers.send(a);
        subscribers.send(b);
        assert_eq!(subscription.queued(), a_weight + b_weight);
        // a again, its row longer: its weight replaces the first one's.
        let a = store(&mut registry, "a", 10000);
        let a_again = a.weight();
        assert!(a_again > a_weight);
        subscribers.send(a);
        assert_eq!(subscription.queued(), a_again + b_weight);
        // b freed: the free takes its register's place.
        registry.free("b");
        subscribers.send(freed("b"));
        assert_eq!(subscription.queued(), a_again + freed("b").weight());
        subscribers.send(store(&mut registry, "c", 3));
        // b back: its register takes its free's place.
        subscribers.send(store(&mut registry, "b", 20));
        assert_eq!(
            queued_states(&mut subscription),
            ["+a:10000", "+b:20", "+c:3"]
        );
        assert_eq!(subscription.queued(), 0);
        // Once taken, a record's change queues anew, at the end.
        subscribers.send(store(&mut registry, "a", 4));
        subscribers.send(store(&mut registry, "b", 5));
        assert_eq!(queued_states(&mut subscription), ["+a:4", "+b:5"]);
    }

    #[test]
    fn changes_taken_from_the_front_leave_the_others_places_right() {
        let mut registry = Registry::new();
        let mut subscribers = Subscribers::default();
        let mut subscription = subscribers.add(1024 * 1024, &DONE);
        for (n, id) in ["a", "b", "c"].into_iter().enumerate() {
            subscribers.send(store(&mut registry, id, n as u16));
        }
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(matches!(
            subscription.poll_next(&mut cx),
            Poll::Ready(Received::Change(c)) if c.id() == "a"
        ));
        subscribers.send(store(&mut registry, "c", 30));
        subscribers.send(store(&mut registry, "a", 10));
        subscribers.send(store(&mut registry, "b", 20));
        registry.free("a");
        subscribers.send(freed("a"));
        assert_eq!(queued_states(&mut subscription), ["+b:20", "+c:30", "-a"]);
        let queue = lock(&subscription.queue);
        assert!(queue.places.is_empty() && queue.changes.is_empty());
    }

    #[test]
    fn the_budget_bounds_the_latest_changes_not_every_change() {
        let mut registry = Registry::new();
        let first = store(&mut registry, "a", 1);
        let budget = first.weight() * 2;
        let mut subscribers = Subscribers::default();
        let mut subscription = subscribers.add(budget, &DONE);
        subscribers.send(first);
        for port in 2..100 {
            subscribers.send(store(&mut registry, "a", port));
        }
        assert!(subscribers.any_listening());
        assert_eq!(queued_states(&mut subscription), ["+a:99"]);
        // A record whose latest change no longer fits loses the place.
        subscribers.send(store(&mut registry, "a", 1));
        let big = meta_of(json!({"role":"web","version":"1.0.0","filler":"x".repeat(budget)}));
        registry.register("a", big, Owner(1));
        let row = registry.stored_row("a").map(Change::Registered);
        subscribers.send(row.unwrap_or_else(|| freed("a")));
        assert!(!subscribers.any_listening());
        assert_eq!(subscription.queued(), 0);
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
        let mut slow = subscribers.add(budget, &DONE);
        let mut fast = subscribers.add(weight * 10, &DONE);
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
        subscribers.found(&slow, &DONE);
        subscribers.send(freed("d"));
        assert!(matches!(
            slow.next().await,
            Received::Change(c) if matches!(&*c, Change::Freed { id } if &**id == "d")
        ));
    }

    #[tokio::test]
    async fn subscriptions_end_with_the_hub_and_dropped_ones_are_forgotten() {
        let mut subscribers = Subscribers::default();
        drop(subscribers.add(100, &DONE));
        let mut kept = subscribers.add(100, &DONE);
        subscribers.prune();
        assert_eq!(subscribers.list.len(), 1);
        subscribers.close();
        assert!(matches!(kept.next().await, Received::Closed));
        // One made after the hub stopped ends at once, and is not kept.
        let mut late = subscribers.add(100, &DONE);
        assert!(matches!(late.next().await, Received::Closed));
        assert!(subscribers.list.is_empty());
    }

    #[test]
    fn none_listens_once_every_subscriber_lost_its_place() {
        let mut subscribers = Subscribers::default();
        assert!(!subscribers.any_listening());
        let _small = subscribers.add(ENTRY_OVERHEAD, &DONE);
        assert!(subscribers.any_listening());
        subscribers.send(freed("past the budget"));
        assert!(!subscribers.any_listening());
    }
}
