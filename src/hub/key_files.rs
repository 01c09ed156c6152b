//! Where a hub reads its keys from, at start and again on every reload: its
//! own keypair, the authorized keys, the admin keys and the hub keys.

use super::{Hub, HubConfig};
use crate::protocol::keys::{Authorized, KeyError, KeyFile, Keypair, load_key_file};
use std::path::PathBuf;

/// The key files of a hub, as the command line names them.
#[derive(Debug, Clone, Default)]
pub struct KeyFiles {
    /// Files as the Node CLI takes them: a JSON array is a list of authorized
    /// public keys; a keypair is the hub's own.
    pub files: Vec<PathBuf>,
    /// Authorized keys: files or directories of public keys.
    pub authorized: Vec<PathBuf>,
    /// Admin keys: they may also free any record.
    pub admin: Vec<PathBuf>,
    /// Hub keys: on a secured hub only they may write `seaport` records.
    pub hubs: Vec<PathBuf>,
}

/// The keys read from [`KeyFiles`].
#[derive(Debug, Clone, Default)]
pub struct HubKeys {
    /// Keys allowed to write (empty: everyone may).
    pub authorized: Authorized,
    /// Keys that may also free any record.
    pub admin: Authorized,
    /// Keys of hubs.
    pub hubs: Authorized,
    /// The hub's own keypair, if one of the files holds one.
    pub keypair: Option<Keypair>,
}

impl KeyFiles {
    /// Reads every file; the first that cannot be used is the error, and so
    /// is `--authorized` naming files and directories that hold no key
    /// (a directory of `*.PEM`, a list `[]`): an empty list opens the hub to
    /// every writer, which a hub given `--authorized` was not meant to be.
    pub fn load(&self) -> Result<HubKeys, KeyError> {
        let mut public = Vec::new();
        let mut keypair = None;
        for file in &self.files {
            match load_key_file(file)? {
                KeyFile::Authorized(keys) => public.extend(keys),
                KeyFile::Keypair(pair) => keypair = Some(*pair),
            }
        }
        let listed = Authorized::load(&self.authorized)?;
        if !self.authorized.is_empty() && listed.is_empty() {
            let named: Vec<String> = self
                .authorized
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            return Err(KeyError {
                path: named.join(", "),
                reason: "--authorized names no key (files: rsa-json, PEM; directories: their \
                         *.json, *.pem and *.pub files), and no key would leave the hub open \
                         to every writer; leave --authorized out for an open hub"
                    .into(),
            });
        }
        Ok(HubKeys {
            authorized: Authorized::new(public).union(listed),
            admin: Authorized::load(&self.admin)?,
            hubs: Authorized::load(&self.hubs)?,
            keypair,
        })
    }
}

impl HubKeys {
    /// Puts the keys into the configuration of a hub about to start.
    pub fn apply_to(self, config: &mut HubConfig) {
        config.authorized = self.authorized;
        config.admin = self.admin;
        config.hub_keys = self.hubs;
        if self.keypair.is_some() {
            config.keypair = self.keypair;
        }
    }

    /// Logs what the keys allow; `owned`: the hub enforces owners without
    /// keys (`--owned`).
    pub fn log(&self, owned: bool) {
        if self.authorized.is_open() && owned {
            tracing::info!(
                "no authorized keys: every connection may write, and only a record's \
                 owner may change or free it (--owned)"
            );
        } else if self.authorized.is_open() {
            tracing::info!("no authorized keys: every connection may write");
        } else {
            tracing::info!(
                "{} authorized keys: only they may write; anyone may read",
                self.authorized.len()
            );
        }
        if !self.admin.is_empty() {
            tracing::info!("{} admin keys: they may free any record", self.admin.len());
        }
        if !self.hubs.is_empty() {
            tracing::info!("{} hub keys", self.hubs.len());
        }
    }
}

impl KeyFiles {
    /// Reads the files again and puts their keys in force on `hub` (its own
    /// keypair stays as it started); when a file cannot be used, logs why and
    /// keeps the keys in force. A hub with authorized keys is not opened by
    /// a reload that finds none (a key rotation caught between removing the
    /// old key and adding the new one): it keeps the keys in force.
    pub fn reload(&self, hub: &Hub) {
        match self.load() {
            Ok(keys) if keys.authorized.is_open() && hub.secured() => tracing::error!(
                "keeping the keys in force: the key files now list no authorized key, \
                 which would open the hub to every writer"
            ),
            Ok(keys) => {
                tracing::info!("reloaded the keys");
                keys.log(hub.enforces_owners());
                hub.set_keys(keys);
            }
            Err(e) => tracing::error!("keeping the keys in force: {e}"),
        }
    }
}
