//! Throttle groups (QEMU's `block/throttle-groups.c`): members (block
//! backends, `throttle` filter nodes) that share one set of limits and
//! one [`ThrottleState`].
//!
//! A request asks its member to [`intercept`](ThrottleMember::intercept)
//! it. It starts at once if the buckets allow and nothing of its
//! direction is queued at its member; otherwise it queues (FIFO per member
//! and direction) and a timer is armed for the moment the buckets allow
//! the next request. Only one timer per direction is armed in a group at a
//! time (QEMU's `any_timer_armed`); when a request starts, the next one is
//! picked round-robin among the members with queued requests
//! (`schedule_next_request`, `next_throttle_token`), so members share the
//! group's budget fairly. Waiting is on timers only: an idle or fully
//! throttled group uses no CPU.
//!
//! A member in a drained section is [`disable`](ThrottleMember::disable)d
//! (QEMU's `io_limits_disabled`, `throttle_group_restart_tgm`): its queued
//! requests start at once, so a drain never waits out the throttle. A
//! member that leaves the group, or new limits for the group, release or
//! re-time queued requests the same way. Nothing is failed or lost.
//!
//! QEMU restarts only the calling member's timers when limits change;
//! here every member's queue is re-timed against the new limits at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};

use super::config::{Direction, ThrottleConfig};
use super::state::ThrottleState;

static NEXT_MEMBER: AtomicU64 = AtomicU64::new(1);
static NEXT_TIMER: AtomicU64 = AtomicU64::new(1);

/// The throttle groups of a server, by name (QEMU's `throttle_groups`).
/// Groups named by `block_set_io_throttle` live while they have members;
/// groups created as objects are held by their object as well.
#[derive(Default)]
pub struct ThrottleGroups {
    map: Mutex<HashMap<String, Weak<ThrottleGroup>>>,
}

impl ThrottleGroups {
    /// No groups.
    pub fn new() -> Arc<ThrottleGroups> {
        Arc::new(ThrottleGroups::default())
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Weak<ThrottleGroup>>> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, w| w.strong_count() > 0);
        m
    }

    /// The group called `name`, if it exists.
    pub fn get(&self, name: &str) -> Option<Arc<ThrottleGroup>> {
        self.map().get(name).and_then(Weak::upgrade)
    }

    /// The group called `name`, made (without limits) if it does not
    /// exist (QEMU's `throttle_group_incref`).
    pub fn get_or_create(&self, name: &str) -> Arc<ThrottleGroup> {
        let mut m = self.map();
        if let Some(g) = m.get(name).and_then(Weak::upgrade) {
            return g;
        }
        let g = ThrottleGroup::new(name, ThrottleConfig::default());
        m.insert(name.to_string(), Arc::downgrade(&g));
        g
    }

    /// Lifts every group's limits, releasing everything queued (shutdown:
    /// QEMU's `bdrv_drain_all_begin` disables all throttling, so nothing
    /// waits out a throttle on the way out).
    pub fn lift_all(&self) {
        let groups: Vec<Arc<ThrottleGroup>> =
            self.map().values().filter_map(Weak::upgrade).collect();
        for g in groups {
            g.set_config(ThrottleConfig::default());
        }
    }

    /// A new group (an object's), refused if the name is taken (QEMU's
    /// `throttle_group_obj_complete`).
    pub fn create(&self, name: &str, cfg: ThrottleConfig) -> Result<Arc<ThrottleGroup>, String> {
        let mut m = self.map();
        if m.contains_key(name) {
            return Err("A group with this name already exists".into());
        }
        let g = ThrottleGroup::new(name, cfg);
        m.insert(name.to_string(), Arc::downgrade(&g));
        Ok(g)
    }
}

/// A throttle group. See the [module docs](self).
pub struct ThrottleGroup {
    name: String,
    epoch: Instant,
    inner: Mutex<Inner>,
    me: Weak<ThrottleGroup>,
}

impl std::fmt::Debug for ThrottleGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottleGroup")
            .field("name", &self.name)
            .finish()
    }
}

struct Slot {
    id: u64,
    /// Requests waiting, per direction (a sender whose request went away
    /// is skipped when its turn comes).
    queue: [VecDeque<oneshot::Sender<()>>; 2],
    /// Drained sections covering the member (limits do not apply).
    disabled: usize,
    /// The member's armed timer per direction (its generation).
    timer: [Option<u64>; 2],
}

impl Slot {
    fn pending(&self, d: usize) -> bool {
        !self.queue[d].is_empty()
    }
}

struct Inner {
    state: ThrottleState,
    /// In the order they joined: the round-robin order.
    members: Vec<Slot>,
    /// Whose turn it is, per direction (QEMU's `tokens`).
    token: [Option<u64>; 2],
    any_timer_armed: [bool; 2],
}

impl Inner {
    fn pos(&self, id: u64) -> Option<usize> {
        self.members.iter().position(|s| s.id == id)
    }

    fn slot(&mut self, id: u64) -> Option<&mut Slot> {
        self.members.iter_mut().find(|s| s.id == id)
    }

    fn pending(&self, id: u64, d: usize) -> bool {
        self.members
            .iter()
            .find(|s| s.id == id)
            .is_some_and(|s| s.pending(d))
    }

    /// Starts the first live request queued at `id` (QEMU's
    /// `throttle_group_co_restart_queue`); false if none was queued.
    fn restart_queue(&mut self, id: u64, d: usize) -> bool {
        let Some(s) = self.slot(id) else { return false };
        while let Some(tx) = s.queue[d].pop_front() {
            if tx.send(()).is_ok() {
                return true;
            }
        }
        false
    }

    /// The next member to serve (QEMU's `next_throttle_token`).
    fn next_token(&self, id: u64, d: usize) -> u64 {
        let disabled = self
            .members
            .iter()
            .find(|s| s.id == id)
            .is_some_and(|s| s.disabled > 0);
        if disabled && self.pending(id, d) {
            return id;
        }
        let n = self.members.len();
        let Some(start) = self.token[d]
            .and_then(|t| self.pos(t))
            .or_else(|| self.pos(id))
        else {
            return id;
        };
        let mut i = (start + 1) % n;
        while i != start && !self.members[i].pending(d) {
            i = (i + 1) % n;
        }
        if i == start && !self.members[i].pending(d) {
            return id;
        }
        self.members[i].id
    }
}

impl ThrottleGroup {
    fn new(name: &str, cfg: ThrottleConfig) -> Arc<ThrottleGroup> {
        Arc::new_cyclic(|me| ThrottleGroup {
            name: name.to_string(),
            epoch: Instant::now(),
            inner: Mutex::new(Inner {
                state: ThrottleState::new(cfg, 0),
                members: Vec::new(),
                token: [None; 2],
                any_timer_armed: [false; 2],
            }),
            me: me.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's limits.
    pub fn config(&self) -> ThrottleConfig {
        *self.lock().state.config()
    }

    /// How many members the group has.
    pub fn member_count(&self) -> usize {
        self.lock().members.len()
    }

    /// New limits for the whole group (QEMU's `throttle_group_config`);
    /// the buckets start empty and every queued request is re-timed.
    pub fn set_config(&self, cfg: ThrottleConfig) {
        let now = self.now();
        let mut g = self.lock();
        g.state.set_config(cfg, now);
        for d in 0..2 {
            for s in &mut g.members {
                s.timer[d] = None;
            }
            g.any_timer_armed[d] = false;
            self.kick(&mut g, d, now);
        }
    }

    /// Adds a member (QEMU's `throttle_group_register_tgm`).
    pub fn join(self: &Arc<Self>) -> ThrottleMember {
        let id = NEXT_MEMBER.fetch_add(1, Ordering::Relaxed);
        let mut g = self.lock();
        g.members.push(Slot {
            id,
            queue: [VecDeque::new(), VecDeque::new()],
            disabled: 0,
            timer: [None; 2],
        });
        for d in 0..2 {
            if g.token[d].is_none() {
                g.token[d] = Some(id);
            }
        }
        ThrottleMember {
            group: self.clone(),
            id,
        }
    }

    /// Arms `id`'s timer for direction `d` to fire at `at` (ns).
    fn arm(&self, s: &mut Slot, d: usize, at: u64) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime (the server is gone): nobody is left to wait.
            return;
        };
        let gen = NEXT_TIMER.fetch_add(1, Ordering::Relaxed);
        s.timer[d] = Some(gen);
        let (id, me) = (s.id, self.me.clone());
        let deadline = self.epoch + Duration::from_nanos(at);
        rt.spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if let Some(g) = me.upgrade() {
                g.timer_fired(id, d, gen);
            }
        });
    }

    /// QEMU's `timer_cb`: the timer's member may run a request.
    fn timer_fired(&self, id: u64, d: usize, gen: u64) {
        let now = self.now();
        let mut g = self.lock();
        let Some(s) = g.slot(id) else { return };
        if s.timer[d] != Some(gen) {
            return;
        }
        s.timer[d] = None;
        g.any_timer_armed[d] = false;
        if !g.restart_queue(id, d) {
            self.schedule_next(&mut g, id, d, now);
        }
    }

    /// Whether `id`'s next request in `d` must wait; arms the group's
    /// timer if so (QEMU's `throttle_group_schedule_timer`).
    fn schedule_timer(&self, g: &mut Inner, id: u64, d: usize, now: u64) -> bool {
        let Some(pos) = g.pos(id) else { return false };
        if g.members[pos].disabled > 0 {
            return false;
        }
        if g.any_timer_armed[d] {
            return true;
        }
        let dir = Direction::ALL[d];
        let wait = g.state.wait_ns(dir, now);
        if wait == 0 {
            return false;
        }
        if g.members[pos].timer[d].is_none() {
            self.arm(&mut g.members[pos], d, now + wait);
        }
        g.token[d] = Some(id);
        g.any_timer_armed[d] = true;
        true
    }

    /// After a request of `id` started: starts or times the next queued
    /// one, round-robin (QEMU's `schedule_next_request`).
    fn schedule_next(&self, g: &mut Inner, id: u64, d: usize, now: u64) {
        loop {
            let token = g.next_token(id, d);
            if !g.pending(token, d) {
                return;
            }
            if self.schedule_timer(g, token, d, now) {
                return;
            }
            // It may go now; the current member's own queue first.
            if g.restart_queue(id, d) {
                g.token[d] = Some(id);
                return;
            }
            if g.restart_queue(token, d) {
                g.token[d] = Some(token);
                return;
            }
            // Only requests that went away were queued there; look again.
        }
    }

    /// Makes sure someone is served when no timer is armed.
    fn kick(&self, g: &mut Inner, d: usize, now: u64) {
        if g.any_timer_armed[d] {
            return;
        }
        let first = g.members.iter().find(|s| s.pending(d)).map(|s| s.id);
        if let Some(id) = first {
            self.schedule_next(g, id, d, now);
        }
    }

    fn leave(&self, id: u64) {
        let now = self.now();
        let mut g = self.lock();
        let Some(pos) = g.pos(id) else { return };
        let mut s = g.members.remove(pos);
        for d in 0..2 {
            for tx in s.queue[d].drain(..) {
                let _ = tx.send(());
            }
            if g.token[d] == Some(id) {
                g.token[d] = g.members.get(pos % g.members.len().max(1)).map(|s| s.id);
            }
            if s.timer[d].is_some() {
                g.any_timer_armed[d] = false;
                self.kick(&mut g, d, now);
            }
        }
    }

    fn disable(&self, id: u64) {
        let now = self.now();
        let mut g = self.lock();
        let Some(s) = g.slot(id) else { return };
        s.disabled += 1;
        if s.disabled > 1 {
            return;
        }
        for d in 0..2 {
            let s = g.slot(id).expect("looked up above");
            let had_timer = s.timer[d].take().is_some();
            let mut woke = false;
            for tx in s.queue[d].drain(..) {
                woke |= tx.send(()).is_ok();
            }
            if had_timer {
                g.any_timer_armed[d] = false;
            }
            if !woke {
                self.kick(&mut g, d, now);
            }
        }
    }

    fn enable(&self, id: u64) {
        if let Some(s) = self.lock().slot(id) {
            s.disabled = s.disabled.saturating_sub(1);
        }
    }

    async fn intercept(&self, id: u64, dir: Direction, bytes: u64) {
        let d = dir.index();
        let rx = {
            let now = self.now();
            let mut g = self.lock();
            if g.pos(id).is_none() {
                return;
            }
            let must_wait = self.schedule_timer(&mut g, id, d, now);
            if must_wait || g.pending(id, d) {
                let (tx, rx) = oneshot::channel();
                g.slot(id).expect("looked up above").queue[d].push_back(tx);
                Some(rx)
            } else {
                None
            }
        };
        if let Some(rx) = rx {
            // A dropped sender (the member left) lets the request go too.
            let _ = rx.await;
        }
        let now = self.now();
        let mut g = self.lock();
        if g.pos(id).is_none() {
            return;
        }
        g.state.account(dir, bytes, now);
        self.schedule_next(&mut g, id, d, now);
    }
}

/// A member of a throttle group (QEMU's `ThrottleGroupMember`); leaves the
/// group when dropped, releasing its queued requests.
pub struct ThrottleMember {
    group: Arc<ThrottleGroup>,
    id: u64,
}

impl std::fmt::Debug for ThrottleMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottleMember")
            .field("group", &self.group.name)
            .finish()
    }
}

impl ThrottleMember {
    /// The group.
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }

    /// Waits until a request of `bytes` in `dir` may start, and counts it
    /// (QEMU's `throttle_group_co_io_limits_intercept`).
    pub async fn intercept(&self, dir: Direction, bytes: u64) {
        self.group.intercept(self.id, dir, bytes).await
    }

    /// A drained section begins over the member: limits stop applying and
    /// queued requests start at once. Nests.
    pub fn disable(&self) {
        self.group.disable(self.id);
    }

    /// A drained section over the member ended.
    pub fn enable(&self) {
        self.group.enable(self.id);
    }

    /// Leaves the group now: queued requests go at once, later ones are
    /// not limited. (Requests still holding the member would otherwise keep
    /// it in the group until they finish.)
    pub fn leave(&self) {
        self.group.leave(self.id);
    }

    /// Requests queued at this member, per direction (reads, writes).
    pub fn queued(&self) -> [usize; 2] {
        let g = self.group.lock();
        g.members
            .iter()
            .find(|s| s.id == self.id)
            .map(|s| [s.queue[0].len(), s.queue[1].len()])
            .unwrap_or([0, 0])
    }
}

impl Drop for ThrottleMember {
    fn drop(&mut self) {
        self.group.leave(self.id);
    }
}

#[cfg(test)]
mod tests;
