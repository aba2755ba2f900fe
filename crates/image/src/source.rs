//! Reading image sources: OCI image layouts and `docker save` directories (a tar of
//! either is unpacked to a directory first), with every blob checked against its digest.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::{ImageConfig, ImageError};

/// Largest JSON document (index, manifest, config) we read.
const MAX_JSON: u64 = 16 << 20;
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The kind of a directory source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirKind {
    Oci,
    Docker,
    Rootfs,
}

pub(crate) fn dir_kind(dir: &Path) -> DirKind {
    if dir.join("oci-layout").is_file() || dir.join("index.json").is_file() {
        DirKind::Oci
    } else if dir.join("manifest.json").is_file() {
        DirKind::Docker
    } else {
        DirKind::Rootfs
    }
}

/// How a layer is checked.
#[derive(Debug, Clone)]
pub(crate) enum Check {
    /// sha256 of the blob as stored (OCI descriptors).
    Blob { digest: String, size: Option<u64> },
    /// sha256 of the uncompressed tar (docker's `rootfs.diff_ids`).
    DiffId(String),
}

/// A layer to apply.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub path: PathBuf,
    pub check: Check,
}

/// An image found in a layout, before its layers are read.
#[derive(Debug)]
pub(crate) struct Image {
    /// The cache key: the manifest digest (OCI) or config digest (docker).
    pub digest: String,
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// `sha256:<64 hex>` → the hex part; anything else is refused.
pub(crate) fn sha256_of(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(hex)
        }
        _ => Err(ImageError::BadImage(format!(
            "unsupported digest {digest:?} (only sha256 is supported)"
        ))),
    }
}

fn read_limited(path: &Path, what: &str) -> Result<Vec<u8>, ImageError> {
    let file = File::open(path).map_err(|source| ImageError::Io {
        what: format!("open {what} {}", path.display()),
        source,
    })?;
    let mut data = Vec::new();
    file.take(MAX_JSON + 1)
        .read_to_end(&mut data)
        .map_err(|source| ImageError::Io {
            what: format!("read {what} {}", path.display()),
            source,
        })?;
    if data.len() as u64 > MAX_JSON {
        return Err(ImageError::BadImage(format!(
            "{what} {} is larger than {MAX_JSON} bytes",
            path.display()
        )));
    }
    Ok(data)
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    Ok(layout.join("blobs/sha256").join(sha256_of(digest)?))
}

/// Reads a small blob and checks its digest and size.
fn read_blob(layout: &Path, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let digest = desc.digest().to_string();
    let data = read_limited(&blob_path(layout, &digest)?, "blob")?;
    check_bytes(&data, &digest, Some(desc.size()))?;
    Ok(data)
}

fn check_bytes(data: &[u8], digest: &str, size: Option<u64>) -> Result<(), ImageError> {
    let want = sha256_of(digest)?;
    let got = sha256_hex(data);
    if got != want || size.is_some_and(|size| size != data.len() as u64) {
        return Err(ImageError::DigestMismatch {
            expected: digest.to_string(),
            actual: format!("sha256:{got}"),
        });
    }
    Ok(())
}

fn parse<T: for<'de> Deserialize<'de>>(data: &[u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(data).map_err(|err| ImageError::BadImage(format!("{what}: {err}")))
}

/// Most entries of an image's `Env`, and of its `Entrypoint` and `Cmd` together, and most
/// bytes of each: a quarter of what the agent takes for a process, so that the user's own
/// arguments and variables still fit beside them.
const MAX_CONFIG_ENTRIES: usize = 1024;
const MAX_CONFIG_BYTES: usize = 256 << 10;

/// Refuses, when the image is built rather than when a command runs, what no process can
/// be started with: an `Env` entry that is not `NAME=VALUE` (a name, no NUL), a NUL in the
/// command line, or more of either than a process takes.
fn check_config(config: &ImageConfig) -> Result<(), ImageError> {
    let bad = |problem: String| {
        ImageError::BadImage(format!(
            "its config {problem}; no process could be started with it: fix the image"
        ))
    };
    let command: Vec<&String> = config.entrypoint.iter().chain(&config.cmd).collect();
    for (what, list) in [
        ("Env", config.env.iter().collect::<Vec<_>>()),
        ("Entrypoint and Cmd", command),
    ] {
        let bytes: usize = list.iter().map(|entry| entry.len()).sum();
        if list.len() > MAX_CONFIG_ENTRIES || bytes > MAX_CONFIG_BYTES {
            return Err(bad(format!(
                "has {} {what} entries of {bytes} bytes (at most {MAX_CONFIG_ENTRIES} of \
                 {MAX_CONFIG_BYTES} bytes)",
                list.len()
            )));
        }
        if let Some(entry) = list.iter().find(|entry| entry.contains('\0')) {
            return Err(bad(format!(
                "has a NUL byte in its {what} entry {:?}",
                entry.chars().take(64).collect::<String>()
            )));
        }
    }
    if let Some(entry) = config
        .env
        .iter()
        .find(|entry| !matches!(entry.split_once('='), Some((name, _)) if !name.is_empty()))
    {
        return Err(bad(format!(
            "has the Env entry {:?}, which is not NAME=VALUE",
            entry.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

fn config_of(data: &[u8]) -> Result<(ImageConfig, Vec<String>), ImageError> {
    let parsed: ImageConfiguration = parse(data, "image config")?;
    let config = parsed
        .config()
        .as_ref()
        .map(|c| ImageConfig {
            env: c.env().clone().unwrap_or_default(),
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone().filter(|d| !d.is_empty()),
            user: c.user().clone().filter(|u| !u.is_empty()),
        })
        .unwrap_or_default()
        .with_default_path();
    check_config(&config)?;
    Ok((config, parsed.rootfs().diff_ids().clone()))
}

/// Whether a descriptor is for linux/amd64 (or says nothing about its platform).
fn linux_amd64(desc: &Descriptor) -> bool {
    match desc.platform() {
        Some(p) => *p.os() == Os::Linux && *p.architecture() == Arch::Amd64,
        None => true,
    }
}

/// Picks the manifest of an OCI layout: the one tagged `tag`, else the only one, else the
/// first for linux/amd64.
pub(crate) fn oci_image(layout: &Path, tag: Option<&str>) -> Result<Image, ImageError> {
    let index: ImageIndex = parse(
        &read_limited(&layout.join("index.json"), "index")?,
        "index.json",
    )?;
    let manifests = index.manifests();
    let chosen = match tag {
        Some(tag) => manifests.iter().find(|d| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .is_some_and(|name| name == tag)
        }),
        None if manifests.len() == 1 => manifests.first(),
        None => manifests.iter().find(|d| linux_amd64(d)),
    };
    let Some(mut desc) = chosen.cloned() else {
        let names: Vec<String> = manifests
            .iter()
            .filter_map(|d| d.annotations().as_ref()?.get(REF_NAME).cloned())
            .collect();
        return Err(ImageError::NoSuchImage(match tag {
            Some(tag) => format!(
                "no manifest tagged {tag:?} in {} (tags: {names:?})",
                layout.display()
            ),
            None => format!(
                "no linux/amd64 manifest in {} (tags: {names:?})",
                layout.display()
            ),
        }));
    };
    // A nested index (multi-platform image): take its linux/amd64 manifest.
    if desc.media_type().to_string().contains("index") {
        let nested: ImageIndex = parse(&read_blob(layout, &desc)?, "nested index")?;
        desc = nested
            .manifests()
            .iter()
            .find(|d| linux_amd64(d))
            .cloned()
            .ok_or_else(|| {
                ImageError::NoSuchImage(format!("No linux/amd64 manifest in {}", layout.display()))
            })?;
    }
    let manifest: ImageManifest = parse(&read_blob(layout, &desc)?, "manifest")?;
    let (config, _) = config_of(&read_blob(layout, manifest.config())?)?;
    let layers = manifest
        .layers()
        .iter()
        .map(|d| {
            let digest = d.digest().to_string();
            Ok(Layer {
                path: blob_path(layout, &digest)?,
                check: Check::Blob {
                    digest,
                    size: Some(d.size()),
                },
            })
        })
        .collect::<Result<_, ImageError>>()?;
    Ok(Image {
        digest: desc.digest().to_string(),
        config,
        layers,
    })
}

#[derive(Debug, Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

/// A path inside a `docker save` directory, refused if it leaves it.
fn inside(dir: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let parts = crate::flatten::components(rel.as_bytes())?;
    if parts.is_empty() {
        return Err(ImageError::BadImage(format!(
            "empty path {rel:?} in manifest.json"
        )));
    }
    Ok(parts.iter().fold(dir.to_path_buf(), |p, c| {
        p.join(std::str::from_utf8(c).unwrap_or("?"))
    }))
}

/// Picks the image of a `docker save` directory: the one with repo tag `tag` (`name:tag`
/// or just the tag), else the only one, else the first.
pub(crate) fn docker_image(dir: &Path, tag: Option<&str>) -> Result<Image, ImageError> {
    let manifests: Vec<DockerManifest> = parse(
        &read_limited(&dir.join("manifest.json"), "manifest")?,
        "manifest.json",
    )?;
    let chosen = match tag {
        Some(tag) => manifests.iter().find(|m| {
            m.repo_tags
                .iter()
                .flatten()
                .any(|t| t == tag || t.rsplit_once(':').is_some_and(|(_, t)| t == tag))
        }),
        None => manifests.first(),
    };
    let Some(manifest) = chosen else {
        return Err(ImageError::NoSuchImage(format!(
            "no image{} in {}",
            tag.map(|t| format!(" tagged {t:?}")).unwrap_or_default(),
            dir.display()
        )));
    };
    let config_data = read_limited(&inside(dir, &manifest.config)?, "config")?;
    let digest = format!("sha256:{}", sha256_hex(&config_data));
    // Newer docker names blobs by digest: then the name must match the content too.
    if let Some(name) = manifest.config.strip_prefix("blobs/sha256/") {
        check_bytes(&config_data, &format!("sha256:{name}"), None)?;
    }
    let (config, diff_ids) = config_of(&config_data)?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(ImageError::BadImage(format!(
            "manifest.json lists {} layers, the config {} diff_ids",
            manifest.layers.len(),
            diff_ids.len()
        )));
    }
    let layers = manifest
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(path, diff_id)| {
            sha256_of(&diff_id)?;
            Ok(Layer {
                path: inside(dir, path)?,
                check: Check::DiffId(diff_id),
            })
        })
        .collect::<Result<_, ImageError>>()?;
    Ok(Image {
        digest,
        config,
        layers,
    })
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads to the end (tar readers stop at the end-of-archive blocks) and checks.
    fn finish(mut self, digest: &str, size: Option<u64>) -> Result<(), ImageError> {
        io::copy(&mut self, &mut io::sink()).map_err(|source| ImageError::Io {
            what: "read layer".into(),
            source,
        })?;
        let got = format!("{:x}", self.hasher.finalize());
        if got != sha256_of(digest)? || size.is_some_and(|s| s != self.count) {
            return Err(ImageError::DigestMismatch {
                expected: digest.to_string(),
                actual: format!("sha256:{got}"),
            });
        }
        Ok(())
    }
}

/// Opens a layer, undoes gzip or zstd compression (found by magic bytes), hands the tar
/// stream to `apply`, and checks the digest of what was read.
pub(crate) fn read_layer<T>(
    layer: &Layer,
    apply: impl FnOnce(&mut dyn Read) -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    let file = File::open(&layer.path).map_err(|source| ImageError::Io {
        what: format!("open layer {}", layer.path.display()),
        source,
    })?;
    let io_err = |source| ImageError::Io {
        what: format!("read layer {}", layer.path.display()),
        source,
    };
    match &layer.check {
        Check::Blob { digest, size } => {
            let mut blob = BufReader::with_capacity(1 << 20, Hashing::new(file));
            let out = with_decompression(&mut blob, apply).map_err(|e| e.or_io(io_err))?;
            let inner = blob.into_inner();
            // What the BufReader had buffered but the decompressor did not consume was
            // hashed already; the rest is hashed by `finish`.
            inner.finish(digest, *size)?;
            Ok(out)
        }
        Check::DiffId(diff_id) => {
            let mut blob = BufReader::with_capacity(1 << 20, file);
            let mut out = None;
            with_decompression(&mut blob, |tar| {
                let mut hashing = Hashing::new(tar);
                out = Some(apply(&mut hashing)?);
                hashing.finish(diff_id, None)
            })
            .map_err(|e| e.or_io(io_err))?;
            out.ok_or_else(|| ImageError::BadLayer("layer not read".into()))
        }
    }
}

enum Either {
    Image(ImageError),
    Io(io::Error),
}

impl Either {
    fn or_io(self, f: impl FnOnce(io::Error) -> ImageError) -> ImageError {
        match self {
            Either::Image(err) => err,
            Either::Io(err) => f(err),
        }
    }
}

fn with_decompression<T>(
    blob: &mut BufReader<impl Read>,
    apply: impl FnOnce(&mut dyn Read) -> Result<T, ImageError>,
) -> Result<T, Either> {
    let head = blob.fill_buf().map_err(Either::Io)?;
    if head.starts_with(&[0x1f, 0x8b]) {
        let mut gz = flate2::bufread::MultiGzDecoder::new(blob);
        let out = apply(&mut gz).map_err(Either::Image)?;
        io::copy(&mut gz, &mut io::sink()).map_err(Either::Io)?;
        Ok(out)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut zst = zstd::stream::read::Decoder::with_buffer(blob).map_err(Either::Io)?;
        let out = apply(&mut zst).map_err(Either::Image)?;
        io::copy(&mut zst, &mut io::sink()).map_err(Either::Io)?;
        Ok(out)
    } else {
        let out = apply(blob).map_err(Either::Image)?;
        io::copy(blob, &mut io::sink()).map_err(Either::Io)?;
        Ok(out)
    }
}

/// Most bytes of link paths and targets an outer tar may hold (they are kept in memory
/// until every file is unpacked). `docker save` writes one short link per repeated layer.
const MAX_LINK_BYTES: usize = 16 << 20;

/// A path inside an outer tar, as checked components.
type ArchivePath = Vec<Vec<u8>>;

/// Unpacks a tar of an OCI layout or `docker save` output into `dest`: regular files and
/// directories, paths checked. Symlinks and hard links to files of the archive become
/// hard links once every file is unpacked (Docker before 25 saves a layer that repeats
/// an earlier one as a symlink `../<id>/layer.tar` to its first copy); no symlink is
/// created, so nothing read from `dest` later can lead out of it. A symlink whose target
/// leaves the archive (absolute, or `..` past its root) is refused.
pub(crate) fn unpack_outer_tar(tar_path: &Path, dest: &Path) -> Result<(), ImageError> {
    let file = File::open(tar_path).map_err(|source| ImageError::Io {
        what: format!("open {}", tar_path.display()),
        source,
    })?;
    let bad = |err: io::Error| {
        ImageError::BadImage(format!(
            "{}: cannot read it as a tar archive of an OCI image layout or of `docker save` \
             output ({err})",
            tar_path.display()
        ))
    };
    let mut archive = tar::Archive::new(crate::targuard::TarGuard::new(BufReader::with_capacity(
        1 << 20,
        file,
    )));
    // Link path → the path it leads to, both inside the archive.
    let mut links: BTreeMap<ArchivePath, ArchivePath> = BTreeMap::new();
    let mut link_bytes = 0usize;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        let path = entry.path_bytes().into_owned();
        let parts = archive_path(&crate::flatten::components(&path)?);
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry.link_name_bytes().unwrap_or_default().into_owned();
            // What the two paths cost held as components: their bytes, and a vector's
            // worth (32 bytes) per component.
            let components = |bytes: &[u8]| bytes.split(|&b| b == b'/').count();
            link_bytes = link_bytes.saturating_add(
                path.len() + target.len() + 32 * (components(&path) + components(&target)),
            );
            if link_bytes > MAX_LINK_BYTES {
                return Err(ImageError::BadImage(format!(
                    "{}: more links than an image archive has ({MAX_LINK_BYTES} bytes of \
                     link names); it is not `docker save` output",
                    tar_path.display()
                )));
            }
            let escape = || {
                ImageError::PathEscape(format!(
                    "{} -> {}",
                    String::from_utf8_lossy(&path),
                    String::from_utf8_lossy(&target)
                ))
            };
            let leads_to = if kind.is_symlink() {
                symlink_target(&parts, &target).ok_or_else(escape)?
            } else {
                // A hard link names its target from the archive's root.
                archive_path(&crate::flatten::components(&target).map_err(|_| escape())?)
            };
            if !parts.is_empty() {
                links.insert(parts, leads_to);
            }
            continue;
        }
        if !(kind.is_file() || kind.is_dir()) {
            continue;
        }
        // A later entry of the path replaces an earlier link.
        links.remove(&parts);
        if !entry.unpack_in(dest).map_err(bad)? {
            return Err(ImageError::PathEscape(
                String::from_utf8_lossy(&path).into_owned(),
            ));
        }
    }
    link_files(dest, &links)
}

fn archive_path(parts: &[&[u8]]) -> ArchivePath {
    parts.iter().map(|part| part.to_vec()).collect()
}

fn on_disk(dest: &Path, path: &ArchivePath) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    path.iter().fold(dest.to_path_buf(), |p, part| {
        p.join(std::ffi::OsStr::from_bytes(part))
    })
}

/// Where a symlink at `link` with target `target` leads, inside the archive; `None` when
/// the target is absolute or climbs out of the archive's root.
fn symlink_target(link: &ArchivePath, target: &[u8]) -> Option<ArchivePath> {
    if target.is_empty() || target.starts_with(b"/") {
        return None;
    }
    let mut out: ArchivePath = link.split_last().map(|(_, dir)| dir.to_vec())?;
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                out.pop()?;
            }
            _ => out.push(part.to_vec()),
        }
    }
    Some(out)
}

/// Makes each link of an unpacked archive a hard link to the file it leads to (through
/// other links, at most 40 as the kernel follows). A link to nothing unpacked (a
/// directory, a missing file) is left out: reading it fails as a missing file would.
fn link_files(dest: &Path, links: &BTreeMap<ArchivePath, ArchivePath>) -> Result<(), ImageError> {
    for (link, target) in links {
        let mut target = target;
        for _ in 0..40 {
            match links.get(target) {
                Some(next) => target = next,
                None => break,
            }
        }
        let from = on_disk(dest, target);
        let to = on_disk(dest, link);
        if !fs::symlink_metadata(&from).is_ok_and(|meta| meta.is_file()) {
            tracing::debug!(link = %to.display(), target = %from.display(), "leaving out a link to no file of the archive");
            continue;
        }
        let io_err = |source| ImageError::Io {
            what: format!("link {} to {}", to.display(), from.display()),
            source,
        };
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(io_err)?;
        }
        // A file the archive had at the link's path before the link: the link wins.
        match fs::remove_file(&to) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(io_err(err)),
            _ => {}
        }
        fs::hard_link(&from, &to).map_err(io_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(env: &[&str], cmd: &[&str]) -> Vec<u8> {
        serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": env, "Cmd": cmd},
            "rootfs": {"type": "layers", "diff_ids": []},
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_config_no_process_could_start_with_is_refused_when_read() {
        let (ok, _) = config_of(&config(&["A=1", "B="], &["sh"])).expect("valid");
        assert_eq!(ok.env[1..], ["A=1".to_string(), "B=".to_string()]);
        for (env, cmd, says) in [
            (vec!["NOEQUALS"], vec!["sh"], "not NAME=VALUE"),
            (vec!["=novalue"], vec!["sh"], "not NAME=VALUE"),
            (vec!["A=\0"], vec!["sh"], "NUL byte in its Env"),
            (
                vec!["A=1"],
                vec!["s\0h"],
                "NUL byte in its Entrypoint and Cmd",
            ),
        ] {
            let err = config_of(&config(&env, &cmd)).expect_err("refused");
            assert!(err.to_string().contains(says), "{err}");
            assert!(err.to_string().contains("fix the image"), "{err}");
        }
        let big = "V=".to_string() + &"x".repeat(MAX_CONFIG_BYTES);
        let err = config_of(&config(&[&big], &["sh"])).expect_err("too big");
        assert!(err.to_string().contains("Env entries of"), "{err}");
    }
}
