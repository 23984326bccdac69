//! Thread heaps grown once, up front: [`grow_thread_arena`].
//!
//! glibc's allocator gives each thread an arena: a heap reserved inaccessible and made
//! accessible, with an `mprotect` call, as it grows. A thread that allocates small values grows
//! its heap a page or two at a time, so it makes one `mprotect` call per page at first. Each call
//! takes the process's address-space lock for writing, which every other thread's page fault
//! waits for. Starting 10,000 accounts grew the host's and the plugin's thread heaps by about
//! 16 MB, in 4,000 such calls.
//!
//! The accessible part of a heap does not shrink back: when a heap gives memory back to the
//! system it releases the pages (`madvise`), and the range stays accessible. So growing a thread's
//! heap once, up front, with large blocks that are freed at once, makes its later growth (up to
//! that size) free of those calls. It costs no memory: the blocks' pages were never written to,
//! but for each block's header, and the heap gives them back as it gives back any free top
//! beyond its usual reserve.

/// How far [`grow_thread_arena`] grows a thread's heap: three quarters of the most one heap can
/// hold (64 MiB). A busy thread's heap grew by about 5 MB while 10,000 accounts started, and by
/// far more while 100,000 did: there a growth of 16 MiB left about 25,000 `mprotect` calls to
/// make, this one about 12,700 (over half of them in the one thread whose heap outgrew 64 MiB).
pub const THREAD_ARENA_GROWTH: usize = 48 << 20;

/// The size of each block: under glibc's smallest threshold for serving a block with its own
/// `mmap` (128 KiB), so every block comes from the thread's heap.
const BLOCK: usize = 120 << 10;

/// Grows the calling thread's glibc heap by [`THREAD_ARENA_GROWTH`] and gives the memory back at
/// once, so that the heap's later growth up to that size makes no system call. It makes about 410
/// `mprotect` calls once (about 2 ms); on a heap already grown that far, none.
///
/// Meant for a runtime's thread start (`tokio::runtime::Builder::on_thread_start`): the SDK's
/// runtime calls it on each of its threads, and the host on each of its own. It does nothing on
/// other C libraries, and has no lasting effect on the main thread, whose heap grows differently.
pub fn grow_thread_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let count = THREAD_ARENA_GROWTH.div_ceil(BLOCK);
        let blocks: Vec<Box<[std::mem::MaybeUninit<u8>]>> =
            (0..count).map(|_| Box::new_uninit_slice(BLOCK)).collect();
        // Seen to be used, so the compiler keeps the allocations it could otherwise leave out.
        std::hint::black_box(&blocks);
        // Freed together, the blocks merge into the heap's free top, which the allocator gives
        // back to the system (keeping the range accessible).
        drop(blocks);
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::{THREAD_ARENA_GROWTH, grow_thread_arena};

    /// The mapping of this process that holds `address`: its size, and how much of it is resident
    /// (`/proc/self/smaps`).
    fn mapping_of(address: usize) -> (usize, usize) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("reading /proc/self/smaps");
        let mut lines = smaps.lines();
        while let Some(line) = lines.next() {
            let Some((start, end)) = line
                .split_whitespace()
                .next()
                .and_then(|range| range.split_once('-'))
                .and_then(|(a, b)| {
                    Some((
                        usize::from_str_radix(a, 16).ok()?,
                        usize::from_str_radix(b, 16).ok()?,
                    ))
                })
            else {
                continue;
            };
            if !(start..end).contains(&address) {
                continue;
            }
            let rss_kib = lines
                .by_ref()
                .find_map(|l| l.strip_prefix("Rss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
                .expect("an Rss line for the mapping");
            return (end - start, rss_kib * 1024);
        }
        panic!("no mapping holds {address:#x}");
    }

    /// On a thread of its own (a heap of its own), the heap is accessible to the growth's size
    /// afterwards, and the growth left almost nothing resident.
    #[test]
    fn a_grown_thread_heap_is_accessible_to_its_size_and_not_resident() {
        let (before, after) = std::thread::spawn(|| {
            // A value on the thread's own heap: larger than glibc's per-thread cache serves (a
            // small one may be a block another thread freed here, from another heap).
            let probe = std::hint::black_box(vec![1u8; 4096]);
            let before = mapping_of(probe.as_ptr() as usize);
            grow_thread_arena();
            (before, mapping_of(probe.as_ptr() as usize))
        })
        .join()
        .expect("the probe thread");
        let ((_, resident_before), (size, resident)) = (before, after);
        assert!(
            size >= THREAD_ARENA_GROWTH,
            "the thread's heap is {size} bytes accessible, not grown to {THREAD_ARENA_GROWTH}"
        );
        assert!(
            resident.saturating_sub(resident_before) < 1 << 20,
            "growing the heap left {resident} bytes resident, {resident_before} before"
        );
    }
}
