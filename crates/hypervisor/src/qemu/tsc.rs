//! The host's TSC frequency, given to TCG guests as `tsc_early_khz`.
//!
//! Under TCG a guest's `rdtsc` reads the host's TSC (QEMU's `cpu_get_host_ticks`), so the
//! guest's TSC runs at the host's rate. A guest kernel that is not told that rate measures
//! it at boot: a quick PIT calibration early in `setup_arch` and, when that fails (one boot
//! in six here, more on a loaded host: TCG's PIT reads are too slow and uneven for it), a
//! second one in `tsc_init` that spins with interrupts off against the PIT and the HPET for
//! 10 + 10 + 50 ms ("tsc: Unable to calibrate against PIT", "using HPET reference
//! calibration"). With `tsc_early_khz` the second never runs (and with our kernel's patch
//! 0003 neither does the first). The kernel still refines the frequency against the HPET
//! a second after boot (templates are saved after that), but only within 1% of ours: a
//! refinement further off is discarded, and ours stays for good (with `tsc=reliable` no
//! watchdog checks it). So a measurement is only given when it is sure to be close: the
//! host's TSC must be invariant (CPUID), and each end of the window is bracketed by
//! clock reads so close together that the error stays far below 1%.
//!
//! No host interface publishes the TSC's rate (`/proc/cpuinfo`'s "cpu MHz" is the current
//! core clock on hosts with frequency scaling), so it is measured: the TSC against
//! `CLOCK_MONOTONIC` over 2 ms, each end bracketed by clock reads at most 0.5 µs apart
//! (at most 250 ppm off, a few ppm in practice). That costs 2 ms once per process, and
//! only a boot pays it (a clone does not boot). Where the clock is read by a system call
//! (no vDSO clock) such brackets may not occur: then a 20 ms window with 5 µs brackets is
//! tried (the same bound); failing that, no rate is given and the kernel calibrates.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Measurement windows (how long to sleep between the two samples) and the widest
/// bracket of a sample (a TSC read not bracketed by two clock reads this close together
/// is taken again: the thread was preempted in between), tried in order. Each keeps the
/// error within 2 × bracket / 2 / window = 250 ppm.
const ATTEMPTS: [(Duration, Duration); 2] = [
    (Duration::from_millis(2), Duration::from_nanos(500)),
    (Duration::from_millis(20), Duration::from_micros(5)),
];
/// A window this much longer than asked for (the host suspended, say) is not trusted.
const MAX_WINDOW: Duration = Duration::from_secs(1);
/// Tries per sample.
const SAMPLE_TRIES: usize = 20;
/// Plausible TSC rates, in kHz: anything outside is a broken measurement.
const PLAUSIBLE_KHZ: std::ops::RangeInclusive<u128> = 100_000..=20_000_000;

/// The host's TSC frequency in kHz, measured once per process (it sleeps a few ms the
/// first time); `None` when it cannot be measured well or the host is not x86-64.
pub fn host_tsc_khz() -> Option<u32> {
    static KHZ: OnceLock<Option<u32>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        if !invariant_tsc() {
            tracing::info!("The host's TSC is not invariant: TCG guests calibrate their own");
            return None;
        }
        let khz = ATTEMPTS
            .iter()
            .find_map(|&(window, bracket)| measure(window, bracket));
        match khz {
            Some(khz) => tracing::debug!(khz, "measured the host's TSC frequency"),
            None => tracing::info!(
                "Could not measure the host's TSC frequency (the clock reads were too slow or too often interrupted): TCG guests calibrate their own, 5-120 ms of each boot"
            ),
        }
        khz
    })
}

/// Measures the TSC against the monotonic clock over `window`, with samples bracketed
/// within `bracket`.
fn measure(window: Duration, bracket: Duration) -> Option<u32> {
    let (start, start_tsc) = sample(bracket)?;
    std::thread::sleep(window);
    let (end, end_tsc) = sample(bracket)?;
    let elapsed = end.checked_duration_since(start)?;
    if elapsed > MAX_WINDOW {
        return None;
    }
    let nanos = elapsed.as_nanos();
    let ticks = u128::from(end_tsc.checked_sub(start_tsc)?);
    let khz = ticks.checked_mul(1_000_000)?.checked_div(nanos)?;
    if PLAUSIBLE_KHZ.contains(&khz) {
        u32::try_from(khz).ok()
    } else {
        None
    }
}

/// One TSC read and the clock's time at it: the middle of two clock reads at most
/// `max_bracket` apart around it.
fn sample(max_bracket: Duration) -> Option<(Instant, u64)> {
    for _ in 0..SAMPLE_TRIES {
        let before = Instant::now();
        let tsc = rdtsc()?;
        let after = Instant::now();
        let bracket = after.duration_since(before);
        if bracket <= max_bracket {
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

/// True when the CPU says its TSC runs at a constant rate in every state (CPUID
/// 8000_0007h EDX bit 8, "invariant TSC"; Linux's `constant_tsc` + `nonstop_tsc`).
#[cfg(target_arch = "x86_64")]
fn invariant_tsc() -> bool {
    use std::arch::x86_64::__cpuid;
    __cpuid(0x8000_0000).eax >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn invariant_tsc() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn two_measurements_of_the_host_tsc_agree() {
        // A measurement can fail on a very busy host (no undisturbed sample); then it
        // says so instead of guessing. Three tries each.
        let (window, bracket) = ATTEMPTS[0];
        let measured = || {
            (0..3)
                .find_map(|_| measure(window, bracket))
                .expect("a TSC measurement")
        };
        let (first, second) = (measured(), measured());
        let difference = first.abs_diff(second);
        assert!(
            difference * 1000 <= first,
            "two measurements differ by more than 0.1%: {first} and {second} kHz"
        );
        assert!(host_tsc_khz().is_some());
    }
}
