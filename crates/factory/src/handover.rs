//! The hand-over record: everything one process tells another so that it can take over a
//! running VM (VMCache `GetBaseVM` today, sandboxes tomorrow). It is versioned and names
//! its backend; a record this build cannot read is refused with a message that says which
//! versions and backends it understands, never half-adopted.

use serde::{Deserialize, Serialize};
use vmfactory_hypervisor::{HypervisorHandle, BACKEND_NAMES};

/// Format version this build writes.
pub const HANDOVER_FORMAT_VERSION: u32 = 1;
/// Format versions this build reads.
pub const SUPPORTED_HANDOVER_VERSIONS: [u32; 1] = [1];
/// Largest record accepted (a record is a few hundred bytes).
const MAX_RECORD_BYTES: usize = 64 << 10;

/// Errors of reading a hand-over record.
#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    /// Not a record at all.
    #[error("Invalid hand-over record: {0}")]
    Malformed(String),
    /// Written by a build with another format.
    #[error("Hand-over record version {found} is not understood: this build reads version(s) {supported}; run the same vmfactory version on both sides")]
    Version {
        /// The record's version.
        found: u64,
        /// The versions this build reads, comma-separated.
        supported: String,
    },
    /// Names a backend this build does not have.
    #[error("Hand-over record names hypervisor backend {found:?}: this build knows {known}")]
    Backend {
        /// The record's backend.
        found: String,
        /// The backends this build knows, comma-separated.
        known: String,
    },
}

/// A VM given away by one process for another to take over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandOverRecord {
    /// [`HANDOVER_FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// VM id.
    pub id: String,
    /// vCPUs the VM has.
    pub cpu: u32,
    /// Memory the VM has, MiB.
    pub memory_mib: u32,
    /// vCPUs hot-plugged beyond its factory's default.
    pub cpu_delta: u32,
    /// What the backend needs to adopt it (tagged with the backend's name).
    pub hypervisor: HypervisorHandle,
    /// True when the giver resumed the VM just before handing it over (a VMCache server
    /// does, on its live QMP session, so the guest already runs when the new owner's
    /// first agent call arrives and the owner needs no QMP session to start it); false,
    /// or absent in older records, when the VM is paused.
    #[serde(default)]
    pub running: bool,
}

impl HandOverRecord {
    /// The record as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a record, checking its version and backend before anything else.
    pub fn from_json(bytes: &[u8]) -> Result<Self, HandOverError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(HandOverError::Malformed(format!(
                "{} bytes, more than the {MAX_RECORD_BYTES} a record may have",
                bytes.len()
            )));
        }
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|err| HandOverError::Malformed(err.to_string()))?;
        let version = value
            .get("format_version")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| HandOverError::Malformed("no format_version".into()))?;
        if !SUPPORTED_HANDOVER_VERSIONS
            .iter()
            .any(|v| u64::from(*v) == version)
        {
            return Err(HandOverError::Version {
                found: version,
                supported: join(&SUPPORTED_HANDOVER_VERSIONS.map(|v| v.to_string())),
            });
        }
        let backend = value
            .get("hypervisor")
            .and_then(|h| h.get("backend"))
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| HandOverError::Malformed("no hypervisor backend".into()))?;
        if !BACKEND_NAMES.contains(&backend) {
            return Err(HandOverError::Backend {
                found: backend.chars().take(64).collect(),
                known: join(&BACKEND_NAMES.map(str::to_string)),
            });
        }
        serde_json::from_value(value).map_err(|err| HandOverError::Malformed(err.to_string()))
    }
}

fn join(items: &[String]) -> String {
    items.join(", ")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use vmfactory_hypervisor::mock::MockHandle;
    use vmfactory_hypervisor::qemu::accel::ResolvedAccel;
    use vmfactory_hypervisor::qemu::QemuHandle;

    use super::*;

    fn record(hypervisor: HypervisorHandle) -> HandOverRecord {
        HandOverRecord {
            format_version: HANDOVER_FORMAT_VERSION,
            id: "vm1".into(),
            cpu: 2,
            memory_mib: 512,
            cpu_delta: 1,
            hypervisor,
            running: true,
        }
    }

    /// A mock VM's record as a JSON value, to be altered.
    fn mock_record_json() -> serde_json::Value {
        let record = record(HypervisorHandle::Mock(MockHandle {
            id: "vm1".into(),
            dir: PathBuf::from("/tmp/vm1"),
        }));
        serde_json::from_slice(&record.to_json()).expect("json")
    }

    #[test]
    fn round_trips_every_backend() {
        for hypervisor in [
            HypervisorHandle::Qemu(QemuHandle {
                id: "vm1".into(),
                pid: 42,
                dir: PathBuf::from("/run/vmfactory/vm/vm1"),
                accel: ResolvedAccel::Tcg,
            }),
            HypervisorHandle::Mock(MockHandle {
                id: "vm1".into(),
                dir: PathBuf::from("/tmp/vm1"),
            }),
        ] {
            let written = record(hypervisor);
            let json = written.to_json();
            let text = String::from_utf8_lossy(&json).into_owned();
            assert!(text.contains("\"format_version\":1"), "{text}");
            assert!(text.contains(&format!("\"backend\":\"{}\"", written.hypervisor.backend())));
            assert_eq!(HandOverRecord::from_json(&json).expect("read"), written);
        }
    }

    #[test]
    fn unknown_version_or_backend_is_refused_by_name() {
        let mut value = mock_record_json();
        value["format_version"] = 7.into();
        let err = HandOverRecord::from_json(value.to_string().as_bytes()).expect_err("v7");
        let message = err.to_string();
        assert!(matches!(err, HandOverError::Version { found: 7, .. }));
        assert!(message.contains("reads version(s) 1"), "{message}");

        value["format_version"] = 1.into();
        value["hypervisor"]["backend"] = "firecracker".into();
        let err = HandOverRecord::from_json(value.to_string().as_bytes()).expect_err("fc");
        assert!(err.to_string().contains("\"firecracker\""), "{err}");
        assert!(err.to_string().contains("qemu, mock"), "{err}");

        for bad in [&b"not json"[..], b"{}", b"{\"format_version\":1}"] {
            assert!(matches!(
                HandOverRecord::from_json(bad),
                Err(HandOverError::Malformed(_))
            ));
        }
        assert!(HandOverRecord::from_json(&vec![b' '; 100_000]).is_err());
    }

    #[test]
    fn a_record_without_running_is_of_a_paused_vm() {
        let mut value = mock_record_json();
        assert_eq!(value["running"], true);
        value.as_object_mut().expect("object").remove("running");
        let read = HandOverRecord::from_json(&serde_json::to_vec(&value).expect("bytes"))
            .expect("an older record without the field is read");
        assert!(!read.running);
    }
}
