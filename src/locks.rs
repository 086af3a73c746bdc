//! Per-key operation locks: one operation at a time per volume (or per CreateVolume
//! name). A second, overlapping operation fails fast with `Busy` (mapped to Aborted,
//! as the CSI spec recommends) instead of queueing behind a slow mkfs or API call.
//! Entries exist only while an operation holds them, so the map never grows with the
//! number of volumes ever seen.

use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an operation is already pending for {key}; retry when it completes")]
pub struct Busy {
    pub key: String,
}

#[derive(Debug, Default, Clone)]
pub struct OperationLocks {
    held: Arc<DashMap<String, ()>>,
}

#[must_use = "the lock is released when the guard is dropped"]
#[derive(Debug)]
pub struct OperationGuard {
    held: Arc<DashMap<String, ()>>,
    key: String,
}

impl OperationLocks {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn try_lock(&self, key: impl Into<String>) -> Result<OperationGuard, Busy> {
        let key = key.into();
        match self.held.entry(key.clone()) {
            Entry::Occupied(_) => Err(Busy { key }),
            Entry::Vacant(v) => {
                v.insert(());
                Ok(OperationGuard {
                    held: self.held.clone(),
                    key,
                })
            }
        }
    }

    /// Like `try_lock`, but waits up to `wait` for the holder to finish: for operations
    /// that take milliseconds (controller decisions), where answering Aborted would cost
    /// the caller its retry back-off (a second or more) for nothing.
    pub async fn lock_within(
        &self,
        key: impl Into<String>,
        wait: std::time::Duration,
    ) -> Result<OperationGuard, Busy> {
        let key = key.into();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.try_lock(key.clone()) {
                Ok(g) => return Ok(g),
                Err(busy) if tokio::time::Instant::now() >= deadline => return Err(busy),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
    }

    pub fn held_count(&self) -> usize {
        self.held.len()
    }
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        self.held.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_same_key_is_busy_until_release() {
        let locks = OperationLocks::new();
        let g = locks.try_lock("volume vol-1").unwrap();
        assert_eq!(
            locks.try_lock("volume vol-1").unwrap_err().key,
            "volume vol-1"
        );
        let other = locks.try_lock("volume vol-2").unwrap();
        drop(g);
        let _again = locks.try_lock("volume vol-1").unwrap();
        drop(other);
        assert_eq!(locks.held_count(), 1);
    }

    #[tokio::test]
    async fn a_bounded_wait_gets_the_lock_once_released_or_gives_up() {
        let locks = OperationLocks::new();
        let g = locks.try_lock("volume vol-1").unwrap();
        let waiting = {
            let locks = locks.clone();
            tokio::spawn(async move {
                locks
                    .lock_within("volume vol-1", std::time::Duration::from_secs(5))
                    .await
                    .map(drop)
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        drop(g);
        waiting
            .await
            .unwrap()
            .expect("granted once the holder finished");
        let _g = locks.try_lock("volume vol-1").unwrap();
        let started = std::time::Instant::now();
        assert!(locks
            .lock_within("volume vol-1", std::time::Duration::from_millis(50))
            .await
            .is_err());
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
    }

    #[test]
    fn racing_threads_get_exactly_one_guard() {
        let locks = OperationLocks::new();
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let locks = locks.clone();
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        barrier.wait();
                        // Hold the guard until every thread has tried.
                        let g = locks.try_lock("k");
                        barrier.wait();
                        usize::from(g.is_ok())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
        assert_eq!(locks.held_count(), 0);
    }
}
