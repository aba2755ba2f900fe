//! The host's TSC frequency, given to TCG guests as `tsc_early_khz`.
//!
//! Under TCG a guest's `rdtsc` reads the host's TSC (QEMU's `cpu_get_host_ticks`), so the
//! guest's TSC runs at the host's rate. A guest kernel that is not told that rate measures
//! it at boot: a quick PIT calibration early in `setup_arch` and, when that fails (one boot
//! in six here, more on a loaded host: TCG's PIT reads are too slow and uneven for it), a
//! second one in `tsc_init` that spins with interrupts off against the PIT and the HPET for
//! 10 + 10 + 50 ms ("tsc: Unable to calibrate against PIT", "using HPET reference
//! calibration"). With `tsc_early_khz` the second never runs. The kernel still refines the
//! frequency against the HPET a second after boot (templates are saved after that), and
//! keeps its own value if ours is more than 1% off.
//!
//! No host interface publishes the TSC's rate (`/proc/cpuinfo`'s "cpu MHz" is the current
//! core clock on hosts with frequency scaling), so it is measured: the TSC against
//! `CLOCK_MONOTONIC` over 2 ms, each end bracketed by clock reads at most 0.5 µs apart
//! (at most 250 ppm off, a few ppm in practice). That costs 2 ms once per process, and
//! only a boot pays it (a clone does not boot).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long the measurement sleeps between its two samples.
const WINDOW: Duration = Duration::from_millis(2);
/// A sample whose TSC read is not bracketed by two clock reads this close together is
/// taken again (the thread was preempted in between).
const MAX_BRACKET: Duration = Duration::from_nanos(500);
/// Tries per sample.
const SAMPLE_TRIES: usize = 20;
/// Plausible TSC rates, in kHz: anything outside is a broken measurement.
const PLAUSIBLE_KHZ: std::ops::RangeInclusive<u128> = 100_000..=20_000_000;

/// The host's TSC frequency in kHz, measured once per process (it sleeps a few ms the
/// first time); `None` when it cannot be measured well or the host is not x86-64.
pub fn host_tsc_khz() -> Option<u32> {
    static KHZ: OnceLock<Option<u32>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let khz = measure();
        match khz {
            Some(khz) => tracing::debug!(khz, "measured the host's TSC frequency"),
            None => tracing::debug!("could not measure the host's TSC frequency"),
        }
        khz
    })
}

/// Measures the TSC against the monotonic clock over [`WINDOW`].
fn measure() -> Option<u32> {
    let (start, start_tsc) = sample()?;
    std::thread::sleep(WINDOW);
    let (end, end_tsc) = sample()?;
    let nanos = end.checked_duration_since(start)?.as_nanos();
    let ticks = u128::from(end_tsc.checked_sub(start_tsc)?);
    let khz = ticks.checked_mul(1_000_000)?.checked_div(nanos)?;
    if PLAUSIBLE_KHZ.contains(&khz) {
        u32::try_from(khz).ok()
    } else {
        None
    }
}

/// One TSC read and the clock's time at it: the middle of two clock reads at most
/// [`MAX_BRACKET`] apart around it.
fn sample() -> Option<(Instant, u64)> {
    for _ in 0..SAMPLE_TRIES {
        let before = Instant::now();
        let tsc = rdtsc()?;
        let after = Instant::now();
        let bracket = after.duration_since(before);
        if bracket <= MAX_BRACKET {
            return Some((before + bracket / 2, tsc));
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
fn rdtsc() -> Option<u64> {
    // SAFETY: `rdtsc` only reads the time-stamp counter; every x86-64 CPU has it, and
    // Linux leaves it readable from user space.
    Some(unsafe { std::arch::x86_64::_rdtsc() })
}

#[cfg(not(target_arch = "x86_64"))]
fn rdtsc() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn two_measurements_of_the_host_tsc_agree() {
        // A measurement can fail on a very busy host (no undisturbed sample); then it
        // says so instead of guessing. Three tries each.
        let measured = || (0..3).find_map(|_| measure()).expect("a TSC measurement");
        let (first, second) = (measured(), measured());
        let difference = first.abs_diff(second);
        assert!(
            difference * 1000 <= first,
            "two measurements differ by more than 0.1%: {first} and {second} kHz"
        );
        assert!(host_tsc_khz().is_some());
    }
}
