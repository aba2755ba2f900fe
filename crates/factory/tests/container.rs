//! Containers in real QEMU VMs: a read-only EROFS image hot-plugged as a virtio-blk disk,
//! overlay root on tmpfs, namespaces, exec into a container, remove + detach, and nothing
//! left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use common::{config, runtime_dir, sh};
use vmfactory_factory::agent_process::{OutputPipe, ProcessSpec};
use vmfactory_factory::template;
use vmfactory_factory::{ContainerSpec, ExecRequest, Factory, TemplateFactory, Vm, VmRequest};

/// Distinctive content of the image's /etc/os-release.
const OS_RELEASE: &str = "NAME=\"vmfactory test image\"\nID=vmftest\n";

/// Applets linked to busybox in the image.
const APPLETS: &[&str] = &[
    "sh", "cat", "ps", "hostname", "ls", "echo", "sleep", "grep", "wc", "head", "id", "touch",
    "test", "tr", "mount", "dd", "sort",
];

/// An EROFS image holding a static busybox, a distinctive /etc/os-release and a user.
fn build_image(dir: &Path) -> PathBuf {
    let downloads =
        Path::new(&std::env::var("HOME").expect("HOME")).join(".cache/vmfactory/downloads");
    let deb = std::fs::read_dir(&downloads)
        .expect("downloads")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
            name.starts_with("busybox-static") && name.ends_with(".deb")
        })
        .expect("the busybox-static package in ~/.cache/vmfactory/downloads (run the guest image build)");
    let unpacked = dir.join("deb");
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&unpacked)
        .status()
        .expect("dpkg-deb");
    assert!(status.success());
    let root = dir.join("root");
    for sub in ["bin", "etc", "root"] {
        std::fs::create_dir_all(root.join(sub)).expect("mkdir");
    }
    std::fs::copy(unpacked.join("bin/busybox"), root.join("bin/busybox")).expect("busybox");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("link");
    }
    std::fs::write(root.join("etc/os-release"), OS_RELEASE).expect("os-release");
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nweb:x:33:34:web:/:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\nwww:x:55:web\n").expect("group");
    let image = dir.join("image.erofs");
    let output = Command::new("mkfs.erofs")
        .arg(&image)
        .arg(&root)
        .output()
        .expect("mkfs.erofs (apt-get install erofs-utils)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    image
}

fn sha256(path: &Path) -> String {
    vmfactory_guest_image::file_sha256(path).expect("sha256")
}

/// A pause container with `id` and `hostname`.
fn pause(id: &str, hostname: &str) -> ContainerSpec {
    ContainerSpec {
        id: id.into(),
        hostname: hostname.into(),
        ..ContainerSpec::default()
    }
}

/// Runs `script` in container `id` as `user`; returns (exit code, stdout).
async fn csh_status(vm: &Vm, id: &str, user: &str, script: &str) -> (Option<i32>, String) {
    let output = vm
        .agent()
        .exec_in_container(
            id,
            user,
            ExecRequest {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                ..ExecRequest::default()
            },
        )
        .await
        .expect("exec in container");
    (
        output.exit_code,
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    )
}

async fn csh(vm: &Vm, id: &str, script: &str) -> String {
    let (code, out) = csh_status(vm, id, "", script).await;
    assert_eq!(code, Some(0), "{script}: {out}");
    out
}

/// PIDs `ps` lists in container `id` (header skipped).
async fn pids(vm: &Vm, id: &str) -> Vec<u32> {
    csh(vm, id, "ps -o pid")
        .await
        .lines()
        .skip(1)
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

async fn assert_no_leftovers(vm: &Vm) {
    let leftovers = vm.hypervisor().disk_leftovers().await.expect("query");
    assert!(leftovers.is_empty(), "QEMU still holds {leftovers:?}");
    let disks = sh(vm, "ls /sys/block | grep '^vd' || true").await;
    assert!(disks.is_empty(), "guest still has {disks}");
    let mounts = sh(vm, "grep -c vmf-containers /proc/mounts || true").await;
    assert_eq!(mounts, "0", "guest mounts left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_in_a_direct_vm() {
    let runtime = runtime_dir();
    let work = tempfile::tempdir().expect("tempdir");
    let image = build_image(work.path());
    let digest = sha256(&image);
    let config = config(runtime.path());
    let backend = config.backend();
    let vm = Vm::boot(backend.as_ref(), &config).await.expect("boot");

    let started = Instant::now();
    let a = vm
        .run_container(&image, &pause("ctr-a", "box-a"))
        .await
        .expect("container a");
    eprintln!("attach + create + start: {:?}", started.elapsed());
    let b = vm
        .run_container(&image, &pause("ctr-b", "box-b"))
        .await
        .expect("container b");

    assert_eq!(
        csh(&vm, "ctr-a", "cat /etc/os-release").await,
        OS_RELEASE.trim()
    );
    assert_eq!(csh(&vm, "ctr-a", "hostname").await, "box-a");
    assert_eq!(csh(&vm, "ctr-b", "hostname").await, "box-b");
    assert!(!sh(&vm, "hostname").await.contains("box-"));
    // PID namespaces: pid 1 is the container's init, and only its processes show.
    let a_pids = pids(&vm, "ctr-a").await;
    assert!(a_pids.contains(&1), "{a_pids:?}");
    assert!(a_pids.iter().all(|pid| *pid < 20), "{a_pids:?}");
    let marker = vm
        .agent()
        .start_in_container(
            "ctr-b",
            ProcessSpec {
                argv: vec!["sleep".into(), "4242".into()],
                ..ProcessSpec::default()
            },
        )
        .await
        .expect("marker");
    let b_ps = csh(&vm, "ctr-b", "ps -o pid,args").await;
    assert!(b_ps.contains("sleep 4242"), "{b_ps}");
    let a_ps = csh(&vm, "ctr-a", "ps -o pid,args").await;
    assert!(
        !a_ps.contains("4242"),
        "container a sees b's process: {a_ps}"
    );
    let b_pids = pids(&vm, "ctr-b").await;
    assert!(
        b_pids.contains(&1) && b_pids.iter().all(|pid| *pid < 20),
        "{b_pids:?}"
    );
    // The root, /proc, /dev, /sys.
    assert_eq!(
        csh(&vm, "ctr-a", "test -e /init && echo yes || echo no").await,
        "no"
    );
    assert_eq!(
        csh(&vm, "ctr-a", "cat /proc/1/status | grep -c ^Pid").await,
        "1"
    );
    assert_eq!(
        csh(&vm, "ctr-a", "echo x > /dev/null && cat /dev/null | wc -c").await,
        "0"
    );
    assert_eq!(
        csh(&vm, "ctr-a", "head -c 32 /dev/urandom | wc -c").await,
        "32"
    );
    assert_eq!(
        csh(&vm, "ctr-a", "test -c /dev/pts/ptmx && echo pts").await,
        "pts"
    );
    assert_eq!(
        csh(
            &vm,
            "ctr-a",
            "touch /sys/x 2>/dev/null && echo rw || echo ro"
        )
        .await,
        "ro"
    );
    assert_eq!(
        csh(
            &vm,
            "ctr-a",
            "echo t > /tmp/t && cat /tmp/t && grep -c ' /tmp tmpfs' /proc/mounts"
        )
        .await,
        "t\n1"
    );
    assert!(csh(&vm, "ctr-a", "cat /etc/hosts").await.contains("box-a"));
    // Users from the image's passwd.
    let (code, id) = csh_status(&vm, "ctr-a", "web", "id -u; id -g; id -G").await;
    // Its supplementary groups are those of /etc/group that list it.
    assert_eq!((code, id.as_str()), (Some(0), "33\n34\n34 55"));
    // As Docker (runc): a group by name from the image's /etc/group, and a uid without
    // an entry gets gid 0.
    let (code, id) = csh_status(&vm, "ctr-a", "web:www", "id -u; id -g").await;
    assert_eq!((code, id.as_str()), (Some(0), "33\n55"));
    let (code, id) = csh_status(&vm, "ctr-a", "1000", "id -u; id -g").await;
    assert_eq!((code, id.as_str()), (Some(0), "1000\n0"));
    // Root in a container keeps Docker's default capabilities, no more: it cannot
    // mount, and nothing it runs can gain more.
    assert_eq!(
        csh(
            &vm,
            "ctr-a",
            "grep -E '^Cap(Eff|Bnd|Inh)' /proc/self/status | tr -s '\\t' ' '"
        )
        .await,
        "CapInh: 0000000000000000\nCapEff: 00000000a80425fb\nCapBnd: 00000000a80425fb"
    );
    let (code, _) = csh_status(
        &vm,
        "ctr-a",
        "",
        "mkdir -p /mnt/x && mount -t tmpfs none /mnt/x",
    )
    .await;
    assert_ne!(code, Some(0), "root in a container mounted a file system");
    let (code, owned) = csh_status(
        &vm,
        "ctr-a",
        "",
        "touch /tmp/o && chown 33 /tmp/o && stat -c %u /tmp/o",
    )
    .await;
    assert_eq!((code, owned.as_str()), (Some(0), "33"), "CHOWN is kept");
    // Writes stay in the container's upper layer.
    csh(
        &vm,
        "ctr-a",
        "echo secret > /etc/written && cat /etc/written",
    )
    .await;
    assert_eq!(
        csh(
            &vm,
            "ctr-b",
            "test -e /etc/written && echo seen || echo unseen"
        )
        .await,
        "unseen"
    );
    // Exec with stdin and stdout streamed.
    let agent = vm.agent();
    let exec_id = agent
        .start_in_container(
            "ctr-a",
            ProcessSpec {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "read x; echo got:$x:$(hostname)".into(),
                ],
                stdin: true,
                ..ProcessSpec::default()
            },
        )
        .await
        .expect("exec");
    let mut stdout = agent
        .output(&exec_id, OutputPipe::Stdout)
        .await
        .expect("stdout");
    agent
        .write_stdin(&exec_id, tokio_stream::iter(vec![b"hello\n".to_vec()]))
        .await
        .expect("stdin");
    agent.close_stdin(&exec_id).await.expect("close");
    let mut out = Vec::new();
    while let Some(chunk) = stdout.next_chunk().await.expect("chunk") {
        out.extend(chunk);
    }
    assert_eq!(String::from_utf8_lossy(&out), "got:hello:box-a\n");
    assert_eq!(
        agent
            .wait_process(&exec_id)
            .await
            .expect("wait")
            .shell_status(),
        0
    );

    // Remove + detach; the marker process died with b's PID namespace.
    let started = Instant::now();
    vm.remove_container(a).await.expect("remove a");
    eprintln!("remove + detach: {:?}", started.elapsed());
    vm.remove_container(b).await.expect("remove b");
    let marker_exit = agent.wait_process(&marker).await.expect("marker wait");
    assert_eq!(marker_exit.signal, Some(9), "{marker_exit:?}");
    assert_no_leftovers(&vm).await;
    assert_eq!(sha256(&image), digest, "the image file changed");

    // A container whose init is a program: its output streams by the container id.
    let spec = ContainerSpec {
        id: "ctr-c".into(),
        init: ProcessSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo init:$$:$(hostname):$(pwd):$(stat -c %u:%a /made/here); cat /etc/os-release | head -1".into(),
            ],
            // A working directory the image lacks is made, as Docker makes it.
            workdir: "/made/here".into(),
            ..ProcessSpec::default()
        },
        ..ContainerSpec::default()
    };
    let c = vm.run_container(&image, &spec).await.expect("container c");
    let mut stdout = agent
        .output("ctr-c", OutputPipe::Stdout)
        .await
        .expect("stdout");
    let mut out = Vec::new();
    while let Some(chunk) = stdout.next_chunk().await.expect("chunk") {
        out.extend(chunk);
    }
    assert_eq!(
        String::from_utf8_lossy(&out),
        "init:1:ctr-c:/made/here:0:755\nNAME=\"vmfactory test image\"\n"
    );
    // Removed in the guest already (an earlier try, or a restarted agent): removing it
    // still detaches its disk.
    agent
        .remove_container("ctr-c")
        .await
        .expect("remove c in the guest");
    assert!(
        !vm.hypervisor()
            .disk_leftovers()
            .await
            .expect("query")
            .is_empty(),
        "the disk is still attached before the host's removal"
    );
    vm.remove_container(c).await.expect("remove c");
    assert_no_leftovers(&vm).await;

    // Bad requests are refused, and the VM goes on.
    let err = vm
        .run_container(&image, &pause("bad/id", ""))
        .await
        .expect_err("bad id");
    assert!(err.to_string().contains("container id"), "{err}");
    assert_no_leftovers(&vm).await;

    // A VM discarded with a disk attached and a container running leaves nothing.
    let _d = vm
        .run_container(&image, &pause("ctr-d", ""))
        .await
        .expect("container d");
    let vm_dir = vm.hypervisor().vm_dir().to_path_buf();
    vm.discard().await.expect("discard");
    assert!(!vm_dir.exists());
    assert!(common::qemu_pids_under(runtime.path()).is_empty());
    assert_eq!(sha256(&image), digest);
}

/// A clone of a new template on `machine` (at `path`) in which a container from `image`
/// ran (root filesystem, hostname, own PID namespace checked) and was removed with its
/// disk, leaving nothing in the guest.
async fn clone_after_one_container(
    runtime: &Path,
    path: &Path,
    image: &Path,
    machine: &str,
) -> (Factory, Vm) {
    let mut config = config(runtime);
    config.qemu.machine_type = machine.into();
    let created = TemplateFactory::new(&config, path, config.backend())
        .await
        .expect("template");
    let factory = Factory::new(Arc::new(created));
    let vm = factory.get_vm(&VmRequest::default()).await.expect("clone");

    let a = vm
        .run_container(image, &pause("clone-a", "clone-box"))
        .await
        .expect("container in a clone");
    assert_eq!(
        csh(&vm, "clone-a", "cat /etc/os-release").await,
        OS_RELEASE.trim()
    );
    assert_eq!(csh(&vm, "clone-a", "hostname").await, "clone-box");
    assert!(pids(&vm, "clone-a").await.contains(&1));
    let started = Instant::now();
    vm.remove_container(a).await.expect("remove");
    eprintln!("{machine} clone: remove + detach: {:?}", started.elapsed());
    assert_no_leftovers(&vm).await;
    (factory, vm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_in_a_template_clone() {
    let runtime = runtime_dir();
    let work = tempfile::tempdir().expect("tempdir");
    let image = build_image(work.path());
    let path = runtime.path().join("template");
    let (factory, vm) = clone_after_one_container(runtime.path(), &path, &image, "q35").await;

    // Stopped with a disk attached: nothing survives.
    let _b = vm
        .run_container(&image, &pause("clone-b", ""))
        .await
        .expect("container b");
    let vm_dir = vm.hypervisor().vm_dir().to_path_buf();
    vm.stop().await.expect("stop");
    assert!(!vm_dir.exists());
    factory.close().await.expect("close");
    let _ = template::destroy(&path);
    assert!(common::qemu_pids_under(runtime.path()).is_empty());
}

/// On the `pc` machine a container's disk is hot-plugged on the root bus (ACPI), not into
/// a PCIe root port: attach, use, remove and detach in a clone of a `pc` template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_in_a_pc_machine_clone() {
    let runtime = runtime_dir();
    let work = tempfile::tempdir().expect("tempdir");
    let image = build_image(work.path());
    let path = runtime.path().join("template");
    let (factory, vm) = clone_after_one_container(runtime.path(), &path, &image, "pc").await;

    // A second disk after the first was detached: the slot was freed.
    let b = vm
        .run_container(&image, &pause("pc-b", ""))
        .await
        .expect("a second container");
    assert_eq!(
        csh(&vm, "pc-b", "cat /etc/os-release").await,
        OS_RELEASE.trim()
    );
    vm.remove_container(b).await.expect("remove b");
    assert_no_leftovers(&vm).await;
    vm.stop().await.expect("stop");
    factory.close().await.expect("close");
    let _ = template::destroy(&path);
    assert!(common::qemu_pids_under(runtime.path()).is_empty());
}
