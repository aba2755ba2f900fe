//! A mock hypervisor for unit tests of factory logic: no process, only state.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use crate::{Hypervisor, HypervisorError, Result, VmSpec};

const RUNNING: u8 = 0;
const PAUSED: u8 = 1;
const STOPPED: u8 = 2;

/// Shared switches a test uses to observe and break a mock VM.
#[derive(Debug, Default)]
pub struct MockControl {
    state: AtomicU8,
    crashed: AtomicBool,
}

impl MockControl {
    /// Simulates the hypervisor process dying.
    pub fn crash(&self) {
        self.crashed.store(true, Ordering::SeqCst);
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.state.load(Ordering::SeqCst) == PAUSED
    }

    /// True once stopped.
    pub fn is_stopped(&self) -> bool {
        self.state.load(Ordering::SeqCst) == STOPPED
    }
}

/// A VM that exists only in memory.
#[derive(Debug)]
pub struct MockHypervisor {
    spec: VmSpec,
    dir: PathBuf,
    control: Arc<MockControl>,
}

impl MockHypervisor {
    /// A running mock VM for `spec`, with the control handle tests use.
    pub fn start(spec: &VmSpec) -> Result<(Self, Arc<MockControl>)> {
        if spec.vcpus == 0 || spec.memory_mib == 0 {
            return Err(HypervisorError::InvalidConfig(
                "Mock VMs need vCPUs and memory".into(),
            ));
        }
        let control = Arc::new(MockControl::default());
        let mock = Self {
            spec: spec.clone(),
            dir: PathBuf::from("/nonexistent/mock").join(&spec.id),
            control: control.clone(),
        };
        Ok((mock, control))
    }

    /// The spec the mock was started with.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    fn check_alive(&self) -> Result<()> {
        if self.is_running() {
            Ok(())
        } else {
            Err(HypervisorError::Exited {
                status: "mock crash".into(),
                when: "unexpectedly",
                report: String::new(),
            })
        }
    }
}

#[async_trait]
impl Hypervisor for MockHypervisor {
    fn id(&self) -> &str {
        &self.spec.id
    }

    fn pid(&self) -> Option<u32> {
        None
    }

    fn vm_dir(&self) -> &Path {
        &self.dir
    }

    fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn is_running(&self) -> bool {
        !self.control.crashed.load(Ordering::SeqCst) && !self.control.is_stopped()
    }

    async fn exited(&self) -> HypervisorError {
        while self.is_running() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        HypervisorError::Exited {
            status: "mock exit".into(),
            when: "unexpectedly",
            report: String::new(),
        }
    }

    async fn pause(&self) -> Result<()> {
        self.check_alive()?;
        self.control.state.store(PAUSED, Ordering::SeqCst);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.check_alive()?;
        self.control.state.store(RUNNING, Ordering::SeqCst);
        Ok(())
    }

    async fn stop(&mut self) -> Result<()> {
        self.control.state.store(STOPPED, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryBackend;

    #[tokio::test]
    async fn tracks_state_and_crashes() {
        let spec = VmSpec {
            id: "m1".into(),
            vcpus: 1,
            max_vcpus: 1,
            memory_mib: 128,
            memory_slots: 0,
            max_memory_mib: 128,
            kernel: "/k".into(),
            initrd: None,
            kernel_params: String::new(),
            memory: MemoryBackend::Memfd,
        };
        let (mut vm, control) = MockHypervisor::start(&spec).expect("start");
        vm.pause().await.expect("pause");
        assert!(control.is_paused());
        vm.resume().await.expect("resume");
        assert!(!control.is_paused());
        control.crash();
        assert!(vm.resume().await.is_err());
        vm.stop().await.expect("stop");
        assert!(control.is_stopped());
    }
}
