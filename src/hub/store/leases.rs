//! The hub's leases in the store: one or more per connection that holds
//! records, each kept alive while the hub lives and revoked when its
//! connection leaves.
//!
//! A lease carries at most [`KEYS_PER_LEASE`] keys: in etcd 3.4 a put on a
//! lease costs in proportion to the keys already on it (etcd-io/etcd#15993),
//! so a connection with many records gets more leases instead of one long
//! one.

use crate::registry::Owner;
use etcd_client::Client;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// The most keys (records and port claims) put on one lease.
pub(super) const KEYS_PER_LEASE: usize = 1000;

/// One lease of a connection.
#[derive(Debug)]
struct Lease {
    owner: Owner,
    keys: usize,
    keeper: AbortHandle,
}

/// The leases of the hub's connections.
#[derive(Debug, Default)]
pub(super) struct Leases {
    leases: HashMap<i64, Lease>,
    /// Each connection's leases, the newest last.
    by_owner: HashMap<Owner, Vec<i64>>,
}

impl Leases {
    /// A lease of `owner` with room for `keys` more keys, if it has one.
    pub(super) fn with_room(&self, owner: Owner, keys: usize) -> Option<i64> {
        let newest = *self.by_owner.get(&owner)?.last()?;
        let lease = self.leases.get(&newest)?;
        (lease.keys + keys <= KEYS_PER_LEASE).then_some(newest)
    }

    /// Keys that lease `id` has room for.
    pub(super) fn room(&self, id: i64) -> usize {
        self.leases
            .get(&id)
            .map_or(0, |lease| KEYS_PER_LEASE.saturating_sub(lease.keys))
    }

    /// A new lease `id` of `owner`, kept alive by `keeper`.
    pub(super) fn add(&mut self, owner: Owner, id: i64, keeper: AbortHandle) {
        self.leases.insert(
            id,
            Lease {
                owner,
                keys: 0,
                keeper,
            },
        );
        self.by_owner.entry(owner).or_default().push(id);
    }

    /// `keys` more keys on lease `id` (fewer when negative).
    pub(super) fn count(&mut self, id: i64, keys: isize) {
        if let Some(lease) = self.leases.get_mut(&id) {
            lease.keys = lease.keys.saturating_add_signed(keys);
        }
    }

    /// Whether lease `id` is one of ours, live.
    pub(super) fn knows(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// Whose lease `id` is.
    pub(super) fn owner(&self, id: i64) -> Option<Owner> {
        self.leases.get(&id).map(|lease| lease.owner)
    }

    /// Forgets the leases of `owner`, stops keeping them alive, and returns
    /// them, to revoke.
    pub(super) fn remove_owner(&mut self, owner: Owner) -> Vec<i64> {
        let ids = self.by_owner.remove(&owner).unwrap_or_default();
        for id in &ids {
            if let Some(lease) = self.leases.remove(id) {
                lease.keeper.abort();
            }
        }
        ids
    }

    /// Number of leases kept alive.
    pub(super) fn len(&self) -> usize {
        self.leases.len()
    }

    /// Forgets lease `id` (it is lost), and stops keeping it alive.
    pub(super) fn forget(&mut self, id: i64) {
        if let Some(lease) = self.leases.remove(&id) {
            lease.keeper.abort();
            if let Some(ids) = self.by_owner.get_mut(&lease.owner) {
                ids.retain(|other| *other != id);
            }
        }
    }

    /// Forgets every lease (they are lost), and stops keeping them alive.
    pub(super) fn clear(&mut self) {
        for lease in self.leases.values() {
            lease.keeper.abort();
        }
        self.leases.clear();
        self.by_owner.clear();
    }
}

/// Keeps lease `id` alive, renewing it every `every`, until aborted; says
/// on `lost` when etcd no longer has it (it expired while etcd could not be
/// reached, or was revoked).
pub(super) async fn keep(
    mut client: Client,
    id: i64,
    every: Duration,
    lost: mpsc::UnboundedSender<i64>,
) {
    let mut retry = Duration::from_millis(100);
    loop {
        match client.lease_keep_alive(id).await {
            Ok((mut keeper, mut responses)) => {
                retry = Duration::from_millis(100);
                loop {
                    tokio::time::sleep(every).await;
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(every, responses.message()).await {
                        Ok(Ok(Some(response))) if response.ttl() <= 0 => {
                            let _ = lost.send(id);
                            return;
                        }
                        Ok(Ok(Some(_))) => {}
                        Ok(Ok(None) | Err(_)) | Err(_) => break,
                    }
                }
            }
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => {
                // "lease not found": it is gone.
                let _ = lost.send(id);
                return;
            }
            Err(e) => {
                tracing::debug!(lease = id, "cannot renew a lease: {e}");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(every);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle() -> AbortHandle {
        tokio::spawn(std::future::pending::<()>()).abort_handle()
    }

    #[tokio::test]
    async fn a_connection_gets_another_lease_when_its_newest_is_full() {
        let mut leases = Leases::default();
        let owner = Owner(7);
        assert_eq!(leases.with_room(owner, 1), None);
        leases.add(owner, 1, idle());
        assert_eq!(leases.with_room(owner, 2), Some(1));
        leases.count(1, KEYS_PER_LEASE as isize - 1);
        assert_eq!(leases.with_room(owner, 1), Some(1));
        assert_eq!(leases.with_room(owner, 2), None);
        assert_eq!(leases.room(1), 1);
        leases.add(owner, 2, idle());
        assert_eq!(leases.with_room(owner, 2), Some(2));
        assert_eq!(leases.owner(2), Some(owner));
        assert_eq!(leases.remove_owner(owner), vec![1, 2]);
        assert!(!leases.knows(1) && !leases.knows(2));
    }
}
