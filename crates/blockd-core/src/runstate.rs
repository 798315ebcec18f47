//! The server-wide run state: `running` or `paused` (`stop`/`cont`).
//!
//! QEMU pauses guest I/O on `stop`; blockd has no guest, so the run state is
//! what device front ends (NBD exports of backends) consult before issuing
//! I/O: they wait while paused. The state lives in a `watch` channel so
//! waiters wake when it changes, without polling.

use tokio::sync::watch;

/// QEMU's `RunState` values that blockd can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// I/O flows.
    Running,
    /// Stopped by `stop`; I/O from front ends waits.
    Paused,
    /// Stopped because a backend's error policy said `stop`; `cont`
    /// resumes (and retries the failed requests).
    IoError,
}

impl RunStatus {
    /// The wire name (`RunState` enum of QAPI).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Paused => "paused",
            RunStatus::IoError => "io-error",
        }
    }
}

/// Shared run state with change notification.
#[derive(Debug)]
pub struct RunState {
    tx: watch::Sender<RunStatus>,
}

impl Default for RunState {
    fn default() -> Self {
        RunState {
            tx: watch::Sender::new(RunStatus::Running),
        }
    }
}

impl RunState {
    /// The current status.
    pub fn get(&self) -> RunStatus {
        *self.tx.borrow()
    }

    /// Sets the status; returns whether it changed (QEMU sends `STOP` and
    /// `RESUME` only on a change).
    pub fn set(&self, s: RunStatus) -> bool {
        self.tx.send_if_modified(|cur| {
            let changed = *cur != s;
            *cur = s;
            changed
        })
    }

    /// Stops with `status` if running; returns whether it was running
    /// (QEMU's `vm_stop`: only a running VM stops, and only then is `STOP`
    /// sent; a stopped one keeps its state).
    pub fn stop(&self, status: RunStatus) -> bool {
        self.tx.send_if_modified(|cur| {
            if *cur != RunStatus::Running {
                return false;
            }
            *cur = status;
            true
        })
    }

    /// Waits until the state is `Running`.
    pub async fn wait_running(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|s| *s == RunStatus::Running).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn set_reports_changes_only() {
        let r = RunState::default();
        assert_eq!(r.get(), RunStatus::Running);
        assert!(!r.set(RunStatus::Running));
        assert!(r.set(RunStatus::Paused));
        assert!(!r.set(RunStatus::Paused));
        assert_eq!(r.get().as_str(), "paused");
    }

    #[test]
    fn stop_only_stops_a_running_server() {
        let r = RunState::default();
        assert!(r.stop(RunStatus::IoError));
        assert_eq!(r.get(), RunStatus::IoError);
        assert!(!r.stop(RunStatus::Paused));
        assert_eq!(r.get().as_str(), "io-error");
        assert!(r.set(RunStatus::Running));
    }

    #[tokio::test]
    async fn waiters_wake_on_cont() {
        let r = Arc::new(RunState::default());
        r.set(RunStatus::Paused);
        let r2 = r.clone();
        let waiter = tokio::spawn(async move { r2.wait_running().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        r.set(RunStatus::Running);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("waiter woke")
            .unwrap();
    }
}
