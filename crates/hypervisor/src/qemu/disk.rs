//! Disk hot-plug over QMP: `blockdev-add` (file + raw) then `device_add virtio-blk-pci` on
//! a free reserved hot-plug port; detach is `device_del`, the guest's eject
//! (`DEVICE_DELETED`), then `blockdev-del`. Every name is derived from the serial, so a
//! detach needs nothing but the id, also after a hand-over to another process.

use std::time::Duration;

use serde_json::{json, Value};
use tracing::debug;

use super::cmdline::{HOTPLUG_PORTS, HOTPLUG_PORT_PREFIX};
use super::Qemu;
use crate::disk::{validate_serial, AttachedDisk, DiskSpec};
use crate::{HypervisorError, Result};

/// How long the guest may take to release a disk after `device_del`. Linux's PCIe native
/// hot-plug driver waits 5 s after the attention button before it powers a slot off.
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(20);

/// Prefix of the QEMU device id of a hot-plugged disk (the serial follows).
const DEVICE_PREFIX: &str = "vmfdisk-";
/// Prefix of its block node name.
const NODE_PREFIX: &str = "vmfnode-";

/// QEMU device id of the disk with `serial`.
pub fn device_id(serial: &str) -> String {
    format!("{DEVICE_PREFIX}{serial}")
}

/// Block node name of the disk with `serial`.
pub fn node_name(serial: &str) -> String {
    format!("{NODE_PREFIX}{serial}")
}

/// `blockdev-add` arguments: a raw image on a file, read-only when asked. Host page cache
/// is bypassed (`cache.direct`) only for writable disks, where it keeps guest writes
/// honest; a read-only image shared by many VMs is better served from the page cache.
pub fn blockdev_add_args(spec: &DiskSpec, serial: &str) -> Value {
    json!({
        "driver": "raw",
        "node-name": node_name(serial),
        "read-only": spec.read_only,
        "auto-read-only": spec.read_only,
        "discard": "ignore",
        "cache": { "direct": !spec.read_only, "no-flush": false },
        "file": {
            "driver": "file",
            "filename": spec.path.to_string_lossy(),
            "read-only": spec.read_only,
            "auto-read-only": spec.read_only,
            "locking": if spec.read_only { "off" } else { "on" },
            "aio": "threads",
        },
    })
}

/// `device_add` arguments: a virtio-blk-pci disk with `serial` on `port` (q35) or on the
/// root bus (`None`, pc machine: ACPI hot-plug).
pub fn device_add_args(serial: &str, port: Option<&str>) -> Value {
    let mut args = json!({
        "driver": "virtio-blk-pci",
        "id": device_id(serial),
        "drive": node_name(serial),
        "serial": serial,
    });
    if let Some(port) = port {
        args["bus"] = Value::String(port.to_string());
    }
    args
}

/// The serial in a disk id, checked.
fn serial_of(id: &str) -> Result<&str> {
    let serial = id.strip_prefix(DEVICE_PREFIX).ok_or_else(|| {
        HypervisorError::InvalidConfig(format!(
            "{id:?} is not a disk id: use the id attach_disk returned"
        ))
    })?;
    validate_serial(serial)?;
    Ok(serial)
}

/// True when QMP says the bus is taken (the port already holds a device).
fn port_busy(err: &HypervisorError) -> bool {
    matches!(err, HypervisorError::Qmp { message, .. }
        if message.contains("not available") || message.contains("in use")
            || message.contains("full") || message.contains("no slot"))
}

impl Qemu {
    /// Attaches `spec`: the block node, then the device on the first free hot-plug port.
    pub(super) async fn plug_disk(&self, spec: &DiskSpec, q35: bool) -> Result<AttachedDisk> {
        let serial = spec.checked_serial()?;
        self.qmp("blockdev-add", Some(blockdev_add_args(spec, &serial)))
            .await?;
        let plugged = if q35 {
            let mut result = Err(HypervisorError::InvalidConfig(format!(
                "All {HOTPLUG_PORTS} disk hot-plug ports are in use: detach a disk first"
            )));
            for index in 0..HOTPLUG_PORTS {
                let port = format!("{HOTPLUG_PORT_PREFIX}{index}");
                match self
                    .qmp("device_add", Some(device_add_args(&serial, Some(&port))))
                    .await
                {
                    Ok(_) => {
                        result = Ok(());
                        break;
                    }
                    Err(err) if port_busy(&err) => {
                        debug!(%port, %err, "Hot-plug port busy");
                        continue;
                    }
                    Err(err) => {
                        result = Err(err);
                        break;
                    }
                }
            }
            result
        } else {
            self.qmp("device_add", Some(device_add_args(&serial, None)))
                .await
                .map(drop)
        };
        if let Err(err) = plugged {
            if let Err(del) = self
                .qmp(
                    "blockdev-del",
                    Some(json!({ "node-name": node_name(&serial) })),
                )
                .await
            {
                debug!(%del, "Cannot remove the block node of a failed attach");
            }
            return Err(err);
        }
        Ok(AttachedDisk {
            id: device_id(&serial),
            serial,
        })
    }

    /// Detaches disk `id`: asks the guest to release the device, waits for QEMU to
    /// remove it, then removes the block node.
    pub(super) async fn unplug_disk(&self, id: &str) -> Result<()> {
        let serial = serial_of(id)?;
        match self.qmp("device_del", Some(json!({ "id": id }))).await {
            Ok(_) => {
                self.wait_device_deleted(id, DETACH_TIMEOUT).await?;
            }
            // Already gone (a retry after a timeout): only the node may be left.
            Err(HypervisorError::Qmp { message, .. }) if message.contains("not found") => {}
            Err(err) => return Err(err),
        }
        self.qmp(
            "blockdev-del",
            Some(json!({ "node-name": node_name(serial) })),
        )
        .await
        .map(drop)
    }

    /// Waits for `DEVICE_DELETED` of device `id`.
    async fn wait_device_deleted(&self, id: &str, limit: Duration) -> Result<()> {
        let mut guard = self.qmp.lock().await;
        let Some(qmp) = guard.as_mut() else {
            return Err(HypervisorError::Qmp {
                command: "device_del".into(),
                message: "QMP session closed".into(),
            });
        };
        let wanted = id.to_string();
        let waited = tokio::time::timeout(
            limit,
            qmp.wait_event("DEVICE_DELETED", |data| {
                data.get("device").and_then(Value::as_str) == Some(wanted.as_str())
            }),
        )
        .await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => {
                *guard = None;
                Err(err)
            }
            Err(_) => {
                // wait_event is not cancel-safe: start a fresh session next time.
                *guard = None;
                Err(HypervisorError::Timeout {
                    what: format!(
                        "waiting for the guest to release disk {id} (is the disk still \
                         mounted in the guest? remove its container first, then retry)"
                    ),
                    seconds: limit.as_secs_f64(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(read_only: bool) -> DiskSpec {
        DiskSpec {
            path: "/img/a.erofs".into(),
            read_only,
            serial: String::new(),
        }
    }

    #[test]
    fn blockdev_add_read_only() {
        let args = blockdev_add_args(&spec(true), "vmf1");
        assert_eq!(args["driver"], "raw");
        assert_eq!(args["node-name"], "vmfnode-vmf1");
        assert_eq!(args["read-only"], true);
        assert_eq!(args["auto-read-only"], true);
        assert_eq!(args["cache"]["direct"], false);
        assert_eq!(args["file"]["driver"], "file");
        assert_eq!(args["file"]["filename"], "/img/a.erofs");
        assert_eq!(args["file"]["read-only"], true);
        assert_eq!(args["file"]["locking"], "off");
    }

    #[test]
    fn blockdev_add_writable() {
        let args = blockdev_add_args(&spec(false), "vmf1");
        assert_eq!(args["read-only"], false);
        assert_eq!(args["cache"]["direct"], true);
        assert_eq!(args["file"]["locking"], "on");
    }

    #[test]
    fn device_add_on_a_port_or_the_root_bus() {
        let args = device_add_args("vmf1", Some("vmfhp1"));
        assert_eq!(args["driver"], "virtio-blk-pci");
        assert_eq!(args["id"], "vmfdisk-vmf1");
        assert_eq!(args["drive"], "vmfnode-vmf1");
        assert_eq!(args["serial"], "vmf1");
        assert_eq!(args["bus"], "vmfhp1");
        assert!(device_add_args("vmf1", None).get("bus").is_none());
    }

    #[test]
    fn ids_round_trip_and_bad_ids_are_refused() {
        assert_eq!(serial_of(&device_id("vmf1")).expect("id"), "vmf1");
        assert!(serial_of("vmf1").is_err());
        assert!(serial_of("vmfdisk-a,b").is_err());
        assert!(serial_of("vmfdisk-").is_err());
    }

    #[test]
    fn busy_ports_are_told_apart() {
        let busy = HypervisorError::Qmp {
            command: "device_add".into(),
            message: "PCI: slot 0 function 0 not available for virtio-blk-pci, in use by virtio-blk-pci,id=x".into(),
        };
        assert!(port_busy(&busy));
        let other = HypervisorError::Qmp {
            command: "device_add".into(),
            message: "Bus 'vmfhp0' not found".into(),
        };
        assert!(!port_busy(&other));
    }
}
