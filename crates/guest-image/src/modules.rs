//! Kernel module lookup and dependency resolution from each module's ELF `.modinfo`
//! section (the kernel package ships no `modules.dep`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::elf::{Elf, ElfError};

/// Errors of finding kernel modules and ordering them.
#[derive(Debug, Error)]
pub enum ModuleError {
    /// A requested module, or a dependency of one, is not in the kernel package.
    #[error(
        "Kernel module {name}{} is not in the kernel package; check its name, or leave it out if this kernel has it built in",
        needed_by_suffix(.needed_by)
    )]
    Missing {
        /// Name of the missing module.
        name: String,
        /// The module that depends on it, if it is not a root module.
        needed_by: Option<String>,
    },
    /// Module dependencies form a cycle.
    #[error("Kernel modules depend on each other in a cycle ({chain}); the kernel package is inconsistent, try another kernel version")]
    Cycle {
        /// The modules of the cycle, joined with ` -> `.
        chain: String,
    },
    /// A module directory or file could not be read.
    #[error("Could not read {}; check the unpacked kernel package", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A `.ko` file is not a readable ELF file.
    #[error("Kernel module {} is not a readable ELF file; the download may be corrupt, delete it from the cache and retry", path.display())]
    BadModule {
        /// The module file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: ElfError,
    },
    /// A `.ko` file has no `.modinfo` section.
    #[error("Kernel module {} has no .modinfo section, so its dependencies are unknown; is it a kernel module?", path.display())]
    NoModinfo {
        /// The module file.
        path: PathBuf,
    },
}

fn needed_by_suffix(needed_by: &Option<String>) -> String {
    match needed_by {
        Some(parent) => format!(" (needed by {parent})"),
        None => String::new(),
    }
}

/// Canonical module name: `-` and `_` are equivalent, as in the kernel.
pub(crate) fn canonical_name(name: &str) -> String {
    name.trim().replace('-', "_")
}

/// The interesting parts of a module's `.modinfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ModInfo {
    /// The `name=` entry, if any.
    pub(crate) name: Option<String>,
    /// The `depends=` entries, canonicalised.
    pub(crate) depends: Vec<String>,
}

/// Parses a `.modinfo` section: NUL-separated `key=value` strings.
pub(crate) fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for entry in section.split(|&b| b == 0) {
        let entry = String::from_utf8_lossy(entry);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = Some(canonical_name(value)),
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .map(canonical_name)
                    .filter(|dep| !dep.is_empty()),
            ),
            _ => {}
        }
    }
    info
}

/// Reads and parses the `.modinfo` section of the module at `path`.
fn read_modinfo(path: &Path) -> Result<ModInfo, ModuleError> {
    let bytes = fs::read(path).map_err(|source| ModuleError::Io {
        path: path.to_owned(),
        source,
    })?;
    let elf = Elf::parse(&bytes).map_err(|source| ModuleError::BadModule {
        path: path.to_owned(),
        source,
    })?;
    let section = elf
        .section_by_name(".modinfo")
        .map_err(|source| ModuleError::BadModule {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| ModuleError::NoModinfo {
            path: path.to_owned(),
        })?;
    Ok(parse_modinfo(section))
}

/// All `.ko` files under a directory, by canonical module name.
#[derive(Debug, Default)]
pub(crate) struct ModuleIndex {
    by_name: BTreeMap<String, PathBuf>,
}

impl ModuleIndex {
    /// Indexes every `.ko` file under `root`, recursively.
    pub(crate) fn scan(root: &Path) -> Result<Self, ModuleError> {
        let mut index = Self::default();
        let mut pending = vec![root.to_owned()];
        while let Some(dir) = pending.pop() {
            let io_err = |source| ModuleError::Io {
                path: dir.clone(),
                source,
            };
            let mut entries = fs::read_dir(&dir)
                .map_err(io_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(io_err)?;
            entries.sort_by_key(|entry| entry.file_name());
            for entry in entries {
                let path = entry.path();
                let file_type = entry.file_type().map_err(|source| ModuleError::Io {
                    path: path.clone(),
                    source,
                })?;
                if file_type.is_dir() {
                    pending.push(path);
                    continue;
                }
                let file_name = entry.file_name();
                let Some(stem) = file_name.to_str().and_then(|n| n.strip_suffix(".ko")) else {
                    continue;
                };
                let name = canonical_name(stem);
                if let Some(existing) = index.by_name.get(&name) {
                    tracing::warn!(
                        module = %name,
                        kept = %existing.display(),
                        ignored = %path.display(),
                        "two files provide the same kernel module"
                    );
                    continue;
                }
                index.by_name.insert(name, path);
            }
        }
        Ok(index)
    }

    /// Number of modules found.
    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }

    fn get(&self, name: &str) -> Option<&Path> {
        self.by_name.get(name).map(PathBuf::as_path)
    }
}

/// A module to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolvedModule {
    /// Canonical module name.
    pub(crate) name: String,
    /// Path of its `.ko` file.
    pub(crate) path: PathBuf,
}

/// Finds `roots` and all their dependencies in `index`, dependencies first.
pub(crate) fn resolve(
    index: &ModuleIndex,
    roots: &[String],
) -> Result<Vec<ResolvedModule>, ModuleError> {
    let roots: Vec<String> = roots.iter().map(|r| canonical_name(r)).collect();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut queue: VecDeque<(String, Option<String>)> =
        roots.iter().map(|root| (root.clone(), None)).collect();
    while let Some((name, needed_by)) = queue.pop_front() {
        if deps.contains_key(&name) {
            continue;
        }
        let path = index.get(&name).ok_or_else(|| ModuleError::Missing {
            name: name.clone(),
            needed_by: needed_by.clone(),
        })?;
        let info = read_modinfo(path)?;
        for dep in &info.depends {
            queue.push_back((dep.clone(), Some(name.clone())));
        }
        deps.insert(name, info.depends);
    }
    let order = load_order(&roots, &deps)?;
    order
        .into_iter()
        .map(|name| {
            let path = index
                .get(&name)
                .ok_or_else(|| ModuleError::Missing {
                    name: name.clone(),
                    needed_by: None,
                })?
                .to_owned();
            Ok(ResolvedModule { name, path })
        })
        .collect()
}

/// Orders the closure of `roots` under `deps` so every module comes after its
/// dependencies; ties keep the order in which roots and dependencies are listed.
pub(crate) fn load_order(
    roots: &[String],
    deps: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<String>, ModuleError> {
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for root in roots {
        let mut path = Vec::new();
        visit(root, None, deps, &mut done, &mut path, &mut order)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    needed_by: Option<&str>,
    deps: &BTreeMap<String, Vec<String>>,
    done: &mut BTreeSet<String>,
    path: &mut Vec<String>,
    order: &mut Vec<String>,
) -> Result<(), ModuleError> {
    if done.contains(name) {
        return Ok(());
    }
    if let Some(start) = path.iter().position(|p| p == name) {
        let mut chain = path[start..].to_vec();
        chain.push(name.to_owned());
        return Err(ModuleError::Cycle {
            chain: chain.join(" -> "),
        });
    }
    let module_deps = deps.get(name).ok_or_else(|| ModuleError::Missing {
        name: name.to_owned(),
        needed_by: needed_by.map(str::to_owned),
    })?;
    path.push(name.to_owned());
    for dep in module_deps {
        visit(dep, Some(name), deps, done, path, order)?;
    }
    path.pop();
    done.insert(name.to_owned());
    order.push(name.to_owned());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::tests::build_elf;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(name, deps)| {
                (
                    (*name).to_owned(),
                    deps.iter().map(|d| (*d).to_owned()).collect(),
                )
            })
            .collect()
    }

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn orders_the_virtio_stack_dependencies_first() {
        let deps = graph(&[
            (
                "virtio_pci",
                &[
                    "virtio_ring",
                    "virtio_pci_modern_dev",
                    "virtio_pci_legacy_dev",
                    "virtio",
                ],
            ),
            ("virtio_console", &["virtio", "virtio_ring"]),
            ("virtio", &["virtio_ring"]),
            ("virtio_ring", &[]),
            ("virtio_pci_modern_dev", &[]),
            ("virtio_pci_legacy_dev", &[]),
        ]);
        let order = load_order(&strings(&["virtio_pci", "virtio_console"]), &deps).expect("order");
        assert_eq!(
            order,
            strings(&[
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio",
                "virtio_pci",
                "virtio_console",
            ])
        );
    }

    #[test]
    fn diamond_is_loaded_once_after_both_paths() {
        let deps = graph(&[
            ("top", &["left", "right"]),
            ("left", &["base"]),
            ("right", &["base"]),
            ("base", &[]),
        ]);
        let order = load_order(&strings(&["top", "base"]), &deps).expect("order");
        assert_eq!(order, strings(&["base", "left", "right", "top"]));
    }

    #[test]
    fn missing_dependency_names_the_module_and_its_parent() {
        let deps = graph(&[("top", &["gone"])]);
        let err = load_order(&strings(&["top"]), &deps).expect_err("missing");
        match &err {
            ModuleError::Missing { name, needed_by } => {
                assert_eq!(name, "gone");
                assert_eq!(needed_by.as_deref(), Some("top"));
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().contains("gone (needed by top)"));
        let err = load_order(&strings(&["nothere"]), &deps).expect_err("missing root");
        assert!(err.to_string().starts_with("Kernel module nothere is not"));
    }

    #[test]
    fn cycle_is_an_error() {
        let deps = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        let err = load_order(&strings(&["a"]), &deps).expect_err("cycle");
        match err {
            ModuleError::Cycle { chain } => assert_eq!(chain, "a -> b -> c -> a"),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn parses_modinfo_entries() {
        let section = b"license=GPL\0description=Virtio PCI bus driver\0\
            depends=virtio_ring,virtio-pci-modern-dev,,virtio\0\0\0\
            retpoline=Y\0intree=Y\0name=virtio_pci\0vermagic=6.1.0 SMP mod_unload\0";
        let info = parse_modinfo(section);
        assert_eq!(info.name.as_deref(), Some("virtio_pci"));
        assert_eq!(
            info.depends,
            strings(&["virtio_ring", "virtio_pci_modern_dev", "virtio"])
        );
        assert_eq!(
            parse_modinfo(b"depends=\0name=virtio_ring\0").depends,
            Vec::<String>::new()
        );
        assert_eq!(parse_modinfo(b"garbage without equals\xff").name, None);
    }

    #[test]
    fn resolves_modules_from_ko_files_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write_ko = |rel: &str, modinfo: &[u8]| {
            let path = dir.path().join(rel);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(&path, build_elf(&[], &[(".modinfo", modinfo)])).expect("write");
        };
        write_ko(
            "kernel/drivers/virtio/virtio.ko",
            b"depends=virtio_ring\0name=virtio\0",
        );
        write_ko(
            "kernel/drivers/virtio/virtio_ring.ko",
            b"depends=\0name=virtio_ring\0",
        );
        write_ko(
            "kernel/drivers/char/hw_random/virtio-rng.ko",
            b"depends=virtio_ring,virtio\0name=virtio_rng\0",
        );
        fs::write(dir.path().join("kernel/not-a-module.txt"), b"x").expect("write");
        let index = ModuleIndex::scan(&dir.path().join("kernel")).expect("scan");
        assert_eq!(index.len(), 3);
        let resolved = resolve(&index, &strings(&["virtio-rng"])).expect("resolve");
        let names: Vec<&str> = resolved.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["virtio_ring", "virtio", "virtio_rng"]);
        assert!(resolved[2].path.ends_with("virtio-rng.ko"));

        let err = resolve(&index, &strings(&["virtio_blk"])).expect_err("missing");
        assert!(matches!(err, ModuleError::Missing { .. }));

        fs::write(dir.path().join("kernel/broken.ko"), b"not elf").expect("write");
        let index = ModuleIndex::scan(&dir.path().join("kernel")).expect("scan");
        assert!(matches!(
            resolve(&index, &strings(&["broken"])),
            Err(ModuleError::BadModule { .. })
        ));
    }
}
