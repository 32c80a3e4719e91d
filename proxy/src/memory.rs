//! Giving memory back after a burst.
//!
//! glibc's allocator keeps what a burst freed: a connection's buffers freed in the middle of
//! the heap stay mapped (only the top of the heap is returned by itself), so a proxy's private
//! memory after a load stays near its peak (4.6-5.5 MB after the side-by-side benchmark's
//! load, of which 1.6-1.8 MB were in use). linkerd2-proxy's jemalloc returns such memory
//! with time; here a task asks glibc to do the same (`malloc_trim`) every
//! [`RELEASE_INTERVAL`], when at least [`RELEASE_THRESHOLD`] more of the resident memory
//! holds nothing than after the last trim (a trim cannot return the part of a page that
//! shares it with a live block, and that part is not tried again and again). Under a steady
//! load nothing new is freed and nothing is done; a trim holds the allocator's lock (and the
//! runtime thread) while it walks the free lists and returns their pages: 0.4-0.8 ms for
//! 2-5 MB in the side-by-side benchmark, at most once per interval.
//!
//! Other C libraries (musl) return memory their own way; there this does nothing.

use std::time::Duration;

/// How often the allocator's free memory is looked at.
pub const RELEASE_INTERVAL: Duration = Duration::from_secs(10);
/// Memory the allocator holds free, still resident, that is worth returning.
pub const RELEASE_THRESHOLD: usize = 1 << 20;

/// The process's private memory against what its allocator has handed out.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Resident private memory (`RssAnon`): the heap, stacks, anonymous mappings.
    pub resident_private: usize,
    /// Bytes handed out by the allocator and not freed (heap and mmap-ed blocks).
    pub in_use: usize,
}

impl Usage {
    /// Resident memory that holds nothing: freed blocks the allocator kept (and, a few
    /// hundred KiB, the threads' stacks).
    pub fn held(&self) -> usize {
        self.resident_private.saturating_sub(self.in_use)
    }
}

/// The process's memory usage, where the allocator reports it.
pub fn usage() -> Option<Usage> {
    let in_use = imp::in_use()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(Usage {
        resident_private: kib * 1024,
        in_use,
    })
}

/// When to give memory back: what a trim could not return is remembered, so that only memory
/// freed since counts.
#[derive(Debug, Default)]
pub struct Releaser {
    /// Resident memory holding nothing that the last trim left (or less, since).
    baseline: usize,
}

impl Releaser {
    /// Returns the allocator's free memory to the system if at least `threshold` more bytes
    /// of resident memory hold nothing than the last trim left. Returns the usage before and
    /// after, when it did.
    pub fn look(&mut self, threshold: usize) -> Option<(Usage, Usage)> {
        let before = usage()?;
        self.baseline = self.baseline.min(before.held());
        if before.held() < self.baseline.saturating_add(threshold) {
            return None;
        }
        imp::trim();
        let after = usage()?;
        self.baseline = after.held();
        Some((before, after))
    }
}

/// Runs for the life of the proxy: a [`Releaser`] looks every [`RELEASE_INTERVAL`].
pub async fn release_periodically() {
    if usage().is_none() {
        return;
    }
    let mut tick = tokio::time::interval(RELEASE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut releaser = Releaser::default();
    loop {
        tick.tick().await;
        let started = std::time::Instant::now();
        if let Some((before, after)) = releaser.look(RELEASE_THRESHOLD) {
            tracing::debug!(
                private_kib_before = before.resident_private / 1024,
                private_kib_after = after.resident_private / 1024,
                in_use_kib = after.in_use / 1024,
                took_us = started.elapsed().as_micros() as u64,
                "returned the allocator's free memory to the system"
            );
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod imp {
    pub fn in_use() -> Option<usize> {
        // SAFETY: mallinfo2 has no preconditions: it takes each arena's lock, sums its
        // chunks and returns a plain struct by value (glibc >= 2.33; the binary already needs
        // 2.34).
        let info = unsafe { libc::mallinfo2() };
        Some(info.uordblks + info.hblkhd)
    }

    pub fn trim() {
        // SAFETY: malloc_trim has no preconditions: under each arena's lock it returns whole
        // free pages to the system (madvise) and leaves every live allocation where it is.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn in_use() -> Option<usize> {
        None
    }

    pub fn trim() {}
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// `mib` MiB in 8 KiB blocks (below the mmap threshold: from the heap, as a connection's
    /// buffers are), each followed by a small block that stays; the big ones are freed, so
    /// they are holes in the middle of the heap, which glibc keeps resident.
    fn burst(mib: usize, pins: &mut Vec<Vec<u8>>) {
        let mut big: Vec<Vec<u8>> = Vec::new();
        for i in 0..mib * 128 {
            big.push(vec![i as u8; 8192]);
            pins.push(vec![1u8; 64]);
        }
        drop(big);
    }

    #[test]
    fn memory_a_burst_freed_goes_back_to_the_system_once() {
        let mut pins = Vec::new();
        let mut releaser = Releaser::default();
        burst(16, &mut pins);
        let held = usage().expect("glibc reports its usage");
        assert!(
            held.held() >= 8 << 20,
            "the freed blocks stay resident: {held:?}"
        );
        assert!(
            releaser.look(usize::MAX).is_none(),
            "below the threshold: nothing done"
        );
        let (before, after) = releaser
            .look(RELEASE_THRESHOLD)
            .expect("above the threshold");
        assert!(
            after.resident_private + (4 << 20) <= before.resident_private,
            "at least 4 of the 16 MiB freed left the process: {before:?} -> {after:?}"
        );
        // What a trim could not return (pages shared with the small blocks) is not tried again.
        assert!(releaser.look(RELEASE_THRESHOLD).is_none(), "{:?}", usage());
        // The next burst's memory goes back too.
        burst(8, &mut pins);
        let (before, after) = releaser.look(RELEASE_THRESHOLD).expect("a new burst");
        assert!(
            after.resident_private + (2 << 20) <= before.resident_private,
            "{before:?} -> {after:?}"
        );
        drop(pins);
    }
}
