//! The certificate store: one certificate and key per identity of this node's pods, issued on
//! demand through a [`Signer`] and rotated in the background at about half-life.
//!
//! A failed rotation (the CA unreachable) keeps the current certificate in use and is tried
//! again with exponential backoff.
//!
//! Each identity's current certificate sits behind an `ArcSwap`: a handshake loads it once,
//! so a rotation only affects handshakes that start after it; established connections keep
//! the keys they negotiated.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use rustls::{
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use tokio::{sync::Notify, task::JoinHandle, time::Instant};

use super::{
    bundle::TrustBundle,
    ca::{CaError, DEFAULT_LEAF_LIFETIME, Signer},
    cert::{self, CertError, CertInfo},
    identity::SpiffeId,
    provider,
};

/// How long the rotation task sleeps at most between looks at the store.
const MAX_ROTATION_SLEEP: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("generating a key for {identity}: {reason}")]
    KeyGen { identity: SpiffeId, reason: String },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("the CA returned an empty chain for {0}")]
    EmptyChain(SpiffeId),
    #[error("the CA returned an unusable certificate for {identity}: {source}")]
    BadLeaf {
        identity: SpiffeId,
        source: CertError,
    },
    #[error("the CA returned a certificate for {got} when asked for {wanted}")]
    WrongIdentity { wanted: SpiffeId, got: SpiffeId },
    #[error("the CA returned a certificate rustls cannot use for {identity}: {reason}")]
    Unusable { identity: SpiffeId, reason: String },
    #[error("no certificate for {0} (call CertStore::ensure first)")]
    NotIssued(SpiffeId),
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Requested leaf lifetime (the signer may shorten it).
    pub lifetime: Duration,
    /// After a failed rotation, try again this much later, doubling with each failure in a
    /// row up to `max_retry_after` (give or take a tenth), so a CA coming back is not met by
    /// every node at once.
    pub retry_after: Duration,
    pub max_retry_after: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            lifetime: DEFAULT_LEAF_LIFETIME,
            retry_after: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

/// One issued certificate with its key, as rustls uses it.
pub(crate) struct Issued {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) info: CertInfo,
}

struct Entry {
    current: ArcSwap<Issued>,
    rotate_at: Mutex<Instant>,
    /// Rotations failed in a row (the backoff's exponent).
    failures: Mutex<u32>,
}

pub struct CertStore {
    signer: Arc<dyn Signer>,
    bundle: ArcSwap<TrustBundle>,
    options: StoreOptions,
    entries: Mutex<HashMap<SpiffeId, Arc<Entry>>>,
    /// Wakes the rotation task when an entry is added or replaced.
    changed: Arc<Notify>,
}

impl CertStore {
    pub fn new(signer: Arc<dyn Signer>, bundle: TrustBundle, options: StoreOptions) -> Arc<Self> {
        Arc::new(Self {
            signer,
            bundle: ArcSwap::from_pointee(bundle),
            options,
            entries: Mutex::new(HashMap::new()),
            changed: Arc::new(Notify::new()),
        })
    }

    /// The roots peers are verified against, read by every handshake.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// Replaces the trust bundle; handshakes from now on use the new one.
    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.bundle.store(Arc::new(bundle));
    }

    /// Makes sure `identity` has a certificate, issuing one if needed.
    pub async fn ensure(&self, identity: &SpiffeId) -> Result<CertInfo, StoreError> {
        if let Some(entry) = self.entries.lock().get(identity) {
            return Ok(entry.current.load().info.clone());
        }
        let issued = self.issue(identity).await?;
        let info = issued.info.clone();
        let rotate_at = rotation_instant(&info);
        let mut entries = self.entries.lock();
        // Two concurrent first calls: keep the one that got in first.
        if let Some(entry) = entries.get(identity) {
            return Ok(entry.current.load().info.clone());
        }
        entries.insert(
            identity.clone(),
            Arc::new(Entry {
                current: ArcSwap::from_pointee(issued),
                rotate_at: Mutex::new(rotate_at),
                failures: Mutex::new(0),
            }),
        );
        drop(entries);
        self.changed.notify_one();
        Ok(info)
    }

    /// Issues a new certificate for `identity` now and installs it (new handshakes use it).
    pub async fn rotate_now(&self, identity: &SpiffeId) -> Result<CertInfo, StoreError> {
        let entry = self
            .entry(identity)
            .ok_or_else(|| StoreError::NotIssued(identity.clone()))?;
        let issued = self.issue(identity).await?;
        let info = issued.info.clone();
        install(&entry, issued);
        self.changed.notify_one();
        Ok(info)
    }

    /// Forgets an identity (its last pod left). Handshakes already started keep their copy.
    pub fn remove(&self, identity: &SpiffeId) -> bool {
        self.entries.lock().remove(identity).is_some()
    }

    /// The current certificates, by identity, for the admin API.
    pub fn list(&self) -> Vec<CertInfo> {
        let mut list: Vec<CertInfo> = self
            .entries
            .lock()
            .values()
            .map(|entry| entry.current.load().info.clone())
            .collect();
        list.sort_by(|a, b| a.identity.cmp(&b.identity));
        list
    }

    /// The current certificate of `identity`, if issued.
    pub fn info(&self, identity: &SpiffeId) -> Option<CertInfo> {
        self.entry(identity)
            .map(|entry| entry.current.load().info.clone())
    }

    /// What a handshake presents for `identity`.
    pub(crate) fn certified_key(&self, identity: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        self.entry(identity)
            .map(|entry| entry.current.load().key.clone())
    }

    /// Starts the rotation task: each certificate is replaced at half its lifetime, give or
    /// take a tenth (jitter, so a node's certificates and the CA's load spread out). Failed
    /// rotations are retried after `retry_after`. The task ends when the store is dropped;
    /// aborting the handle stops it sooner.
    pub fn spawn_rotation(self: &Arc<Self>) -> JoinHandle<()> {
        let store = Arc::downgrade(self);
        let changed = self.changed.clone();
        tokio::spawn(rotation_loop(store, changed))
    }

    fn entry(&self, identity: &SpiffeId) -> Option<Arc<Entry>> {
        self.entries.lock().get(identity).cloned()
    }

    /// A fresh P-256 key, signed by the signer, checked, ready for rustls.
    async fn issue(&self, identity: &SpiffeId) -> Result<Issued, StoreError> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| StoreError::KeyGen {
                identity: identity.clone(),
                reason: e.to_string(),
            })?;
        let chain = self
            .signer
            .sign(
                identity,
                &key.subject_public_key_info(),
                self.options.lifetime,
            )
            .await?;
        let leaf = chain
            .first()
            .ok_or_else(|| StoreError::EmptyChain(identity.clone()))?;
        // Trust but verify: a central CA answering for the wrong identity must not make this
        // node present it.
        let info = cert::cert_info(leaf).map_err(|source| StoreError::BadLeaf {
            identity: identity.clone(),
            source,
        })?;
        if &info.identity != identity {
            return Err(StoreError::WrongIdentity {
                wanted: identity.clone(),
                got: info.identity,
            });
        }
        let unusable = |reason: String| StoreError::Unusable {
            identity: identity.clone(),
            reason,
        };
        let private_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = provider()
            .key_provider
            .load_private_key(private_key)
            .map_err(|e| unusable(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing_key);
        certified
            .keys_match()
            .map_err(|e| unusable(e.to_string()))?;
        Ok(Issued {
            key: Arc::new(certified),
            info,
        })
    }
}

fn install(entry: &Entry, issued: Issued) {
    let rotate_at = rotation_instant(&issued.info);
    entry.current.store(Arc::new(issued));
    *entry.rotate_at.lock() = rotate_at;
    *entry.failures.lock() = 0;
}

/// The wait after `failures` failed rotations in a row: `first`, doubled for each further
/// failure up to `max`, give or take a tenth.
fn retry_delay(first: Duration, max: Duration, failures: u32) -> Duration {
    let doubled = first.saturating_mul(1 << failures.saturating_sub(1).min(20));
    doubled.min(max).mul_f64(0.9 + fastrand::f64() * 0.2)
}

/// Half-life, plus or minus a tenth of the lifetime.
fn rotation_instant(info: &CertInfo) -> Instant {
    let lifetime = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    let tenth = lifetime / 10;
    let jitter = tenth.mul_f64(fastrand::f64() * 2.0);
    let at = info.not_before + lifetime / 2 - tenth + jitter;
    let from_now = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now() + from_now
}

async fn rotation_loop(store: Weak<CertStore>, changed: Arc<Notify>) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        // Register before looking, so a change during the pass is not missed.
        notified.as_mut().enable();
        let next = {
            let Some(store) = store.upgrade() else {
                return;
            };
            let now = Instant::now();
            let entries: Vec<(SpiffeId, Arc<Entry>)> = store
                .entries
                .lock()
                .iter()
                .map(|(id, entry)| (id.clone(), entry.clone()))
                .collect();
            let mut next = now + MAX_ROTATION_SLEEP;
            for (identity, entry) in entries {
                let due = *entry.rotate_at.lock();
                if due > now {
                    next = next.min(due);
                    continue;
                }
                match store.issue(&identity).await {
                    Ok(issued) => {
                        tracing::info!(
                            %identity,
                            serial = %issued.info.serial,
                            "rotated certificate"
                        );
                        install(&entry, issued);
                    }
                    Err(error) => {
                        let failures = {
                            let mut failures = entry.failures.lock();
                            *failures = failures.saturating_add(1);
                            *failures
                        };
                        let options = &store.options;
                        let delay =
                            retry_delay(options.retry_after, options.max_retry_after, failures);
                        let expires = entry.current.load().info.not_after;
                        tracing::warn!(
                            %identity,
                            %error,
                            failures,
                            retry_in = ?delay,
                            expires_in = ?expires.duration_since(SystemTime::now()).unwrap_or_default(),
                            "certificate rotation failed; the current certificate stays in use"
                        );
                        *entry.rotate_at.lock() = Instant::now() + delay;
                    }
                }
                let due = *entry.rotate_at.lock();
                next = next.min(due);
            }
            next
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = notified => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::retry_delay;

    #[test]
    fn retries_back_off_up_to_the_cap() {
        let (first, max) = (Duration::from_secs(10), Duration::from_secs(300));
        let within = |d: Duration, of: Duration| d >= of.mul_f64(0.9) && d <= of.mul_f64(1.1);
        for (failures, expected) in [(1, 10), (2, 20), (3, 40), (5, 160), (6, 300), (60, 300)] {
            let delay = retry_delay(first, max, failures);
            assert!(
                within(delay, Duration::from_secs(expected)),
                "{failures} failures: {delay:?}"
            );
        }
    }
}
