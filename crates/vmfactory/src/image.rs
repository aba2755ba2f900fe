//! `vmfactory image …`: container images prepared as read-only disks for guests (see the
//! `vmfactory-image` crate): build one, list the cache, remove from it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use vmfactory_image::{FsType, ImageEntry, ImageStore};

use crate::progress::Progress;

/// `vmfactory image …`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Prepare an image: flatten its layers into a read-only filesystem image (cached by
    /// digest; a second build costs nothing) and print its digest, disk and config.
    ///
    /// REF is a root filesystem directory, an OCI image layout (directory or tar; PATH:TAG
    /// picks a manifest by its org.opencontainers.image.ref.name) or a `docker save`
    /// archive (PATH:TAG picks by repo tag).
    Build(BuildArgs),
    /// List the cached images: digest, filesystems, size, last use and sources.
    Ls(LsArgs),
    /// Remove a cached image, named by digest (or a unique prefix of it) or by a
    /// reference it was built from.
    Rm(RmArgs),
}

/// Where the image cache is.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// Cache directory (default: $VMFACTORY_CACHE_DIR, else $XDG_CACHE_HOME/vmfactory,
    /// else ~/.cache/vmfactory); images
    /// are kept in its `rootfs` directory.
    #[arg(long, env = "VMFACTORY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl CacheArgs {
    fn store(&self) -> ImageStore {
        let dir = self
            .cache_dir
            .clone()
            .unwrap_or_else(vmfactory_guest_image::default_cache_dir);
        ImageStore::new(&dir)
    }
}

/// Options of `vmfactory image build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The image: DIR, LAYOUT[:TAG], LAYOUT.tar[:TAG] or SAVED.tar[:TAG].
    #[arg(value_name = "REF")]
    reference: String,
    /// Filesystem of the disk: erofs (default) or ext4.
    #[arg(long, default_value = "erofs", value_parser = parse_fs)]
    fs: FsType,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    cache: CacheArgs,
}

/// Options of `vmfactory image ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    cache: CacheArgs,
}

/// Options of `vmfactory image rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Digest (sha256:HEX, HEX or a unique prefix) or a reference the image was built from.
    #[arg(value_name = "REF|DIGEST")]
    what: String,
    #[command(flatten)]
    cache: CacheArgs,
}

fn parse_fs(s: &str) -> Result<FsType, String> {
    s.parse()
        .map_err(|err: vmfactory_image::ImageError| err.to_string())
}

/// Runs a `vmfactory image` command (blocking: it may flatten layers and run mkfs).
pub fn run(command: ImageCommand) -> Result<ExitCode> {
    match command {
        ImageCommand::Build(args) => build(args),
        ImageCommand::Ls(args) => ls(args),
        ImageCommand::Rm(args) => {
            if args.what.is_empty() {
                crate::usage!(
                    "The image to remove is empty: give its digest (or a unique prefix of it) \
                     or a reference it was built from; see `vmfactory image ls`"
                );
            }
            let entry = args
                .cache
                .store()
                .remove(&args.what)
                .with_context(|| format!("Cannot remove image {}", args.what))?;
            println!("removed {}", entry.digest);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn build(args: BuildArgs) -> Result<ExitCode> {
    if args.reference.is_empty() {
        crate::usage!(
            "The image reference is empty: give a root filesystem directory, an OCI image \
             layout (directory or tar) or a `docker save` archive"
        );
    }
    let store = args.cache.store().with_fs_type(args.fs);
    let mut progress: Option<Progress> = None;
    let result = store.prepare(&args.reference, &mut |message| match &mut progress {
        Some(p) => p.set_message(message),
        None => progress = Some(Progress::spinner(message)),
    });
    let image = match result {
        Ok(image) => {
            if let Some(p) = progress {
                p.finish(&format!("prepared {}", image.digest));
            }
            image
        }
        Err(err) => {
            if let Some(p) = progress {
                p.abandon();
            }
            return Err(err).with_context(|| format!("Cannot prepare image {}", args.reference));
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&image)?);
    } else {
        println!("digest: {}", image.digest);
        println!("disk: {}", image.disk.display());
        println!("fs: {}", image.fs_type);
        println!("size: {}", human(image.size_bytes));
        println!("cached: {}", image.cached);
        println!("env: {:?}", image.config.env);
        println!("command: {:?}", image.config.command(&[]));
        // The image's own words: they must not drive the terminal.
        if let Some(dir) = &image.config.working_dir {
            println!("working dir: {}", crate::printable(dir));
        }
        if let Some(user) = &image.config.user {
            println!("user: {}", crate::printable(user));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ls(args: LsArgs) -> Result<ExitCode> {
    // A cache directory named by the user that is not there lists as empty, like an
    // empty cache: say which it is (a typo, say).
    if let Some(dir) = args.cache.cache_dir.as_ref().filter(|dir| !dir.exists()) {
        eprintln!(
            "vmfactory: the cache directory {} does not exist: no images are cached there",
            dir.display()
        );
    }
    let entries = args
        .cache
        .store()
        .list()
        .context("Cannot list the image cache")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<19} {:<10} {:>9} {:<20} SOURCES",
        "DIGEST", "FS", "SIZE", "LAST USED"
    );
    for ImageEntry {
        digest,
        sources,
        fs_types,
        size_bytes,
        last_used,
        ..
    } in &entries
    {
        let short = digest.get(..19).unwrap_or(digest);
        let fs: Vec<&str> = fs_types.iter().map(|f| f.as_str()).collect();
        println!(
            "{short:<19} {:<10} {:>9} {:<20} {}",
            fs.join(","),
            human(*size_bytes),
            time(*last_used),
            shown_sources(sources)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The table's SOURCES cell: the last source recorded, and how many more `--json` lists
/// (an image built from many temporary copies would otherwise fill a screen line).
fn shown_sources(sources: &[String]) -> String {
    match sources {
        [] => String::new(),
        [only] => only.clone(),
        [.., last] => format!("{last} (+{} more: --json)", sources.len() - 1),
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` UTC.
fn time(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(time(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn many_sources_show_as_the_last_and_a_count() {
        let sources: Vec<String> = (0..25).map(|i| format!("/tmp/{i}/img.tar")).collect();
        assert_eq!(
            shown_sources(&sources),
            "/tmp/24/img.tar (+24 more: --json)"
        );
        assert_eq!(shown_sources(&sources[..1]), "/tmp/0/img.tar");
        assert_eq!(shown_sources(&[]), "");
    }
}
