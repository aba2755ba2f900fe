//! Building a read-only filesystem image of a directory with `mkfs.erofs` or `mkfs.ext4`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{FsType, ImageError};

/// The tool and the Debian package that has it.
fn tool(fs: FsType) -> (&'static str, &'static str) {
    match fs {
        FsType::Erofs => ("mkfs.erofs", "erofs-utils"),
        FsType::Ext4 => ("mkfs.ext4", "e2fsprogs"),
    }
}

/// Finds `name` in `PATH` and the sbin directories (root's tools may be outside a user's
/// `PATH`).
fn find_tool(fs: FsType) -> Result<PathBuf, ImageError> {
    let (name, package) = tool(fs);
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::MissingTool {
            tool: name.into(),
            package: package.into(),
        })
}

/// Builds `out` from the tree `dir`, leaving out the paths `exclude` (relative to `dir`;
/// EROFS only: `mkfs.ext4 -d` cannot leave anything out, so the caller must not ask).
pub(crate) fn build(
    fs: FsType,
    dir: &Path,
    out: &Path,
    exclude: &[PathBuf],
) -> Result<(), ImageError> {
    let program = find_tool(fs)?;
    let mut command = Command::new(&program);
    match fs {
        FsType::Erofs => {
            // -x-1: no xattrs (the host's security labels are not the image's).
            command.arg("--quiet").arg("-x-1");
            for path in exclude {
                // An exact path relative to the tree (with all of its contents).
                let mut arg = std::ffi::OsString::from("--exclude-path=");
                arg.push(path);
                command.arg(arg);
            }
            command.arg(out).arg(dir);
        }
        FsType::Ext4 => {
            debug_assert!(exclude.is_empty(), "mkfs.ext4 cannot exclude {exclude:?}");
            let (bytes, inodes) = estimate(dir)?;
            let size = bytes + bytes / 5 + (16 << 20);
            let file = std::fs::File::create(out)
                .map_err(crate::io_error(format!("create {}", out.display())))?;
            file.set_len(size)
                .map_err(crate::io_error(format!("size {}", out.display())))?;
            command
                .args([
                    "-q",
                    "-F",
                    "-t",
                    "ext4",
                    "-b",
                    "4096",
                    "-m",
                    "0",
                    "-O",
                    "^has_journal",
                ])
                .arg("-N")
                .arg((inodes + inodes / 5 + 256).to_string())
                .arg("-d")
                .arg(dir)
                .arg(out);
        }
    }
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(crate::io_error(format!("run {}", program.display())))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(out);
        let mut stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if stderr.trim().is_empty() {
            stderr = String::from_utf8_lossy(&output.stdout).into_owned();
        }
        let tail: String = stderr
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(ImageError::ToolFailed {
            tool: tool(fs).0.into(),
            status: output.status.to_string(),
            stderr: tail,
        });
    }
    Ok(())
}

/// Bytes (in 4 KiB blocks, plus a block per directory and 256 bytes per inode) and inodes
/// of a tree: what an ext4 image of it needs, before slack.
fn estimate(dir: &Path) -> Result<(u64, u64), ImageError> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let listing =
            std::fs::read_dir(&d).map_err(crate::io_error(format!("list {}", d.display())))?;
        for entry in listing {
            let entry = entry.map_err(crate::io_error(format!("list {}", d.display())))?;
            let meta = entry
                .metadata()
                .map_err(crate::io_error(format!("stat {}", entry.path().display())))?;
            inodes += 1;
            bytes += meta.size().div_ceil(4096) * 4096 + 256;
            if meta.is_dir() {
                bytes += 4096;
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}
