//! CPU and memory hot-plug over QMP.

use serde_json::Value;

use super::Qemu;
use crate::{HypervisorError, Result, MEMORY_BLOCK_MIB};

impl Qemu {
    /// Hot-plugs `count` vCPUs into the lowest free CPU slots.
    pub(super) async fn plug_vcpus(&self, count: u32) -> Result<u32> {
        let free = self.free_cpu_slots().await?;
        if free.len() < count as usize {
            return Err(HypervisorError::InvalidConfig(format!(
                "Cannot add {count} vCPUs: only {} free CPU slots (raise default_maxvcpus)",
                free.len()
            )));
        }
        for (index, mut args) in free.into_iter().take(count as usize).enumerate() {
            let id = format!("vcpu-hp-{}-{index}", rand::random::<u32>());
            if let Some(map) = args.as_object_mut() {
                map.insert("id".into(), Value::String(id));
            }
            self.qmp("device_add", Some(args)).await?;
        }
        Ok(count)
    }

    /// Hot-plugs one DIMM of `mib` MiB backed by anonymous RAM.
    pub(super) async fn plug_memory(&self, mib: u32) -> Result<()> {
        if mib == 0 || mib % MEMORY_BLOCK_MIB != 0 {
            return Err(HypervisorError::InvalidConfig(format!(
                "Hot-plugged memory must be a positive multiple of {MEMORY_BLOCK_MIB} MiB, not {mib} MiB"
            )));
        }
        let id = format!("dimm-{}", rand::random::<u32>());
        let backend = serde_json::json!({
            "qom-type": "memory-backend-ram",
            "id": format!("{id}-mem"),
            "size": u64::from(mib) << 20,
        });
        self.qmp("object-add", Some(backend)).await?;
        let device = serde_json::json!({
            "driver": "pc-dimm",
            "id": id,
            "memdev": format!("{id}-mem"),
        });
        self.qmp("device_add", Some(device)).await.map(drop)
    }

    /// Free CPU slots as `device_add` arguments (driver and topology ids).
    async fn free_cpu_slots(&self) -> Result<Vec<Value>> {
        let slots = self.qmp("query-hotpluggable-cpus", None).await?;
        let Some(slots) = slots.as_array() else {
            return Err(HypervisorError::Qmp {
                command: "query-hotpluggable-cpus".into(),
                message: "Unexpected answer".into(),
            });
        };
        let mut free: Vec<Value> = slots
            .iter()
            .filter(|slot| slot.get("qom-path").is_none())
            .filter_map(|slot| {
                let mut args = slot.get("props")?.as_object()?.clone();
                args.remove("node-id");
                args.insert("driver".into(), slot.get("type")?.clone());
                Some(Value::Object(args))
            })
            .collect();
        // QEMU lists the highest slots first; plug in ascending order.
        free.reverse();
        Ok(free)
    }
}
