//! Stand-ins for libraries QEMU links but vmfactory's VMs never use, generated from the
//! installed library: an assembly file that defines every function the library exports
//! (as one trap instruction: a call would stop QEMU at once instead of going on with a
//! made-up result) and every data object (zeroes of the same size), under the same symbol
//! versions, and the version script that gives them those versions. Debian builds QEMU
//! with immediate binding, so the stand-in must define every symbol QEMU imports from the
//! library; defining all it exports covers any QEMU build against it.
//!
//! Read with the `object` crate (ELF dynamic symbols and GNU symbol versions); assembled
//! and linked by the host's `cc`, as the capstone stand-in is.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use object::read::elf::{Dyn as _, ElfFile64, SectionTable};
use object::{elf, Endianness, Object, ObjectSymbol, SymbolKind, SymbolSection};

/// Largest library read (Debian 12's biggest of them, libbpf, is about 330 KiB).
const MAX_LIBRARY_BYTES: u64 = 64 << 20;
/// Most symbols a stand-in defines (libbpf exports about 320).
const MAX_SYMBOLS: usize = 20_000;

/// The instruction a stand-in's function consists of: an undefined instruction, so a call
/// ends QEMU with SIGILL. `None` where vmfactory knows none (no stand-ins generated).
#[cfg(target_arch = "x86_64")]
const TRAP: Option<&str> = Some("ud2");
#[cfg(target_arch = "aarch64")]
const TRAP: Option<&str> = Some("udf #0");
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const TRAP: Option<&str> = None;

/// A generated stand-in's sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Assembly (GNU as) defining the symbols.
    pub assembly: String,
    /// A linker version script, when the library versions its symbols.
    pub version_script: Option<String>,
}

/// One exported symbol.
#[derive(Debug)]
enum Export {
    Function,
    /// A data object of this many bytes.
    Object(u64),
}

/// The stand-in's sources for the library at `library`: what it exports (default
/// versions only, as QEMU links), under its version definitions.
pub fn generate(library: &Path) -> Result<Generated, String> {
    let trap = TRAP.ok_or("no trap instruction known for this architecture")?;
    let size = std::fs::metadata(library)
        .map_err(|err| format!("{}: {err}", library.display()))?
        .len();
    if size > MAX_LIBRARY_BYTES {
        return Err(format!("{}: {size} bytes, too big", library.display()));
    }
    let data = std::fs::read(library).map_err(|err| format!("{}: {err}", library.display()))?;
    let file = ElfFile64::<Endianness>::parse(&*data)
        .map_err(|err| format!("{}: not a 64-bit ELF library: {err}", library.display()))?;
    let endian = file.endian();
    let sections = file.elf_section_table();
    let versions = sections
        .versions(endian, &*data)
        .map_err(|err| format!("{}: {err}", library.display()))?;
    // Version name -> its symbols; "" for unversioned ones.
    let mut by_version: BTreeMap<String, Vec<(String, Export)>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for symbol in file.dynamic_symbols() {
        // Absolute symbols are the version definitions' own names.
        if symbol.is_undefined() || symbol.is_local() || symbol.section() == SymbolSection::Absolute
        {
            continue;
        }
        let export = match symbol.kind() {
            SymbolKind::Text => Export::Function,
            SymbolKind::Data => Export::Object(symbol.size()),
            _ => continue,
        };
        let Ok(name) = symbol.name() else { continue };
        if !is_symbol_name(name) || seen.contains(name) {
            continue;
        }
        let version = match &versions {
            Some(table) => {
                let index = table.version_index(endian, symbol.index());
                if index.is_hidden() {
                    // An older version kept for old binaries; QEMU links the default one.
                    continue;
                }
                match table.version(index) {
                    Ok(Some(version)) => {
                        let name = String::from_utf8_lossy(version.name()).into_owned();
                        if !is_symbol_name(&name) {
                            continue;
                        }
                        name
                    }
                    Ok(None) => String::new(),
                    Err(_) => continue,
                }
            }
            None => String::new(),
        };
        seen.insert(name.to_string());
        by_version
            .entry(version)
            .or_default()
            .push((name.to_string(), export));
        if seen.len() > MAX_SYMBOLS {
            return Err(format!(
                "{}: more than {MAX_SYMBOLS} symbols",
                library.display()
            ));
        }
    }
    let defined = version_definitions(sections, endian, &data)
        .map_err(|err| format!("{}: {err}", library.display()))?;
    Ok(Generated {
        assembly: assembly(&by_version, trap),
        version_script: version_script(&defined, &by_version),
    })
}

/// The file names a library (or program) names as needed (`DT_NEEDED`).
pub fn needed(path: &Path) -> Result<Vec<String>, String> {
    let size = std::fs::metadata(path)
        .map_err(|err| format!("{}: {err}", path.display()))?
        .len();
    if size > MAX_LIBRARY_BYTES * 4 {
        return Err(format!("{}: {size} bytes, too big", path.display()));
    }
    let data = std::fs::read(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let file = ElfFile64::<Endianness>::parse(&*data)
        .map_err(|err| format!("{}: not a 64-bit ELF file: {err}", path.display()))?;
    let endian = file.endian();
    let sections = file.elf_section_table();
    let broken = |err: object::Error| format!("{}: {err}", path.display());
    let Some((entries, link)) = sections.dynamic(endian, &*data).map_err(broken)? else {
        return Ok(Vec::new());
    };
    let strings = sections.strings(endian, &*data, link).map_err(broken)?;
    let mut names = Vec::new();
    for entry in entries {
        if entry.tag32(endian) == Some(elf::DT_NEEDED) {
            let name = entry.string(endian, strings).map_err(broken)?;
            names.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(names)
}

/// The library's version names (its `SHT_GNU_VERDEF` entries but the base, which names
/// the file), in their order.
fn version_definitions<'data>(
    sections: &SectionTable<'data, elf::FileHeader64<Endianness>, &'data [u8]>,
    endian: Endianness,
    data: &'data [u8],
) -> object::Result<Vec<String>> {
    let mut names = Vec::new();
    let Some((mut definitions, link)) = sections.gnu_verdef(endian, data)? else {
        return Ok(names);
    };
    let strings = sections.strings(endian, data, link)?;
    while let Some((definition, mut auxiliaries)) = definitions.next()? {
        if definition.vd_flags.get(endian) & elf::VER_FLG_BASE != 0 {
            continue;
        }
        if let Some(auxiliary) = auxiliaries.next()? {
            let name = String::from_utf8_lossy(auxiliary.name(endian, strings)?).into_owned();
            if is_symbol_name(&name) && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Ok(names)
}

/// True for a name the assembler and the version script take as written: a C identifier,
/// or a version name (which may hold dots). Other names are left out; should QEMU need
/// one, the stand-in fails its check and QEMU keeps its library.
fn is_symbol_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

fn assembly(by_version: &BTreeMap<String, Vec<(String, Export)>>, trap: &str) -> String {
    let mut text =
        String::from("/* Generated by vmfactory: a stand-in QEMU loads but never calls. */\n");
    for (name, export) in by_version.values().flatten() {
        match export {
            Export::Function => {
                let _ = write!(
                    text,
                    "\t.text\n\t.globl {name}\n\t.type {name}, STT_FUNC\n\t.balign 16\n{name}:\n\t{trap}\n\t.size {name}, . - {name}\n"
                );
            }
            Export::Object(size) => {
                let size = (*size).max(1);
                let _ = write!(
                    text,
                    "\t.bss\n\t.globl {name}\n\t.type {name}, STT_OBJECT\n\t.balign 16\n\t.size {name}, {size}\n{name}:\n\t.zero {size}\n"
                );
            }
        }
    }
    // Without this note the linker would mark the library as needing an executable stack,
    // and the dynamic linker would make QEMU's stacks executable.
    text.push_str("\t.section .note.GNU-stack,\"\",%progbits\n");
    text
}

/// Every version the library defines, each with its symbols; `None` for a library
/// without versions.
fn version_script(
    defined: &[String],
    by_version: &BTreeMap<String, Vec<(String, Export)>>,
) -> Option<String> {
    let mut names: Vec<&str> = defined.iter().map(String::as_str).collect();
    for version in by_version.keys().filter(|v| !v.is_empty()) {
        if !names.contains(&version.as_str()) {
            names.push(version);
        }
    }
    if names.is_empty() {
        return None;
    }
    let mut script = String::new();
    for version in names {
        let _ = writeln!(script, "{version} {{");
        if let Some(symbols) = by_version.get(version) {
            script.push_str("  global:\n");
            for (name, _) in symbols {
                let _ = writeln!(script, "    {name};");
            }
        }
        script.push_str("};\n");
    }
    Some(script)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_are_written_out() {
        for good in ["ibv_open_device", "IBVERBS_1.1", "_x", "LIBBPF_0.0.1"] {
            assert!(is_symbol_name(good), "{good}");
        }
        for bad in ["", "1abc", "a b", "a;b", "x@@V", "a\nb", "é"] {
            assert!(!is_symbol_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_library_that_is_not_elf_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("libfake.so.1");
        std::fs::write(&path, b"not an ELF file").expect("write");
        let err = generate(&path).expect_err("refused");
        assert!(err.contains("not a 64-bit ELF library"), "{err}");
        assert!(generate(&dir.path().join("missing.so")).is_err());
    }

    #[test]
    fn the_sources_of_a_versioned_library() {
        let mut by_version = BTreeMap::new();
        by_version.insert(
            "V_2".to_string(),
            vec![
                ("f".to_string(), Export::Function),
                ("table".to_string(), Export::Object(24)),
            ],
        );
        by_version.insert(String::new(), vec![("g".to_string(), Export::Object(0))]);
        let text = assembly(&by_version, "ud2");
        assert!(text.contains("f:\n\tud2\n"), "{text}");
        assert!(
            text.contains("\t.size table, 24\ntable:\n\t.zero 24\n"),
            "{text}"
        );
        assert!(text.contains("g:\n\t.zero 1\n"), "{text}");
        assert!(text.ends_with(".note.GNU-stack,\"\",%progbits\n"), "{text}");
        let script = version_script(&["V_1".into(), "V_2".into()], &by_version).expect("script");
        assert_eq!(
            script,
            "V_1 {\n};\nV_2 {\n  global:\n    f;\n    table;\n};\n"
        );
        assert_eq!(version_script(&[], &BTreeMap::new()), None);
    }
}
