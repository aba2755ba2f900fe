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

/// How long the guest may take to release a disk after `device_del` (q35 in QEMU 7.2
/// hot-plugs root ports through ACPI: the guest's `acpiphp` ejects in about 0.15 s under
/// TCG).
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(20);

/// Prefix of the QEMU device id of a hot-plugged disk (the serial follows).
const DEVICE_PREFIX: &str = "vmfdisk-";
/// Prefix of its block node name.
const NODE_PREFIX: &str = "vmfnode-";
/// Prefix of the name of the file node under it.
const FILE_NODE_PREFIX: &str = "vmffile-";

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
            "node-name": format!("{FILE_NODE_PREFIX}{serial}"),
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

/// The first empty hot-plug port in a `query-pci` answer.
fn free_port_in(buses: &Value) -> Option<String> {
    let mut free: Vec<String> = buses
        .as_array()?
        .iter()
        .filter_map(|bus| bus.get("devices")?.as_array())
        .flatten()
        .filter_map(|device| {
            let id = device.get("qdev_id")?.as_str()?;
            if !id.starts_with(HOTPLUG_PORT_PREFIX) {
                return None;
            }
            let empty = device
                .get("pci_bridge")
                .and_then(|bridge| bridge.get("devices"))
                .and_then(Value::as_array)
                .map_or(true, Vec::is_empty);
            empty.then(|| id.to_string())
        })
        .collect();
    free.sort();
    free.into_iter().next()
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

impl Qemu {
    /// Attaches `spec`: the block node, then the device on the first free hot-plug port.
    pub(super) async fn plug_disk(&self, spec: &DiskSpec, q35: bool) -> Result<AttachedDisk> {
        let serial = spec.checked_serial()?;
        // Two attaches must not pick the same free port.
        let _attaching = self.disk_lock.lock().await;
        self.qmp("blockdev-add", Some(blockdev_add_args(spec, &serial)))
            .await?;
        let port = if q35 {
            match self.free_port().await {
                Ok(port) => Some(port),
                Err(err) => {
                    self.drop_node(&serial).await;
                    return Err(err);
                }
            }
        } else {
            None
        };
        let plugged = self
            .qmp(
                "device_add",
                Some(device_add_args(&serial, port.as_deref())),
            )
            .await
            .map(drop);
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

    /// Removes the block node of a failed attach.
    async fn drop_node(&self, serial: &str) {
        let args = json!({ "node-name": node_name(serial) });
        if let Err(err) = self.qmp("blockdev-del", Some(args)).await {
            debug!(%err, "Cannot remove the block node of a failed attach");
        }
    }

    /// The first reserved hot-plug port with nothing plugged in (`query-pci`). Ports are
    /// never probed with `device_add`: QEMU 7.2 answers a plug into an occupied port by
    /// pressing that slot's attention button, which ejects the disk already there.
    async fn free_port(&self) -> Result<String> {
        let buses = self.qmp("query-pci", None).await?;
        free_port_in(&buses).ok_or_else(|| {
            HypervisorError::InvalidConfig(format!(
                "All {HOTPLUG_PORTS} disk hot-plug ports are in use: detach a disk first"
            ))
        })
    }

    /// Device ids (`qom-list /machine/peripheral`) and block nodes
    /// (`query-named-block-nodes`) of hot-plugged disks present now.
    pub(super) async fn disk_names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let devices = self
            .qmp("qom-list", Some(json!({ "path": "/machine/peripheral" })))
            .await?;
        for device in devices.as_array().into_iter().flatten() {
            if let Some(name) = device.get("name").and_then(Value::as_str) {
                if name.starts_with(DEVICE_PREFIX) {
                    names.push(name.to_string());
                }
            }
        }
        let nodes = self
            .qmp("query-named-block-nodes", Some(json!({ "flat": true })))
            .await?;
        for node in nodes.as_array().into_iter().flatten() {
            if let Some(name) = node.get("node-name").and_then(Value::as_str) {
                if name.starts_with(NODE_PREFIX) || name.starts_with(FILE_NODE_PREFIX) {
                    names.push(name.to_string());
                }
            }
        }
        Ok(names)
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
        assert_eq!(args["file"]["node-name"], "vmffile-vmf1");
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
    fn free_ports_come_from_query_pci() {
        let buses = json!([{ "bus": 0, "devices": [
            { "qdev_id": "", "bus": 0 },
            { "qdev_id": "vmfhp1", "pci_bridge": { "devices": [] } },
            { "qdev_id": "vmfhp0", "pci_bridge": { "devices": [{ "qdev_id": "vmfdisk-x" }] } },
            { "qdev_id": "vmfhp2", "pci_bridge": { "bus": {} } },
        ]}]);
        assert_eq!(free_port_in(&buses).as_deref(), Some("vmfhp1"));
        let full = json!([{ "bus": 0, "devices": [
            { "qdev_id": "vmfhp0", "pci_bridge": { "devices": [{ "qdev_id": "vmfdisk-x" }] } },
        ]}]);
        assert_eq!(free_port_in(&full), None);
    }
}
