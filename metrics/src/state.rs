//! The replica's state machine, in one place: every part of a process that changes what the
//! replica is doing says so here, with the cause, and the change is logged once.
//!
//! ```text
//!  starting ──► protected ◄──────── joining ◄── (a backup started with --join)
//!     │            │  ▲                              
//!     ▼            ▼  │ a backup joined              
//!  unprotected ◄───┴──┘    (primary: lost its backup and won the arbiter)
//!     ▲
//!  taking-over ◄── protected (backup: the log ended; asking the arbiter)
//!  deposed  ◄── any live or taking-over state that lost the arbiter (halts)
//!  stopped  ◄── any (SIGTERM, guest halted, error)
//! ```

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// What a replica is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Creating its VM, connecting, asking the arbiter.
    Starting,
    /// A backup taking a running primary's state.
    Joining,
    /// The pair is in lock-step: the primary's outputs wait for the backup's ACKs.
    Protected,
    /// A primary serving alone (no backup has the log).
    Unprotected,
    /// A backup whose log ended, asking the arbiter whether to go live.
    TakingOver,
    /// Another replica holds a newer epoch: this one halts.
    Deposed,
    /// Ended (told to stop, the guest halted, or an error).
    Stopped,
}

impl ReplicaState {
    /// Every state, in the order of the `ftvm_replica_state` series.
    pub const ALL: [ReplicaState; 7] = [
        ReplicaState::Starting,
        ReplicaState::Joining,
        ReplicaState::Protected,
        ReplicaState::Unprotected,
        ReplicaState::TakingOver,
        ReplicaState::Deposed,
        ReplicaState::Stopped,
    ];

    /// The state's name as shown and exported.
    pub fn name(self) -> &'static str {
        match self {
            ReplicaState::Starting => "starting",
            ReplicaState::Joining => "joining",
            ReplicaState::Protected => "protected",
            ReplicaState::Unprotected => "unprotected",
            ReplicaState::TakingOver => "taking-over",
            ReplicaState::Deposed => "deposed",
            ReplicaState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The part a process plays in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Not decided yet (a node before the arbiter answered).
    None,
    /// Runs the guest live.
    Primary,
    /// Replays the primary's log.
    Backup,
}

impl Role {
    /// The role's name as shown and exported.
    pub fn name(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

/// The replica's state, role, epoch and peer at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StateView {
    pub state: ReplicaState,
    pub role: Role,
    pub epoch: u64,
    /// The other replica (its log address), if there is one.
    pub peer: Option<String>,
    /// Why the state last changed.
    pub cause: String,
    /// When the state last changed, ms since the Unix epoch.
    pub since_unix_ms: u64,
    /// When the pair last became protected, while it still is.
    pub protected_since_unix_ms: Option<u64>,
    /// State changes so far.
    pub transitions: u64,
}

/// Holds the state; changes are rare (a few per failure), so a mutex does.
#[derive(Debug)]
pub struct StateCell(Mutex<StateView>);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Default for StateCell {
    fn default() -> Self {
        Self::new()
    }
}

impl StateCell {
    /// Starting, no role, epoch 0.
    pub const fn new() -> Self {
        StateCell(Mutex::new(StateView {
            state: ReplicaState::Starting,
            role: Role::None,
            epoch: 0,
            peer: None,
            cause: String::new(),
            since_unix_ms: 0,
            protected_since_unix_ms: None,
            transitions: 0,
        }))
    }

    fn with<T>(&self, f: impl FnOnce(&mut StateView) -> T) -> T {
        // A panic while holding the lock leaves a consistent view: every field is plain data.
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Moves to `state` as `role` in `epoch`, because of `cause`; logs the change (a repeat of
    /// the current state with the same role and epoch changes nothing and logs nothing).
    pub fn set(&self, state: ReplicaState, role: Role, epoch: u64, cause: &str) {
        self.with(|v| {
            if v.state == state && v.role == role && v.epoch == epoch && v.transitions > 0 {
                return;
            }
            tracing::info!(
                "replica state: {} -> {} ({} in epoch {epoch}): {cause}",
                v.state,
                state,
                role.name()
            );
            let now = unix_ms();
            if state == ReplicaState::Protected {
                if v.state != ReplicaState::Protected {
                    v.protected_since_unix_ms = Some(now);
                }
            } else {
                v.protected_since_unix_ms = None;
            }
            v.state = state;
            v.role = role;
            v.epoch = epoch;
            v.cause = cause.to_owned();
            v.since_unix_ms = now;
            v.transitions += 1;
        });
    }

    /// Sets the peer (`None`: there is none).
    pub fn set_peer(&self, peer: Option<String>) {
        self.with(|v| v.peer = peer);
    }

    /// The state now.
    pub fn view(&self) -> StateView {
        self.with(|v| v.clone())
    }

    /// The role now.
    pub fn role(&self) -> Role {
        self.with(|v| v.role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_since_is_kept_while_protected_and_cleared_after() {
        let s = StateCell::new();
        assert_eq!(s.view().state, ReplicaState::Starting);
        s.set(
            ReplicaState::Protected,
            Role::Primary,
            1,
            "backup connected",
        );
        let first = s.view();
        assert_eq!(first.transitions, 1);
        assert!(first.protected_since_unix_ms.is_some());
        // The same state again changes nothing.
        s.set(ReplicaState::Protected, Role::Primary, 1, "again");
        assert_eq!(s.view().transitions, 1);
        assert_eq!(s.view().cause, "backup connected");
        s.set(
            ReplicaState::Unprotected,
            Role::Primary,
            2,
            "lost the backup",
        );
        let v = s.view();
        assert_eq!(v.state, ReplicaState::Unprotected);
        assert_eq!(v.epoch, 2);
        assert_eq!(v.protected_since_unix_ms, None);
        assert_eq!(v.transitions, 2);
    }

    #[test]
    fn names_are_the_exported_ones() {
        let names: Vec<_> = ReplicaState::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "starting",
                "joining",
                "protected",
                "unprotected",
                "taking-over",
                "deposed",
                "stopped"
            ]
        );
        assert_eq!(
            serde_json::to_string(&ReplicaState::TakingOver).unwrap_or_default(),
            "\"taking-over\""
        );
    }
}
