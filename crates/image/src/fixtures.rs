//! Test images: layer tars, OCI image layouts and `docker save` archives written from
//! scratch (feature `testing`). [`write_oci_layout_tar`] and [`write_docker_archive`] are
//! the two-layer image the integration tests run.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use serde_json::json;

fn sha256_hex(data: &[u8]) -> String {
    crate::source::sha256_hex(data)
}

/// How a layer blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    fn compress(self, tar: &[u8]) -> io::Result<Vec<u8>> {
        match self {
            Compression::None => Ok(tar.to_vec()),
            Compression::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(tar)?;
                gz.finish()
            }
            Compression::Zstd => zstd::encode_all(tar, 1),
        }
    }
}

/// Builds one layer tar.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl std::fmt::Debug for LayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LayerBuilder")
    }
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    header
}

impl LayerBuilder {
    pub fn new() -> Self {
        Self {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    pub fn dir(mut self, path: &str, mode: u32) -> io::Result<Self> {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        self.tar.append_data(&mut h, path, io::empty())?;
        Ok(self)
    }

    pub fn file(self, path: &str, content: &[u8], mode: u32) -> io::Result<Self> {
        self.file_owned(path, content, mode, 0, 0)
    }

    pub fn file_owned(
        mut self,
        path: &str,
        content: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> io::Result<Self> {
        let mut h = header(tar::EntryType::Regular, mode, content.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.tar.append_data(&mut h, path, content)?;
        Ok(self)
    }

    pub fn symlink(mut self, path: &str, target: &str) -> io::Result<Self> {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path, target)?;
        Ok(self)
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> io::Result<Self> {
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        self.tar.append_link(&mut h, path, target)?;
        Ok(self)
    }

    /// Deletes `path` of lower layers (`DIR/.wh.NAME`).
    pub fn whiteout(self, path: &str) -> io::Result<Self> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let marker = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&marker, b"", 0o644)
    }

    /// Hides everything lower layers had in `dir` (`DIR/.wh..wh..opq`).
    pub fn opaque(self, dir: &str) -> io::Result<Self> {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    /// An entry whose name is written as given, unchecked (for hostile layers).
    pub fn raw(
        mut self,
        kind: tar::EntryType,
        path: &[u8],
        link: Option<&[u8]>,
        content: &[u8],
    ) -> io::Result<Self> {
        let mut h = header(kind, 0o644, content.len() as u64);
        let gnu = h
            .as_gnu_mut()
            .ok_or_else(|| io::Error::other("not a GNU header"))?;
        if path.len() > gnu.name.len() || link.is_some_and(|l| l.len() > gnu.linkname.len()) {
            return Err(io::Error::other("raw path too long"));
        }
        gnu.name[..path.len()].copy_from_slice(path);
        if let Some(link) = link {
            gnu.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_cksum();
        self.tar.append(&h, content)?;
        Ok(self)
    }

    pub fn finish(self) -> io::Result<Vec<u8>> {
        self.tar.into_inner()
    }
}

fn write_blob(layout: &Path, data: &[u8]) -> io::Result<String> {
    let digest = sha256_hex(data);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join(&digest), data)?;
    Ok(format!("sha256:{digest}"))
}

/// An OCI image config (linux/amd64) with `config` as its `config` and the diff_ids of
/// `layers` (uncompressed tars).
pub fn image_config(config: serde_json::Value, layers: &[Vec<u8>]) -> serde_json::Value {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
}

/// Writes an OCI image layout into `dir` (created): one manifest of `layers`
/// (uncompressed tars, stored with their compression) and `config` (see
/// [`image_config`]), tagged `tag`. Returns the manifest digest.
pub fn oci_layout(
    dir: &Path,
    layers: &[(Vec<u8>, Compression)],
    config: &serde_json::Value,
    tag: &str,
) -> io::Result<String> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let config_data = serde_json::to_vec(config)?;
    let config_digest = write_blob(dir, &config_data)?;
    let mut descriptors = Vec::new();
    for (tar, compression) in layers {
        let blob = compression.compress(tar)?;
        let digest = write_blob(dir, &blob)?;
        descriptors.push(json!({
            "mediaType": compression.media_type(),
            "digest": digest,
            "size": blob.len(),
        }));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_data.len(),
        },
        "layers": descriptors,
    }))?;
    let manifest_digest = write_blob(dir, &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(manifest_digest)
}

/// Writes a `docker save` directory as Docker before 25 did (legacy layout:
/// `<id>/layer.tar`, `<hex>.json`; an id per layer and its position, chained like docker's)
/// into `dir`. A layer that repeats an earlier one is a symlink to its first copy
/// (`../<id>/layer.tar`), as docker writes it. Returns the config digest (docker's image
/// ID).
pub fn docker_dir(
    dir: &Path,
    layers: &[Vec<u8>],
    config: &serde_json::Value,
    repo_tag: &str,
) -> io::Result<String> {
    fs::create_dir_all(dir)?;
    let config_data = serde_json::to_vec(config)?;
    let config_hex = sha256_hex(&config_data);
    fs::write(dir.join(format!("{config_hex}.json")), &config_data)?;
    let mut paths = Vec::new();
    let mut first_copy = std::collections::HashMap::new();
    let mut parent = String::new();
    for tar in layers {
        let diff_id = sha256_hex(tar);
        let id = sha256_hex(format!("{parent}\n{diff_id}").as_bytes());
        fs::create_dir_all(dir.join(&id))?;
        let layer = dir.join(&id).join("layer.tar");
        match first_copy.get(&diff_id) {
            Some(first) => std::os::unix::fs::symlink(format!("../{first}/layer.tar"), &layer)?,
            None => {
                fs::write(&layer, tar)?;
                first_copy.insert(diff_id, id.clone());
            }
        }
        paths.push(format!("{id}/layer.tar"));
        parent = id;
    }
    let manifest = json!([{
        "Config": format!("{config_hex}.json"),
        "RepoTags": [repo_tag],
        "Layers": paths,
    }]);
    fs::write(dir.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
    Ok(format!("sha256:{config_hex}"))
}

/// Writes a tar of the contents of `dir` to `out`.
pub fn tar_dir(dir: &Path, out: &Path) -> io::Result<()> {
    let mut tar = tar::Builder::new(fs::File::create(out)?);
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir)?;
    tar.into_inner()?.sync_all()
}

/// The two-layer test image: what is in it and what its config says.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// Digest `ImageStore::prepare` gives (manifest digest, or config digest for docker).
    pub digest: String,
    /// Files in the flattened image and their contents (`bin/busybox` excepted).
    pub files: Vec<(&'static str, &'static [u8])>,
    /// Files a layer deleted (absent from the image).
    pub deleted: Vec<&'static str>,
}

/// Content of `/work/added.txt` in the fixture.
pub const ADDED: &[u8] = b"added by layer 2\n";

fn fixture_layers(busybox: Option<&Path>) -> io::Result<(Vec<Vec<u8>>, serde_json::Value)> {
    let busybox = match busybox {
        Some(path) => fs::read(path)?,
        None => b"#!/bin/false\nnot a busybox\n".to_vec(),
    };
    let layer1 = LayerBuilder::new()
        .dir("bin", 0o755)?
        .file("bin/busybox", &busybox, 0o755)?
        .symlink("bin/sh", "busybox")?
        .hardlink("bin/cat", "bin/busybox")?
        .dir("etc", 0o755)?
        .file("etc/kept.txt", b"kept\n", 0o644)?
        .file("etc/removed.txt", b"removed by layer 2\n", 0o644)?
        .finish()?;
    let layer2 = LayerBuilder::new()
        .whiteout("etc/removed.txt")?
        .dir("work", 0o755)?
        .file("work/added.txt", ADDED, 0o644)?
        .finish()?;
    let config = image_config(
        json!({
            "Env": ["PATH=/bin", "GREETING=hello"],
            "WorkingDir": "/work",
            "Cmd": ["/bin/sh", "-c", "echo $GREETING; cat added.txt"],
        }),
        &[layer1.clone(), layer2.clone()],
    );
    Ok((vec![layer1, layer2], config))
}

fn fixture(digest: String) -> Fixture {
    Fixture {
        digest,
        files: vec![("etc/kept.txt", b"kept\n"), ("work/added.txt", ADDED)],
        deleted: vec!["etc/removed.txt"],
    }
}

/// Writes the two-layer test image as an OCI layout tar (tag `latest`; layer 1
/// uncompressed, layer 2 gzip): layer 1 has `/bin/busybox` (a copy of `busybox`, or a
/// stand-in script), `/bin/sh` (symlink) and `/bin/cat` (hard link) to it,
/// `/etc/kept.txt` and `/etc/removed.txt`; layer 2 deletes `/etc/removed.txt` by whiteout
/// and adds `/work/added.txt`. The config sets `Env` `GREETING=hello` (and `PATH=/bin`),
/// `WorkingDir` `/work` and `Cmd` `/bin/sh -c 'echo $GREETING; cat added.txt'`.
pub fn write_oci_layout_tar(out: &Path, busybox: Option<&Path>) -> io::Result<Fixture> {
    let (layers, config) = fixture_layers(busybox)?;
    let dir = tempfile::tempdir()?;
    let digest = oci_layout(
        dir.path(),
        &[
            (layers[0].clone(), Compression::None),
            (layers[1].clone(), Compression::Gzip),
        ],
        &config,
        "latest",
    )?;
    tar_dir(dir.path(), out)?;
    Ok(fixture(digest))
}

/// The same image as [`write_oci_layout_tar`], as a `docker save` archive (repo tag
/// `fixture:latest`).
pub fn write_docker_archive(out: &Path, busybox: Option<&Path>) -> io::Result<Fixture> {
    let (layers, config) = fixture_layers(busybox)?;
    let dir = tempfile::tempdir()?;
    let digest = docker_dir(dir.path(), &layers, &config, "fixture:latest")?;
    tar_dir(dir.path(), out)?;
    Ok(fixture(digest))
}

/// Extracts the static busybox of the `busybox-static` .deb that the guest image build
/// downloads (`<cache_dir>/downloads/busybox-static_*.deb`) to `out`, for fixtures whose
/// programs must run in the guest. `None` when there is no such .deb.
pub fn static_busybox(cache_dir: &Path, out: &Path) -> io::Result<Option<std::path::PathBuf>> {
    let Ok(listing) = fs::read_dir(cache_dir.join("downloads")) else {
        return Ok(None);
    };
    let Some(deb) = listing.filter_map(Result::ok).map(|e| e.path()).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("busybox-static_") && n.ends_with(".deb"))
    }) else {
        return Ok(None);
    };
    let output = std::process::Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "dpkg-deb --fsys-tarfile {} failed",
            deb.display()
        )));
    }
    let mut archive = tar::Archive::new(output.stdout.as_slice());
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.path()?.as_ref() == Path::new("./bin/busybox") {
            let mut file = fs::File::create(out)?;
            io::copy(&mut entry, &mut file)?;
            fs::set_permissions(
                out,
                <fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
            )?;
            return Ok(Some(out.to_path_buf()));
        }
    }
    Ok(None)
}
