//! Tests of the configuration: defaults, Kata's keys, and every rule's message.

use super::*;

fn parse(text: &str) -> Result<Settings, SettingsError> {
    Settings::parse(text, Path::new("test.toml"))
}

fn message(text: &str) -> String {
    parse(text).expect_err("invalid").to_string()
}

#[test]
fn empty_file_gives_defaults() {
    assert_eq!(parse("").expect("empty"), Settings::default());
}

#[test]
fn a_runtime_dir_moves_the_template_and_socket_unless_they_are_named() {
    let settings = parse("[hypervisor.qemu]\nruntime_dir = \"/tmp/rt\"\n").expect("runtime_dir");
    assert_eq!(
        settings.factory.template_path,
        Path::new("/tmp/rt/template")
    );
    assert_eq!(
        settings.factory.vm_cache_endpoint,
        Path::new("/tmp/rt/cache.sock")
    );
    let settings = parse(
        "[hypervisor.qemu]\nruntime_dir = \"/tmp/rt\"\n[factory]\ntemplate_path = \"/srv/t\"\n",
    )
    .expect("both");
    assert_eq!(settings.factory.template_path, Path::new("/srv/t"));
    assert_eq!(
        settings.factory.vm_cache_endpoint,
        Path::new("/tmp/rt/cache.sock")
    );
}

#[test]
fn a_kata_factory_section_loads_unchanged() {
    let kata = r#"
[factory]
# VM templating support.
enable_template = true
template_path = "/run/vc/vm/template"
# VMCache
vm_cache_number = 3
vm_cache_endpoint = "/var/run/kata-containers/cache.sock"
"#;
    let settings = parse(kata).expect("kata factory section");
    assert!(settings.factory.enable_template);
    assert_eq!(
        settings.factory.template_path,
        Path::new("/run/vc/vm/template")
    );
    assert_eq!(settings.factory.vm_cache_number, 3);
    assert_eq!(
        settings.factory.vm_cache_endpoint,
        Path::new("/var/run/kata-containers/cache.sock")
    );
}

#[test]
fn unknown_keys_are_named() {
    let err = message("[factory]\nenable_templates = true\n");
    assert!(err.contains("enable_templates"), "{err}");
    let err = message("[hypervisor.qemu]\nmemory = 128\n");
    assert!(err.contains("memory"), "{err}");
}

#[test]
fn a_value_error_names_the_file_and_the_line() {
    assert_eq!(
        message("# sizes\n[hypervisor.qemu]\ndefault_memory = 16\n"),
        "Invalid configuration test.toml (line 3): hypervisor.qemu.default_memory: 16 MiB is \
         too small: give at least 64 MiB"
    );
    // The key's own section's line, not another section's key of the same name.
    let text = "[hypervisor.qemu]\ninitrd = \"/i\"\n[guest]\nkernel = \"debian\"\n";
    assert_eq!(line_of_key(text, "hypervisor.qemu.kernel"), None);
    assert_eq!(line_of_key(text, "guest.kernel"), Some(4));
    assert_eq!(line_of_key(text, "hypervisor.qemu.initrd"), Some(2));
    assert_eq!(line_of_key(text, "hypervisor.qemu.initr"), None);
    let spaced = "[ hypervisor . qemu ] # x\n  kernel_params= \"x\"\n";
    assert_eq!(
        line_of_key(spaced, "hypervisor.qemu.kernel_params"),
        Some(2)
    );
}

#[test]
fn every_rule_names_its_key() {
    let cases = [
        (
            "[hypervisor.qemu]\ndefault_memory = 0",
            "default_memory: is 0",
        ),
        (
            "[hypervisor.qemu]\ndefault_memory = 16",
            "16 MiB is too small",
        ),
        (
            "[hypervisor.qemu]\ndefault_vcpus = 0",
            "default_vcpus: is 0",
        ),
        (
            "[hypervisor.qemu]\ndefault_vcpus = 100000\ndefault_maxvcpus = 100000",
            "exceeds the host's",
        ),
        (
            "[hypervisor.qemu]\ndefault_maxvcpus = 0",
            "default_maxvcpus: 0 is below default_vcpus",
        ),
        ("[hypervisor.qemu]\ndefault_maxvcpus = 300", "exceeds 255"),
        (
            "[hypervisor.qemu]\ndefault_maxmemory = 128",
            "default_maxmemory: 128 MiB is below",
        ),
        (
            "[hypervisor.qemu]\nmemory_slots = 300",
            "memory_slots: 300 exceeds 256",
        ),
        (
            "[hypervisor.qemu]\nmachine_type = \"virt\"",
            "machine_type: \"virt\" is not supported",
        ),
        (
            "[hypervisor.qemu]\nkernel = \"/nonexistent/k\"\ninitrd = \"/nonexistent/i\"",
            "kernel: /nonexistent/k does not exist",
        ),
        (
            "[hypervisor.qemu]\naccelerator = \"tcg\"\nkernel_is_pvm = true",
            "kernel_is_pvm",
        ),
        ("[hypervisor.qemu]\naccelerator = \"xen\"", "xen"),
        (
            "[factory]\ntemplate_warm_pool = 2",
            "template_warm_pool: needs enable_template",
        ),
        (
            "[factory]\nvm_cache_number = 1\nmetrics_address = \"nowhere\"",
            "metrics_address: Invalid metrics address",
        ),
        (
            "[factory]\nmetrics_address = \"127.0.0.1:9464\"",
            "metrics_address: needs vm_cache_number",
        ),
        (
            "[factory]\nenable_template = true\ntemplate_path = \"\"",
            "template_path: is empty",
        ),
        (
            "[factory]\nvm_cache_number = 2\nvm_cache_endpoint = \"\"",
            "vm_cache_endpoint: is empty",
        ),
    ];
    for (text, expected) in cases {
        let err = message(text);
        assert!(err.contains(expected), "{text:?} gave {err:?}");
    }
}

#[test]
fn initrd_larger_than_memory_and_lone_kernel_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("kernel");
    let initrd = dir.path().join("initrd");
    std::fs::write(&kernel, b"k").expect("kernel");
    let file = std::fs::File::create(&initrd).expect("initrd");
    file.set_len(200 << 20).expect("size");
    let text = format!(
        "[hypervisor.qemu]\nkernel = {:?}\ninitrd = {:?}\ndefault_memory = 128\n",
        kernel, initrd
    );
    let err = message(&text);
    assert!(err.contains("larger than guest memory"), "{err}");
    let text = format!("[hypervisor.qemu]\nkernel = {kernel:?}\n");
    let err = message(&text);
    assert!(
        err.contains("kernel and initrd must be set together"),
        "{err}"
    );
}

#[test]
fn vm_config_takes_sizes_and_the_image() {
    let settings =
        parse("[hypervisor.qemu]\ndefault_memory = 512\ntcg_tb_size = 32\n").expect("settings");
    let config = settings.vm_config(Some(("/img/vmlinux".into(), "/img/initrd".into())));
    assert_eq!(config.memory_mib, 512);
    assert_eq!(config.kernel, Path::new("/img/vmlinux"));
    assert_eq!(config.initrd.as_deref(), Some(Path::new("/img/initrd")));
    assert_eq!(config.qemu.tb_size_mib, Some(32));
    assert!(
        settings.hypervisor.qemu.stub_unused_libraries,
        "on by default"
    );
    let off = parse("[hypervisor.qemu]\nstub_unused_libraries = false\n").expect("settings");
    assert!(!off.hypervisor.qemu.stub_unused_libraries);
    // Its name before is read too.
    let off = parse("[hypervisor.qemu]\nstub_disassembler = false\n").expect("settings");
    assert!(!off.hypervisor.qemu.stub_unused_libraries);
    assert_eq!(config.agent_timeout, Duration::from_secs(30));
}

#[test]
fn memory_keys_are_bounded_by_the_host() {
    let mut settings = Settings::default();
    settings.hypervisor.qemu.default_memory = 1024;
    settings.hypervisor.qemu.default_maxmemory = 1024;
    assert!(settings.validate_against_host(Some(1024)).is_ok());
    assert!(settings.validate_against_host(None).is_ok(), "unknown host");
    let err = settings
        .validate_against_host(Some(512))
        .expect_err("a small host")
        .to_string();
    assert!(
        err.contains("default_memory: 1024 MiB exceeds the host's memory (512 MiB)"),
        "{err}"
    );
    assert!(
        host_memory_mib().is_some_and(|mib| mib > 0),
        "MemTotal read"
    );
    assert!(
        Settings::default().hypervisor.qemu.default_maxmemory
            <= host_memory_mib().unwrap_or(u32::MAX),
        "the default fits the host"
    );
}

#[test]
fn an_oversized_file_is_refused_without_reading_it_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let huge = dir.path().join("huge.toml");
    let file = std::fs::File::create(&huge).expect("file");
    file.set_len(64 << 30).expect("sparse 64 GiB");
    let err = Settings::load(Some(&huge))
        .expect_err("too large")
        .to_string();
    assert!(err.contains("larger than 1024 KiB"), "{err}");
    assert!(err.contains("huge.toml"), "{err}");
    let small = dir.path().join("small.toml");
    std::fs::write(&small, "[factory]\nvm_cache_number = 2\n").expect("write");
    assert_eq!(
        Settings::load(Some(&small))
            .expect("load")
            .factory
            .vm_cache_number,
        2
    );
}

#[test]
fn paths_the_system_cannot_use_are_refused_naming_the_key() {
    let long = format!("/{}", "r".repeat(80));
    let err = message(&format!("[hypervisor.qemu]\nruntime_dir = {long:?}"));
    assert!(
        err.contains("hypervisor.qemu.runtime_dir: is 81 bytes long"),
        "{err}"
    );
    assert!(err.contains("at most 73 bytes"), "{err}");
    let err = message(&format!(
        "[factory]\nvm_cache_endpoint = \"/{}\"",
        "e".repeat(120)
    ));
    assert!(
        err.contains("factory.vm_cache_endpoint: is 121 bytes"),
        "{err}"
    );
    let err = message(&format!(
        "[factory]\ntemplate_path = \"/{}\"",
        "t".repeat(300)
    ));
    assert!(
        err.contains("factory.template_path: has a component of 300"),
        "{err}"
    );
    let err = message("[factory]\ntemplate_path = \"/a\\u0000b\"");
    assert!(
        err.contains("factory.template_path: contains a NUL"),
        "{err}"
    );
    let err = message("[factory]\nenable_template = true\ntemplate_path = \"relative\"");
    assert!(
        err.contains("factory.template_path: \"relative\" is not an absolute path"),
        "{err}"
    );
    let err = message("[factory]\nvm_cache_endpoint = \"cache.sock\"");
    assert!(
        err.contains("factory.vm_cache_endpoint: \"cache.sock\" is not an absolute"),
        "{err}"
    );
    let odd = "[hypervisor.qemu]\nruntime_dir = \"/tmp/a b,c\\\"d'e\"\n[factory]\ntemplate_path = \"/tmp/t, \\\"x\\\"\"";
    assert!(parse(odd).is_ok(), "spaces, commas and quotes are fine");
    let err = message("[hypervisor.qemu]\ndefault_memory = 99999999");
    assert!(
        err.contains("default_memory: 99999999 MiB exceeds the host's memory"),
        "{err}"
    );
}

#[test]
fn the_guest_kernel_is_ours_unless_debian_is_asked_for() {
    assert_eq!(
        parse("").expect("empty").guest.kernel,
        KernelSource::Vmfactory
    );
    let settings = parse("[guest]\nkernel = \"debian\"\n").expect("debian");
    assert_eq!(settings.guest.kernel, KernelSource::Debian);
    let err = message("[guest]\nkernel = \"linux\"\n");
    assert!(err.contains("vmfactory") && err.contains("debian"), "{err}");
    let err = message("[guest]\nkernels = \"debian\"\n");
    assert!(err.contains("kernels"), "{err}");
}

#[test]
fn syntax_errors_name_the_line_and_column() {
    let err = message("[factory]\nenable_template = true\nvm_cache_number = \"three\"\n");
    assert!(err.contains("(line 3, column 19)"), "{err}");
    assert_eq!(line_and_column("ab\ncdé\nx", 7), (2, 4));
    assert_eq!(
        line_and_column("ab\ncdé\nx", 6),
        (2, 3),
        "inside a character"
    );
    assert_eq!(line_and_column("ab\ncdé\nx", 8), (3, 1));
    assert_eq!(line_and_column("", 5), (1, 1));
}
