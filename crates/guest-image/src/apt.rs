//! Resolving, downloading and unpacking Debian packages with `apt-cache`, `apt-get` and
//! `dpkg-deb`. Failures are reported as [`GuestImageError`] variants.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::GuestImageError;

/// The Debian tools this crate runs.
pub(crate) const REQUIRED_TOOLS: [&str; 3] = ["apt-get", "apt-cache", "dpkg-deb"];

/// A package name with the exact version to use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PackageVersion {
    /// Package name, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub name: String,
    /// Debian version, possibly with an epoch, e.g. `1:1.35.0-4`.
    pub version: String,
}

/// How `apt-cache` is invoked: with a private binary package cache, because Debian's
/// container images disable apt's own (`Dir::Cache::pkgcache ""`), which makes every
/// `apt-cache` call re-parse all package lists (about half a second each).
#[derive(Debug, Clone)]
pub(crate) struct AptCache {
    options: Vec<OsString>,
}

impl AptCache {
    /// Uses `dir/pkgcache.bin` as apt's binary cache (apt rebuilds it when lists change).
    pub(crate) fn with_private_cache(dir: &Path) -> Self {
        let mut pkgcache = OsString::from("Dir::Cache::pkgcache=");
        pkgcache.push(dir.join("pkgcache.bin"));
        Self {
            options: vec![
                "-o".into(),
                pkgcache,
                "-o".into(),
                "Dir::Cache::srcpkgcache=".into(),
            ],
        }
    }

    /// Runs `apt-cache` with these options and `args`.
    fn run(&self, args: &[&str]) -> Result<Output, GuestImageError> {
        let mut all: Vec<&OsStr> = self.options.iter().map(OsString::as_os_str).collect();
        all.extend(args.iter().map(OsStr::new));
        run("apt-cache", &all, None)
    }

    /// Runs `apt-cache <args>` about `package`; its stdout, or why it failed.
    fn query(&self, args: &[&str], package: &str) -> Result<String, GuestImageError> {
        let output = self.run(args)?;
        if !output.status.success() {
            return Err(GuestImageError::AptResolve {
                package: package.to_owned(),
                detail: stderr_text(&output),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Runs `program` with `args` (C locale, no stdin) and captures its output.
fn run(program: &str, args: &[&OsStr], dir: Option<&Path>) -> Result<Output, GuestImageError> {
    let mut command = Command::new(program);
    command
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    tracing::debug!(program, ?args, "running");
    command.output().map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            GuestImageError::ToolMissing {
                tool: program.into(),
            }
        } else {
            GuestImageError::ToolFailed {
                tool: program.into(),
                source,
            }
        }
    })
}

/// The interesting part of a failed command's stderr, without apt's sandbox warning.
fn stderr_text(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.contains("unsandboxed as root"))
        .filter(|line| !line.trim().is_empty())
        .collect();
    if lines.is_empty() {
        format!("exit status {}", output.status)
    } else {
        lines.join("; ")
    }
}

/// Checks that `apt-get`, `apt-cache` and `dpkg-deb` are on the `PATH`.
pub(crate) fn check_tools() -> Result<(), GuestImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in REQUIRED_TOOLS {
        let found = std::env::split_paths(&path).any(|dir| dir.join(tool).is_file());
        if !found {
            return Err(GuestImageError::ToolMissing { tool: tool.into() });
        }
    }
    Ok(())
}

/// Resolves a meta package (such as `linux-image-cloud-amd64`) to the versioned
/// `linux-image-*` package it depends on.
pub(crate) fn resolve_kernel_package(
    apt: &AptCache,
    meta: &str,
) -> Result<String, GuestImageError> {
    let depends = apt.query(&["depends", meta], meta)?;
    if let Some(kernel) = parse_depends(&depends) {
        return Ok(kernel);
    }
    // A versioned kernel package such as linux-image-6.1.0-56-cloud-amd64 is used as is.
    let versioned = meta
        .strip_prefix("linux-image-")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
    if versioned {
        return Ok(meta.to_owned());
    }
    Err(GuestImageError::AptResolve {
        package: meta.to_owned(),
        detail: "it depends on no linux-image-* package".to_owned(),
    })
}

/// Returns the first `Depends: linux-image-*` target in `apt-cache depends` output.
pub(crate) fn parse_depends(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|line| {
        let line = line.trim().trim_start_matches('|');
        let target = line.strip_prefix("Depends:")?.trim();
        let target = target.trim_start_matches('<').trim_end_matches('>');
        target
            .starts_with("linux-image-")
            .then(|| target.to_owned())
    })
}

/// Returns the candidate version of `package` from `apt-cache policy`.
pub(crate) fn candidate_version(
    apt: &AptCache,
    package: &str,
) -> Result<PackageVersion, GuestImageError> {
    let policy = apt.query(&["policy", package], package)?;
    let version = parse_candidate(&policy).ok_or_else(|| GuestImageError::NoCandidate {
        package: package.to_owned(),
    })?;
    Ok(PackageVersion {
        name: package.to_owned(),
        version,
    })
}

/// Returns the `Candidate:` version in `apt-cache policy` output, unless it is `(none)`.
pub(crate) fn parse_candidate(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|line| {
        let version = line.trim().strip_prefix("Candidate:")?.trim();
        (!version.is_empty() && version != "(none)").then(|| version.to_owned())
    })
}

/// Reads a control field (such as `Version`) of a `.deb` with `dpkg-deb -f`.
fn deb_field(deb: &Path, field: &str) -> Result<String, GuestImageError> {
    let output = run(
        "dpkg-deb",
        &["-f".as_ref(), deb.as_os_str(), field.as_ref()],
        None,
    )?;
    if !output.status.success() {
        return Err(GuestImageError::Unpack {
            path: deb.to_owned(),
            detail: stderr_text(&output),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `.deb` files in `dir` whose names match `<package>_*amd64.deb`.
fn matching_debs(dir: &Path, package: &str) -> Result<Vec<PathBuf>, GuestImageError> {
    let prefix = format!("{package}_");
    let mut found = Vec::new();
    let entries = fs::read_dir(dir).map_err(|source| GuestImageError::Io {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| GuestImageError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Architecture-independent packages (the kernel source) end in `_all.deb`.
        if name.starts_with(&prefix) && (name.ends_with("_amd64.deb") || name.ends_with("_all.deb"))
        {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// Returns the `.deb` of `package` in `downloads`, fetching it with `apt-get download`
/// unless a file of that exact version is already there.
pub(crate) fn ensure_downloaded(
    downloads: &Path,
    package: &PackageVersion,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, GuestImageError> {
    let existing = matching_debs(downloads, &package.name)?;
    for deb in &existing {
        match deb_field(deb, "Version") {
            Ok(version) if version == package.version => {
                tracing::debug!(deb = %deb.display(), "using downloaded package");
                return Ok(deb.clone());
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(deb = %deb.display(), error = %err, "ignoring unreadable download")
            }
        }
    }

    progress(&format!(
        "Downloading {} {} with apt-get",
        package.name, package.version
    ));
    let staging = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(downloads)
        .map_err(|source| GuestImageError::Io {
            path: downloads.to_owned(),
            source,
        })?;
    let spec = format!("{}={}", package.name, package.version);
    let output = run(
        "apt-get",
        &["download".as_ref(), spec.as_ref()],
        Some(staging.path()),
    )?;
    if !output.status.success() {
        return Err(GuestImageError::AptDownload {
            package: spec,
            stderr: stderr_text(&output),
        });
    }
    let fetched = matching_debs(staging.path(), &package.name)?;
    let Some(fetched) = fetched.into_iter().next() else {
        return Err(GuestImageError::AptDownload {
            package: spec,
            stderr: "apt-get reported success but wrote no .deb file".to_owned(),
        });
    };
    let Some(file_name) = fetched.file_name() else {
        return Err(GuestImageError::AptDownload {
            package: spec,
            stderr: "apt-get wrote a file without a name".to_owned(),
        });
    };
    let target = downloads.join(file_name);
    fs::rename(&fetched, &target).map_err(|source| GuestImageError::Io {
        path: target.clone(),
        source,
    })?;
    // Older versions of the same package are no longer needed: images hold their own copies.
    for old in existing {
        if old != target {
            tracing::info!(deb = %old.display(), "removing superseded download");
            if let Err(err) = fs::remove_file(&old) {
                tracing::warn!(deb = %old.display(), error = %err, "could not remove superseded download");
            }
            let mut sidecar = old.into_os_string();
            sidecar.push(".sha256");
            let _ = fs::remove_file(sidecar);
        }
    }
    Ok(target)
}

/// Unpacks the file system tree of `deb` into `dir` with `dpkg-deb -x`.
pub(crate) fn unpack(deb: &Path, dir: &Path) -> Result<(), GuestImageError> {
    let output = run(
        "dpkg-deb",
        &["-x".as_ref(), deb.as_os_str(), dir.as_os_str()],
        None,
    )?;
    if !output.status.success() {
        return Err(GuestImageError::Unpack {
            path: deb.to_owned(),
            detail: stderr_text(&output),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_depends() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        let alternatives =
            "meta\n |Depends: <linux-image-6.1.0-1-amd64>\n  Depends: linux-image-6.1.0-2-amd64\n";
        assert_eq!(
            parse_depends(alternatives).as_deref(),
            Some("linux-image-6.1.0-1-amd64")
        );
        let other = "linux-image-6.1.0-56-cloud-amd64\n  Depends: kmod\n  Recommends: firmware-linux-free\n";
        assert_eq!(parse_depends(other), None);
    }

    #[test]
    fn parses_apt_cache_policy() {
        let out = "busybox-static:\n  Installed: (none)\n  Candidate: 1:1.35.0-4+deb12u1+b1\n  Version table:\n";
        assert_eq!(
            parse_candidate(out).as_deref(),
            Some("1:1.35.0-4+deb12u1+b1")
        );
        assert_eq!(
            parse_candidate("foo:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
        assert_eq!(parse_candidate(""), None);
    }

    #[test]
    fn strips_sandbox_warning_from_stderr() {
        use std::os::unix::process::ExitStatusExt;
        let output = Output {
            status: std::process::ExitStatus::from_raw(100 << 8),
            stdout: Vec::new(),
            stderr: b"W: Download is performed unsandboxed as root as file 'x'\nE: Can't find a source\n"
                .to_vec(),
        };
        assert_eq!(stderr_text(&output), "E: Can't find a source");
    }

    #[test]
    fn finds_debs_by_package_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "busybox-static_1%3a1.35.0-4_amd64.deb",
            "busybox_1%3a1.35.0-4_amd64.deb",
            "busybox-static_1%3a1.35.0-4_amd64.deb.partial",
        ] {
            fs::write(dir.path().join(name), b"").expect("write");
        }
        let found = matching_debs(dir.path(), "busybox-static").expect("list");
        assert_eq!(found.len(), 1);
        assert!(found[0].ends_with("busybox-static_1%3a1.35.0-4_amd64.deb"));
    }
}
