//! Unit tests of the template factory, the cache and the VMCache client on the mock
//! hypervisor, with a stand-in agent: create, clone, fetch with a mismatch, close, and the
//! hand-over record across a real gRPC server on a Unix socket.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vmfactory_hypervisor::mock::{MockBackend, MockControl};
use vmfactory_hypervisor::Backend;
use vmfactory_protocols::cache::GrpcVm;

use super::*;
use crate::base::{Factory, FactoryBase};
use crate::cache::CacheFactory;
use crate::config::VmRequest;
use crate::mock_agent::{self, AgentCalls};
use crate::vmcache::{self, GrpcCacheFactory};

/// A mock world: a template path on tmpfs (no mount needed), kernel and initrd files, and
/// a mock backend whose VMs run the stand-in agent.
struct World {
    _dir: tempfile::TempDir,
    path: PathBuf,
    config: VmConfig,
    mock: MockBackend,
    backend: Arc<dyn Backend>,
    calls: Arc<AgentCalls>,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmf-mock-")
            .tempdir_in("/dev/shm")
            .expect("tempdir on tmpfs");
        let kernel = dir.path().join("kernel");
        let initrd = dir.path().join("initrd");
        std::fs::write(&kernel, b"mock kernel").expect("kernel");
        std::fs::write(&initrd, b"mock initrd").expect("initrd");
        let mut config = VmConfig {
            kernel,
            initrd: Some(initrd),
            memory_mib: 128,
            memory_slots: 2,
            ..VmConfig::default()
        };
        config.qemu.runtime_dir = dir.path().join("run");
        let calls = Arc::new(AgentCalls::default());
        let mock = MockBackend::new(
            &dir.path().join("vms"),
            Some(mock_agent::hook(calls.clone())),
        );
        Self {
            path: dir.path().join("template"),
            _dir: dir,
            config,
            backend: Arc::new(mock.clone()),
            mock,
            calls,
        }
    }

    async fn create(&self) -> TemplateFactory {
        TemplateFactory::new(&self.config, &self.path, self.backend.clone())
            .await
            .expect("create the template")
    }

    /// The mock VMs still alive, by id.
    fn alive_controls(&self) -> Vec<(String, Arc<MockControl>)> {
        self.mock
            .controls()
            .into_iter()
            .filter(|(_, control)| control.is_alive())
            .collect()
    }

    fn alive(&self) -> usize {
        self.alive_controls().len()
    }
}

fn files(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(path)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_clone_and_close() {
    let world = World::new();
    let template = world.create().await;
    assert_eq!(
        files(&world.path),
        [OWNER_MARKER, MEMORY_FILE, METADATA_FILE, STATE_FILE]
    );
    assert_eq!(template.metadata().qemu_version, "mock hypervisor 1");
    assert_eq!(template.metadata().memory_bytes, 128 << 20);
    assert!(
        !template.metadata().mounted_tmpfs,
        "/dev/shm is a tmpfs already"
    );
    assert_eq!(world.alive(), 0, "the template VM was stopped after saving");
    let err = TemplateFactory::new(&world.config, &world.path, world.backend.clone())
        .await
        .expect_err("second create");
    assert!(matches!(err, TemplateError::Exists(_)), "{err}");

    // No warm pool here: its clones' warm-up hand-outs would add to the counts below
    // (`warm_pool_clones_are_warmed_up_and_wait_paused`).
    let factory = Factory::new(Arc::new(template));
    let first = factory.get_vm(&VmRequest::default()).await.expect("clone");
    assert!(first.hypervisor().is_running());
    assert_eq!((first.cpu, first.memory_mib), (1, 128));
    // One HandOut round trip gives the clone its identity; no separate calls.
    assert_eq!(
        world.calls.hand_outs.load(Ordering::SeqCst),
        1,
        "handed out"
    );
    assert_eq!(
        world.calls.reseeds.load(Ordering::SeqCst),
        0,
        "no ReseedRandomDev"
    );
    assert_eq!(
        world.calls.clock_sets.load(Ordering::SeqCst),
        0,
        "no SetGuestDateTime"
    );
    assert_eq!(
        world.calls.hostname.lock().expect("hostname").as_str(),
        format!("vm-{}", first.id()),
        "hostname"
    );

    // A bigger request grows the clone by hot-plug; the agent onlines it.
    let grown = factory
        .get_vm(&VmRequest {
            vcpus: Some(2),
            memory_mib: Some(200),
        })
        .await
        .expect("grown clone");
    assert_eq!((grown.cpu, grown.memory_mib, grown.cpu_delta), (2, 256, 1));
    assert_eq!(world.calls.onlines.load(Ordering::SeqCst), 1);

    factory.close().await.expect("close");
    assert_eq!(
        world.alive(),
        2,
        "only the two handed-out clones run after close"
    );
    first.stop().await.expect("stop");
    grown.stop().await.expect("stop");
    assert_eq!(world.alive(), 0);
    assert!(destroy(&world.path).expect("destroy"));
    assert!(!world.path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_refuses_mismatch_and_damage() {
    let world = World::new();
    drop(world.create().await);
    let fetched = TemplateFactory::fetch(&world.config, &world.path, world.backend.clone())
        .await
        .expect("fetch an intact template");
    assert_eq!(fetched.path(), world.path);

    let bigger = VmConfig {
        memory_mib: 256,
        ..world.config.clone()
    };
    let err = TemplateFactory::fetch(&bigger, &world.path, world.backend.clone())
        .await
        .expect_err("other size");
    assert!(matches!(err, TemplateError::Mismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("memory (MiB) was 128 and is now 256"),
        "{err}"
    );

    let initrd = world.config.initrd.clone().expect("initrd");
    std::fs::write(&initrd, b"another initrd").expect("rewrite initrd");
    let err = TemplateFactory::fetch(&world.config, &world.path, world.backend.clone())
        .await
        .expect_err("changed initrd");
    assert!(err.to_string().contains("initrd digest was"), "{err}");
    std::fs::write(&initrd, b"mock initrd").expect("restore initrd");

    std::fs::write(world.path.join(STATE_FILE), b"damaged").expect("damage the state");
    let err = TemplateFactory::fetch(&world.config, &world.path, world.backend.clone())
        .await
        .expect_err("damaged state");
    assert!(matches!(err, TemplateError::Corrupt { .. }), "{err}");

    assert!(destroy(&world.path).expect("destroy"));
    let err = TemplateFactory::fetch(&world.config, &world.path, world.backend.clone())
        .await
        .expect_err("missing");
    assert!(matches!(err, TemplateError::Missing(_)), "{err}");
}

/// A VMCache server (clients get `grace` to adopt) on a cache of two clones of a new
/// template of `world`, once the cache is full.
async fn serve_two_cached(
    world: &World,
    grace: Duration,
) -> (
    Arc<CacheFactory>,
    PathBuf,
    Arc<tokio::sync::Notify>,
    tokio::task::JoinHandle<Result<(), vmcache::VmCacheError>>,
    Arc<crate::metrics::FactoryMetrics>,
) {
    let template = world.create().await;
    let metrics = Arc::new(crate::metrics::FactoryMetrics::default());
    let cache = Arc::new(CacheFactory::start(
        Arc::new(template),
        2,
        true,
        Some(metrics.clone()),
    ));
    let endpoint = world.path.with_extension("sock");
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let server = tokio::spawn({
        let (cache, endpoint, shutdown) = (cache.clone(), endpoint.clone(), shutdown.clone());
        async move {
            let lock = vmcache::lock_endpoint(&endpoint)?;
            vmcache::serve_locked_with_grace(cache, &endpoint, &lock, shutdown, grace, 3).await
        }
    });
    for _ in 0..500 {
        if cache.ready_count().await == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cache.ready_count().await, 2, "the cache never filled");
    (cache, endpoint, shutdown, server, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmcache_hands_over_by_record_and_refuses_unknown_versions() {
    let world = World::new();
    let (cache, endpoint, shutdown, server, _) =
        serve_two_cached(&world, vmcache::HANDOVER_GRACE).await;

    let client = GrpcCacheFactory::connect_with_backend(&endpoint, world.backend.clone())
        .await
        .expect("connect");
    assert_eq!(client.config().memory_mib, 128, "config from the server");
    let factory = Factory::new(Arc::new(client));
    let vm = factory.get_vm(&VmRequest::default()).await.expect("get_vm");
    assert!(vm.hypervisor().is_running());
    assert_eq!(
        vm.exec(crate::ExecRequest {
            argv: vec!["echo".into(), "adopted".into()],
            ..Default::default()
        })
        .await
        .expect("exec")
        .stdout,
        b"echo adopted"
    );

    // A record of a version this build does not read is refused, naming what it reads.
    let vm_id = vm.id().to_string();
    let mut record: serde_json::Value =
        serde_json::from_slice(&vm.hand_over().expect("hand over").to_json()).expect("json");
    record["format_version"] = 9.into();
    let message = GrpcVm {
        id: vm_id.clone(),
        hypervisor: record.to_string().into_bytes(),
        ..GrpcVm::default()
    };
    let err = vmcache::record_of(&message).expect_err("version 9");
    assert!(err.to_string().contains("version 9"), "{err}");
    assert!(err.to_string().contains("reads version(s) 1"), "{err}");
    record["format_version"] = 1.into();
    let message = GrpcVm {
        id: vm_id,
        hypervisor: record.to_string().into_bytes(),
        ..GrpcVm::default()
    };
    let record = vmcache::record_of(&message).expect("version 1");
    let mut adopted = world.backend.adopt(record.hypervisor).await.expect("adopt");
    adopted.stop().await.expect("stop");

    shutdown.notify_one();
    server.await.expect("join").expect("serve");
    assert!(!endpoint.exists(), "socket removed");
    cache.close().await.expect("close");
    assert_eq!(world.alive(), 0, "nothing left running");
    assert!(destroy(&world.path).expect("destroy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_vmfactory_did_not_make_is_refused_and_kept() {
    let world = World::new();
    std::fs::create_dir(&world.path).expect("user directory");
    let precious = world.path.join("thesis.tex");
    std::fs::write(&precious, b"years of work").expect("user file");
    let err = TemplateFactory::new(&world.config, &world.path, world.backend.clone())
        .await
        .expect_err("a non-empty directory of the user");
    assert!(matches!(err, TemplateError::NotOurs(_)), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&world.path.display().to_string()),
        "{message}"
    );
    assert!(message.contains("missing or empty directory"), "{message}");
    assert!(!destroy(&world.path).expect("destroy"), "nothing was ours");
    assert_eq!(
        std::fs::read(&precious).expect("the file survives"),
        b"years of work"
    );
    assert_eq!(files(&world.path), ["thesis.tex"]);

    // A file is not a directory: refused by both, and kept.
    let file = world.path.join("thesis.tex");
    let err = TemplateFactory::new(&world.config, &file, world.backend.clone())
        .await
        .expect_err("a file");
    assert!(matches!(err, TemplateError::NotADirectory(_)), "{err}");
    assert!(matches!(
        destroy(&file),
        Err(TemplateError::NotADirectory(_))
    ));
    assert!(file.is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_user_directory_stays_and_only_our_files_go() {
    let world = World::new();
    std::fs::create_dir(&world.path).expect("user directory");
    drop(world.create().await);
    assert_eq!(
        Ownership::read_for_tests(&world.path),
        Some(Ownership::default()),
        "neither the directory nor a mount is ours"
    );
    assert!(destroy(&world.path).expect("destroy"));
    assert!(world.path.is_dir(), "the user's directory stays");
    assert!(files(&world.path).is_empty(), "our files are gone");

    // A directory vmfactory made goes, unless the user put something in it since.
    std::fs::remove_dir(&world.path).expect("rmdir");
    drop(world.create().await);
    std::fs::write(world.path.join("notes"), b"mine").expect("user file");
    assert!(destroy(&world.path).expect("destroy"));
    assert_eq!(files(&world.path), ["notes"]);
}

/// With privileges to mount: a tmpfs vmfactory mounts over the user's empty directory is
/// unmounted by `destroy`, and the directory stays.
#[test]
fn a_mounted_tmpfs_is_unmounted_and_the_user_directory_kept() {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("tempdir");
    let user = dir.path().join("user");
    std::fs::create_dir(&user).expect("user directory");
    let ownership = match tmpfs::prepare_tmpfs(&user, 16) {
        Ok(ownership) => ownership,
        Err(TemplateError::Mount { .. }) => return, // no CAP_SYS_ADMIN here
        Err(TemplateError::Io { .. }) if is_mountpoint(dir.path()) => return,
        Err(err) => panic!("prepare: {err}"),
    };
    if !ownership.mounted_tmpfs {
        return; // the temp directory is on a tmpfs already
    }
    assert!(!ownership.created_directory);
    assert!(is_mountpoint(&user));
    std::fs::write(user.join(MEMORY_FILE), b"guest memory").expect("memory");
    assert!(destroy(&user).expect("destroy"));
    assert!(!is_mountpoint(&user), "unmounted");
    assert!(user.is_dir(), "the user's directory stays");
    assert!(files(&user).is_empty(), "the marker underneath is gone too");

    let made = dir.path().join("made");
    let ownership = tmpfs::prepare_tmpfs(&made, 16).expect("prepare");
    assert!(ownership.created_directory && ownership.mounted_tmpfs);
    assert!(destroy(&made).expect("destroy"));
    assert!(!made.exists(), "the directory vmfactory made is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creations_one_wins_the_other_is_refused_naming_the_pid() {
    let world = World::new();
    let (first, second) = tokio::join!(
        TemplateFactory::new(&world.config, &world.path, world.backend.clone()),
        TemplateFactory::new(&world.config, &world.path, world.backend.clone()),
    );
    let (won, lost) = match (first, second) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won, lost),
        (first, second) => panic!("expected one winner: {first:?} / {second:?}"),
    };
    let pid = std::process::id();
    assert!(
        matches!(&lost, TemplateError::Locked(crate::lock::LockError::Busy { pid: Some(p), .. }) if *p == pid),
        "{lost}"
    );
    assert!(
        lost.to_string().contains(&format!("process {pid}")),
        "{lost}"
    );
    drop(won);
    TemplateFactory::fetch(&world.config, &world.path, world.backend.clone())
        .await
        .expect("the winner left a usable template");

    // destroy takes the same lock: refused while a creation holds it.
    let held =
        crate::lock::PathLock::acquire(&world.path, crate::lock::LockKind::Template).expect("hold");
    let err = destroy(&world.path).expect_err("destroy during a creation");
    assert!(matches!(err, TemplateError::Locked(_)), "{err}");
    assert!(world.path.join(METADATA_FILE).exists(), "nothing removed");
    drop(held);
    assert!(destroy(&world.path).expect("destroy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmcache_stops_a_handed_out_vm_nobody_adopts() {
    let world = World::new();
    let grace = Duration::from_millis(300);
    let (cache, endpoint, shutdown, server, metrics) = serve_two_cached(&world, grace).await;

    // One VM taken and adopted, one taken by a client that never adopts it (it died).
    let client = GrpcCacheFactory::connect_with_backend(&endpoint, world.backend.clone())
        .await
        .expect("connect");
    let adopted = client.get_base_vm().await.expect("adopted");
    let asked = std::time::Instant::now();
    let abandoned = vmcache::connect(&endpoint)
        .await
        .expect("raw client")
        .get_base_vm(())
        .await
        .expect("GetBaseVM")
        .into_inner();
    let abandoned = vmcache::record_of(&abandoned).expect("record");
    let control = |id: &str| {
        world
            .mock
            .controls()
            .into_iter()
            .find(|(vm, _)| vm == id)
            .map(|(_, control)| control)
            .expect("control")
    };
    let (abandoned_control, adopted_control) = (control(&abandoned.id), control(adopted.id()));

    while !abandoned_control.is_stopped() {
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "the unadopted VM still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Handed out after `asked`, stopped no sooner than the grace after that.
    assert!(
        asked.elapsed() >= grace,
        "stopped before its grace: {:?}",
        asked.elapsed()
    );
    // Taken back once: neither a second reclaim nor a late adopter gets it.
    assert!(!world.backend.reclaim(&abandoned.hypervisor).await);
    assert!(world
        .backend
        .adopt(abandoned.hypervisor.clone())
        .await
        .is_err());
    assert!(adopted_control.is_alive(), "the adopted VM is left alone");
    adopted.stop().await.expect("stop");
    let text = metrics.encode();
    assert!(
        text.contains("vmfactory_handouts_reclaimed_total 1"),
        "{text}"
    );
    assert!(
        text.contains("vmfactory_handout_failures_total 0"),
        "{text}"
    );

    shutdown.notify_one();
    server.await.expect("join").expect("serve");
    cache.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmcache_refuses_hand_outs_past_the_unadopted_limit() {
    let world = World::new();
    // The limit is 3 here; nothing is reclaimed during the test.
    let (cache, endpoint, shutdown, server, metrics) =
        serve_two_cached(&world, Duration::from_secs(600)).await;
    let mut raw = vmcache::connect(&endpoint).await.expect("raw client");
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let answer = raw.get_base_vm(()).await.expect("GetBaseVM").into_inner();
        waiting.push(vmcache::record_of(&answer).expect("record"));
    }
    let refused = raw.get_base_vm(()).await.expect_err("a fourth waiting VM");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    assert!(
        refused
            .message()
            .contains("3 VMs handed out wait for their client"),
        "{refused}"
    );
    // Once one is adopted, a VM can be had again.
    let first = waiting.remove(0);
    let mut adopted = world.backend.adopt(first.hypervisor).await.expect("adopt");
    let answer = raw
        .get_base_vm(())
        .await
        .expect("GetBaseVM after an adoption");
    waiting.push(vmcache::record_of(&answer.into_inner()).expect("record"));
    let text = metrics.encode();
    assert!(
        text.contains("vmfactory_handout_failures_total 1"),
        "{text}"
    );
    assert!(text.contains("vmfactory_handouts_total 4"), "{text}");

    adopted.stop().await.expect("stop");
    for record in &waiting {
        assert!(world.backend.reclaim(&record.hypervisor).await);
    }
    shutdown.notify_one();
    server.await.expect("join").expect("serve");
    cache.close().await.expect("close");
    assert_eq!(world.alive(), 0, "nothing left running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_on_a_warm_pool_warms_each_clone_once() {
    let world = World::new();
    let template = Arc::new(world.create().await.with_warm_pool(1));
    let cache = CacheFactory::with_warm_up(template.clone(), 2, true);
    let started = std::time::Instant::now();
    while cache.ready_count().await < 2 || template.warm_pool_ready().await < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the cache and the pool fill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let alive = world.alive_controls();
    assert_eq!(alive.len(), 3, "two cached clones and one pooled");
    for (id, control) in &alive {
        assert_eq!(control.resumes(), 1, "{id}: warmed up once");
        assert!(control.is_paused(), "{id}: waits paused");
    }
    assert_eq!(world.calls.hand_outs.load(Ordering::SeqCst), 3);
    cache.close().await.expect("close");
    assert_eq!(world.alive(), 0);
    assert!(destroy(&world.path).expect("destroy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_clones_are_warmed_up_and_wait_paused() {
    let world = World::new();
    let template = Arc::new(world.create().await.with_warm_pool(2));
    let wait_full = || async {
        let started = std::time::Instant::now();
        while template.warm_pool_ready().await < 2 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the pool fills"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    wait_full().await;
    let clones = world.alive_controls();
    assert_eq!(
        clones.len(),
        2,
        "two pooled clones, the template VM stopped"
    );
    for (id, control) in &clones {
        assert_eq!(control.resumes(), 1, "{id}: resumed once, to warm up");
        assert!(control.is_paused(), "{id}: waits paused");
    }
    // Each was handed out once and ran one process while it warmed up.
    assert_eq!(world.calls.hand_outs.load(Ordering::SeqCst), 2);

    let factory = Factory::new(template.clone());
    let vm = factory.get_vm(&VmRequest::default()).await.expect("clone");
    let (_, control) = clones
        .iter()
        .find(|(id, _)| id.as_str() == vm.id())
        .expect("the clone came from the pool");
    assert_eq!(control.resumes(), 2, "resumed again for its hand-out");
    assert!(!control.is_paused());
    assert!(
        world.calls.hand_outs.load(Ordering::SeqCst) >= 3,
        "handed out again on the way to its caller"
    );
    vm.stop().await.expect("stop");
    // The pool makes a warmed replacement.
    wait_full().await;
    factory.close().await.expect("close");
    assert_eq!(world.alive(), 0);
    assert!(destroy(&world.path).expect("destroy"));
}
