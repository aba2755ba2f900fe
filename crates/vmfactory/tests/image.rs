//! `vmfactory image build|ls|rm` on the two-layer test image (OCI layout tar and
//! `docker save` archive), in a private cache directory.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use common::{text, BIN};
use serde_json::Value;
use vmfactory_image::fixtures;

fn vmfactory(cache: &Path, args: &[&str]) -> Output {
    let output = Command::new(BIN)
        .args(args)
        .env("VMFACTORY_CACHE_DIR", cache)
        .output()
        .expect("run vmfactory");
    output
}

fn json(output: &Output) -> Value {
    assert!(output.status.success(), "{}", text(output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| panic!("{err}: {}", text(output)))
}

#[test]
fn image_build_twice_ls_and_rm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cache = tmp.path().join("cache");
    let oci = tmp.path().join("image.tar");
    let fixture = fixtures::write_oci_layout_tar(&oci, None).expect("write the OCI fixture");
    let reference = format!("{}:latest", oci.display());

    let first = json(&vmfactory(
        &cache,
        &["image", "build", "--json", &reference],
    ));
    assert_eq!(first["digest"], fixture.digest.as_str());
    assert_eq!(first["cached"], false);
    assert_eq!(first["fs_type"], "erofs");
    assert_eq!(first["config"]["working_dir"], "/work");
    assert!(first["config"]["env"]
        .as_array()
        .expect("env")
        .contains(&Value::from("GREETING=hello")));
    let disk = first["disk"].as_str().expect("disk").to_string();
    assert!(disk.starts_with(cache.join("rootfs").to_str().expect("utf8")));
    assert!(Path::new(&disk).is_file());

    let started = Instant::now();
    let second = json(&vmfactory(
        &cache,
        &["image", "build", "--json", &reference],
    ));
    eprintln!(
        "second image build (cache hit, whole process) took {:?}",
        started.elapsed()
    );
    assert_eq!(second["cached"], true);
    assert_eq!(second["disk"], disk.as_str());

    // The same image from a docker save archive, as ext4, with text output.
    let docker = tmp.path().join("saved.tar");
    let docker_fixture =
        fixtures::write_docker_archive(&docker, None).expect("write the docker fixture");
    let output = vmfactory(
        &cache,
        &[
            "image",
            "build",
            "--fs",
            "ext4",
            docker.to_str().expect("utf8"),
        ],
    );
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("digest: {}", docker_fixture.digest)),
        "{stdout}"
    );
    assert!(stdout.contains("fs: ext4"), "{stdout}");

    let listed = json(&vmfactory(&cache, &["image", "ls", "--json"]));
    let listed = listed.as_array().expect("a list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    let entry = listed
        .iter()
        .find(|e| e["digest"] == fixture.digest.as_str())
        .expect("the OCI image is listed");
    assert_eq!(entry["fs_types"], serde_json::json!(["erofs"]));
    assert!(entry["sources"][0]
        .as_str()
        .expect("source")
        .ends_with("image.tar:latest"));
    let table = vmfactory(&cache, &["image", "ls"]);
    assert!(
        text(&table).contains(&fixture.digest[..19]),
        "{}",
        text(&table)
    );

    // rm by a digest prefix and by reference; a second rm fails and says what to do.
    let hex_prefix = &fixture.digest["sha256:".len()..][..12];
    let output = vmfactory(&cache, &["image", "rm", hex_prefix]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(!Path::new(&disk).exists());
    let output = vmfactory(&cache, &["image", "rm", docker.to_str().expect("utf8")]);
    assert!(output.status.success(), "{}", text(&output));
    let listed = json(&vmfactory(&cache, &["image", "ls", "--json"]));
    assert_eq!(listed, serde_json::json!([]));
    let output = vmfactory(&cache, &["image", "rm", hex_prefix]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("vmfactory image ls"),
        "{}",
        text(&output)
    );

    // A relative reference finds its image also once the file is gone (the cache
    // records it by its absolute path).
    fixtures::write_oci_layout_tar(&tmp.path().join("tmp1.tar"), None).expect("write");
    let in_tmp = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("VMFACTORY_CACHE_DIR", &cache)
            .current_dir(tmp.path())
            .output()
            .expect("run vmfactory")
    };
    let output = in_tmp(&["image", "build", "tmp1.tar"]);
    assert!(output.status.success(), "{}", text(&output));
    std::fs::remove_file(tmp.path().join("tmp1.tar")).expect("remove");
    let output = in_tmp(&["image", "rm", "tmp1.tar"]);
    assert!(output.status.success(), "{}", text(&output));

    // An empty reference is a usage error (exit status 2).
    for args in [["image", "build", ""], ["image", "rm", ""]] {
        let output = vmfactory(&cache, &args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", text(&output));
        assert!(text(&output).contains("empty"), "{}", text(&output));
    }

    // Anything else is refused with a clear message.
    let output = vmfactory(&cache, &["image", "build", "/nonexistent/image"]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("registry references are not supported"),
        "{}",
        text(&output)
    );
    let not_an_image = tmp.path().join("plain.tar");
    std::fs::write(&not_an_image, b"").expect("write");
    let output = vmfactory(
        &cache,
        &["image", "build", not_an_image.to_str().expect("utf8")],
    );
    assert!(!output.status.success());
    assert!(
        text(&output).contains("neither an OCI image layout"),
        "{}",
        text(&output)
    );
}
