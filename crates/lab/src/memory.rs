//! Heap accounting per node, for `cleanroom bench`.
//!
//! The bench runs both nodes in one process, so the process's peak resident
//! memory mixes them. The `cleanroom` binary installs the
//! [`tracking_allocator`] global allocator, which keeps in a header before
//! each block the allocation group of the thread that made it, so a block is
//! credited back to the same group when freed, whichever thread frees it.
//! The bench gives each node its own runtime whose threads enter the node's
//! group ([`node_runtime`]); everything else (the bench itself, rayon's
//! worker threads, which serve both nodes) is [`Tag::Shared`].
//!
//! Tracking is off unless [`enable`] is called (only the bench does); the
//! allocator then only adds its 8-byte header to each block.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};

use tracking_allocator::{AllocationGroupId, AllocationGroupToken, AllocationRegistry, AllocationTracker};

/// Whose allocation it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// Not a node's thread: the bench, the analyst, rayon workers.
    Shared = 0,
    /// The bank node's threads.
    Bank = 1,
    /// The platform node's threads.
    Platform = 2,
}

const TAGS: usize = 3;
/// Allocation groups that can be mapped to a tag (one per node thread ever
/// started); later groups count as shared.
const GROUPS: usize = 1 << 16;

static CURRENT: [AtomicI64; TAGS] = [AtomicI64::new(0), AtomicI64::new(0), AtomicI64::new(0)];
static PEAK: [AtomicI64; TAGS] = [AtomicI64::new(0), AtomicI64::new(0), AtomicI64::new(0)];
static GROUP_TAG: [AtomicU8; GROUPS] = [const { AtomicU8::new(0) }; GROUPS];
static ENABLED: AtomicBool = AtomicBool::new(false);

fn tag_of(group: &AllocationGroupId) -> usize {
    GROUP_TAG
        .get(group.as_usize().get())
        .map_or(0, |t| usize::from(t.load(Ordering::Relaxed)))
        .min(TAGS - 1)
}

fn account(tag: usize, delta: i64) {
    if let (Some(cur), Some(peak)) = (CURRENT.get(tag), PEAK.get(tag)) {
        let now = cur.fetch_add(delta, Ordering::Relaxed) + delta;
        if delta > 0 {
            peak.fetch_max(now, Ordering::Relaxed);
        }
    }
}

struct Counter;

impl AllocationTracker for Counter {
    fn allocated(&self, _addr: usize, object_size: usize, _wrapped: usize, group: AllocationGroupId) {
        account(tag_of(&group), i64::try_from(object_size).unwrap_or(i64::MAX));
    }
    fn deallocated(
        &self,
        _addr: usize,
        object_size: usize,
        _wrapped: usize,
        source: AllocationGroupId,
        _current: AllocationGroupId,
    ) {
        account(tag_of(&source), -i64::try_from(object_size).unwrap_or(i64::MAX));
    }
}

/// Starts counting (once per process). In a binary without the tracking
/// allocator nothing is ever counted (the peaks stay 0).
pub fn enable() {
    if !ENABLED.swap(true, Ordering::SeqCst) {
        let _ = AllocationRegistry::set_global_tracker(Counter);
        AllocationRegistry::enable_tracking();
    }
}

/// Makes the calling thread's allocations count for `tag` from now on, for
/// the rest of its life.
pub fn tag_thread(tag: Tag) {
    let Some(token) = AllocationGroupToken::register() else {
        return;
    };
    if let Some(t) = GROUP_TAG.get(token.id().as_usize().get()) {
        t.store(tag as u8, Ordering::Relaxed);
    }
    // The group stays entered until the thread ends: the token lives as long
    // as the process and its guard is never dropped.
    let token: &'static mut AllocationGroupToken = Box::leak(Box::new(token));
    std::mem::forget(token.enter());
}

/// A multi-threaded runtime whose threads (workers and blocking pool) count
/// their allocations for `tag`.
///
/// # Errors
/// When the runtime cannot be built.
pub fn node_runtime(tag: Tag, workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name(match tag {
            Tag::Bank => "bank",
            Tag::Platform => "platform",
            Tag::Shared => "shared",
        })
        .on_thread_start(move || tag_thread(tag))
        .enable_all()
        .build()
}

/// Peak live heap bytes of `tag` since the last [`reset_peaks`].
pub fn peak_bytes(tag: Tag) -> u64 {
    PEAK.get(tag as usize)
        .map_or(0, |p| u64::try_from(p.load(Ordering::Relaxed)).unwrap_or(0))
}

/// Starts new peak measurements from the current levels.
pub fn reset_peaks() {
    for (cur, peak) in CURRENT.iter().zip(&PEAK) {
        peak.store(cur.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// The process's CPU time so far (all threads, user and system), seconds.
pub fn process_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    #[allow(clippy::cast_precision_loss)]
    let s = t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9;
    s
}
