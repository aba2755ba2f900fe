//! `HandOut`: a VM that was just handed out gets its own identity in one round trip
//! (entropy and CRNG reseed, clock, hostname). Every field is checked before anything is
//! applied, so a bad request changes nothing.

use std::time::Instant;

use tonic::Status;
use vmfactory_protocols::agent::{HandOutRequest, HandOutResponse};
use vmfactory_protocols::contract::{check_hostname, MAX_HANDOUT_ENTROPY};

use crate::sys;

/// A request whose every field was checked.
#[derive(Debug)]
pub struct Checked {
    entropy: Vec<u8>,
    sec: i64,
    nsec: u32,
    hostname: Option<String>,
}

/// Checks a `HandOut` request; the status says which field is wrong and why.
pub fn check(request: HandOutRequest) -> Result<Checked, Status> {
    if request.entropy.is_empty() || request.entropy.len() > MAX_HANDOUT_ENTROPY {
        return Err(Status::invalid_argument(format!(
            "HandOut entropy must hold 1 to {MAX_HANDOUT_ENTROPY} bytes, got {}",
            request.entropy.len()
        )));
    }
    if request.clock_sec <= 0 || request.clock_nsec >= 1_000_000_000 {
        return Err(Status::invalid_argument(format!(
            "HandOut clock must be after the epoch with nanoseconds below 1000000000, got \
             {} s {} ns",
            request.clock_sec, request.clock_nsec
        )));
    }
    let hostname = if request.hostname.is_empty() {
        None
    } else {
        check_hostname(&request.hostname)
            .map_err(|why| Status::invalid_argument(format!("HandOut hostname: {why}")))?;
        Some(request.hostname)
    };
    Ok(Checked {
        entropy: request.entropy,
        sec: request.clock_sec,
        nsec: request.clock_nsec,
        hostname,
    })
}

/// Applies a checked hand-out: reseeds, sets the clock, sets the hostname.
pub fn apply(checked: &Checked) -> Result<HandOutResponse, Status> {
    let started = Instant::now();
    sys::reseed_rng(&checked.entropy)
        .map_err(|err| Status::internal(format!("Cannot reseed the RNG: {err}")))?;
    sys::set_clock_ns(checked.sec, checked.nsec)
        .map_err(|err| Status::internal(format!("Cannot set the clock: {err}")))?;
    if let Some(name) = &checked.hostname {
        sys::set_hostname(name)
            .map_err(|err| Status::internal(format!("Cannot set the hostname: {err}")))?;
    }
    Ok(HandOutResponse {
        guest_micros: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> HandOutRequest {
        HandOutRequest {
            entropy: vec![7; 64],
            clock_sec: 1_700_000_000,
            clock_nsec: 5,
            hostname: "vm-0123abcd".into(),
        }
    }

    fn refused(request: HandOutRequest) -> String {
        let status = check(request).expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        status.message().to_string()
    }

    #[test]
    fn accepts_a_good_request() {
        let checked = check(good()).expect("good");
        assert_eq!(checked.hostname.as_deref(), Some("vm-0123abcd"));
        assert_eq!(checked.entropy.len(), 64);
    }

    #[test]
    fn empty_hostname_leaves_it_alone() {
        let checked = check(HandOutRequest {
            hostname: String::new(),
            ..good()
        })
        .expect("no hostname");
        assert!(checked.hostname.is_none());
    }

    #[test]
    fn refuses_bad_entropy() {
        assert!(refused(HandOutRequest {
            entropy: vec![],
            ..good()
        })
        .contains("entropy"));
        assert!(refused(HandOutRequest {
            entropy: vec![0; MAX_HANDOUT_ENTROPY + 1],
            ..good()
        })
        .contains("4096"));
        check(HandOutRequest {
            entropy: vec![0; MAX_HANDOUT_ENTROPY],
            ..good()
        })
        .expect("the bound itself");
    }

    #[test]
    fn refuses_bad_clock() {
        for (sec, nsec) in [(0, 0), (-5, 0), (1, 1_000_000_000), (1, u32::MAX)] {
            assert!(refused(HandOutRequest {
                clock_sec: sec,
                clock_nsec: nsec,
                ..good()
            })
            .contains("clock"));
        }
    }

    #[test]
    fn refuses_bad_hostnames() {
        let long = "a".repeat(65);
        for name in [
            long.as_str(),
            "-lead",
            "trail.",
            "sp ace",
            "semi;colon",
            "nul\0",
            "ünï",
            "a/b",
        ] {
            assert!(
                refused(HandOutRequest {
                    hostname: name.into(),
                    ..good()
                })
                .contains("hostname"),
                "{name:?}"
            );
        }
        check(HandOutRequest {
            hostname: "a".repeat(64),
            ..good()
        })
        .expect("64 bytes");
    }
}
