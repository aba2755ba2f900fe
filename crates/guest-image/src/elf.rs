//! Just enough ELF64 little-endian parsing for kernel images, kernel modules and the agent.

use thiserror::Error;

/// Program header type of an interpreter request (dynamic linking).
pub(crate) const PT_INTERP: u32 = 3;
/// Program header type of a note segment.
pub(crate) const PT_NOTE: u32 = 4;
/// ELF machine number of x86-64.
pub(crate) const EM_X86_64: u16 = 62;

/// Why a byte buffer is not an ELF file this crate can read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    /// The buffer does not start with the ELF magic.
    #[error("Not an ELF file (no \\x7fELF magic)")]
    NotElf,
    /// The file is ELF, but not 64-bit little-endian.
    #[error("Unsupported ELF flavour ({0}); only 64-bit little-endian files are supported")]
    Unsupported(&'static str),
    /// A table or string points outside the file.
    #[error("Truncated or corrupt ELF file: {0} lies outside the file")]
    Truncated(&'static str),
}

/// One program header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProgramHeader {
    pub(crate) p_type: u32,
    pub(crate) offset: u64,
    pub(crate) filesz: u64,
}

/// One section header (only the fields this crate needs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SectionHeader {
    pub(crate) name: u32,
    pub(crate) offset: u64,
    pub(crate) size: u64,
    pub(crate) sh_type: u32,
}

/// A parsed ELF64 little-endian file borrowing its bytes.
#[derive(Debug)]
pub(crate) struct Elf<'a> {
    data: &'a [u8],
    pub(crate) machine: u16,
    phoff: u64,
    phentsize: u16,
    phnum: u16,
    shoff: u64,
    shentsize: u16,
    shnum: u16,
    shstrndx: u16,
}

fn read_u16(data: &[u8], at: usize) -> Option<u16> {
    let bytes = data.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([bytes[0], bytes[1]]))
}

pub(crate) fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn read_u64(data: &[u8], at: usize) -> Option<u64> {
    let bytes = data.get(at..at.checked_add(8)?)?;
    let mut buf = [0u8; 8];
    buf.copy_from_slice(bytes);
    Some(u64::from_le_bytes(buf))
}

/// Returns `data[offset..offset + len]`, or `None` if that range is not inside `data`.
fn slice_at(data: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let len = usize::try_from(len).ok()?;
    data.get(start..start.checked_add(len)?)
}

impl<'a> Elf<'a> {
    /// Parses the ELF header of `data`.
    pub(crate) fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if data.len() < 4 || &data[..4] != b"\x7fELF" {
            return Err(ElfError::NotElf);
        }
        if data.len() < 64 {
            return Err(ElfError::Truncated("the ELF header"));
        }
        if data[4] != 2 {
            return Err(ElfError::Unsupported("not 64-bit"));
        }
        if data[5] != 1 {
            return Err(ElfError::Unsupported("not little-endian"));
        }
        let truncated = || ElfError::Truncated("the ELF header");
        Ok(Self {
            data,
            machine: read_u16(data, 18).ok_or_else(truncated)?,
            phoff: read_u64(data, 32).ok_or_else(truncated)?,
            shoff: read_u64(data, 40).ok_or_else(truncated)?,
            phentsize: read_u16(data, 54).ok_or_else(truncated)?,
            phnum: read_u16(data, 56).ok_or_else(truncated)?,
            shentsize: read_u16(data, 58).ok_or_else(truncated)?,
            shnum: read_u16(data, 60).ok_or_else(truncated)?,
            shstrndx: read_u16(data, 62).ok_or_else(truncated)?,
        })
    }

    /// Offset just past the program header table.
    pub(crate) fn program_header_table_end(&self) -> Option<u64> {
        u64::from(self.phnum)
            .checked_mul(u64::from(self.phentsize))?
            .checked_add(self.phoff)
    }

    /// Returns all program headers.
    pub(crate) fn program_headers(&self) -> Result<Vec<ProgramHeader>, ElfError> {
        let mut headers = Vec::with_capacity(usize::from(self.phnum));
        if self.phnum > 0 && self.phentsize < 56 {
            return Err(ElfError::Truncated("a program header"));
        }
        for index in 0..u64::from(self.phnum) {
            let at = index
                .checked_mul(u64::from(self.phentsize))
                .and_then(|rel| rel.checked_add(self.phoff))
                .ok_or(ElfError::Truncated("the program header table"))?;
            let entry = slice_at(self.data, at, 56)
                .ok_or(ElfError::Truncated("the program header table"))?;
            let bad = || ElfError::Truncated("a program header");
            headers.push(ProgramHeader {
                p_type: read_u32(entry, 0).ok_or_else(bad)?,
                offset: read_u64(entry, 8).ok_or_else(bad)?,
                filesz: read_u64(entry, 32).ok_or_else(bad)?,
            });
        }
        Ok(headers)
    }

    /// Returns all section headers.
    pub(crate) fn section_headers(&self) -> Result<Vec<SectionHeader>, ElfError> {
        let mut headers = Vec::with_capacity(usize::from(self.shnum));
        if self.shnum > 0 && self.shentsize < 64 {
            return Err(ElfError::Truncated("a section header"));
        }
        for index in 0..u64::from(self.shnum) {
            let at = index
                .checked_mul(u64::from(self.shentsize))
                .and_then(|rel| rel.checked_add(self.shoff))
                .ok_or(ElfError::Truncated("the section header table"))?;
            let entry = slice_at(self.data, at, 64)
                .ok_or(ElfError::Truncated("the section header table"))?;
            let bad = || ElfError::Truncated("a section header");
            headers.push(SectionHeader {
                name: read_u32(entry, 0).ok_or_else(bad)?,
                sh_type: read_u32(entry, 4).ok_or_else(bad)?,
                offset: read_u64(entry, 24).ok_or_else(bad)?,
                size: read_u64(entry, 32).ok_or_else(bad)?,
            });
        }
        Ok(headers)
    }

    /// Returns the contents of the section called `name`, if there is one.
    pub(crate) fn section_by_name(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        let sections = self.section_headers()?;
        let Some(strtab) = sections.get(usize::from(self.shstrndx)) else {
            return Ok(None);
        };
        let strings = slice_at(self.data, strtab.offset, strtab.size)
            .ok_or(ElfError::Truncated("the section name table"))?;
        for section in &sections {
            let Some(rest) = usize::try_from(section.name)
                .ok()
                .and_then(|start| strings.get(start..))
            else {
                continue;
            };
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            if &rest[..end] == name.as_bytes() {
                // SHT_NOBITS (8) occupies no bytes in the file.
                if section.sh_type == 8 {
                    return Ok(Some(&[]));
                }
                return slice_at(self.data, section.offset, section.size)
                    .map(Some)
                    .ok_or(ElfError::Truncated("a section"));
            }
        }
        Ok(None)
    }

    /// Returns the bytes a program header covers in the file.
    pub(crate) fn segment_data(&self, header: &ProgramHeader) -> Result<&'a [u8], ElfError> {
        slice_at(self.data, header.offset, header.filesz).ok_or(ElfError::Truncated("a segment"))
    }

    /// Reports whether any program header asks for an interpreter (a dynamic executable).
    pub(crate) fn has_interpreter(&self) -> Result<bool, ElfError> {
        Ok(self
            .program_headers()?
            .iter()
            .any(|header| header.p_type == PT_INTERP))
    }
}

/// One ELF note: owner name (without its NUL), type and descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Note<'a> {
    pub(crate) name: &'a [u8],
    pub(crate) note_type: u32,
    pub(crate) desc: &'a [u8],
}

/// Parses the notes in a PT_NOTE segment (4-byte aligned name and descriptor).
pub(crate) fn parse_notes(mut data: &[u8]) -> Result<Vec<Note<'_>>, ElfError> {
    let mut notes = Vec::new();
    let pad4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    while data.len() >= 12 {
        let bad = || ElfError::Truncated("a note");
        let namesz = read_u32(data, 0).ok_or_else(bad)? as usize;
        let descsz = read_u32(data, 4).ok_or_else(bad)? as usize;
        let note_type = read_u32(data, 8).ok_or_else(bad)?;
        let name_end = 12usize.checked_add(namesz).ok_or_else(bad)?;
        let name = data.get(12..name_end).ok_or_else(bad)?;
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        let desc_start = pad4(name_end).ok_or_else(bad)?;
        let desc_end = desc_start.checked_add(descsz).ok_or_else(bad)?;
        let desc = data.get(desc_start..desc_end).ok_or_else(bad)?;
        notes.push(Note {
            name,
            note_type,
            desc,
        });
        let next = pad4(desc_end).ok_or_else(bad)?.min(data.len());
        data = &data[next..];
    }
    Ok(notes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The 64-byte header of an ELF64 little-endian x86-64 executable, its table offsets
    /// and counts left 0.
    pub(crate) fn elf_header() -> Vec<u8> {
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[6] = 1;
        out[16..18].copy_from_slice(&2u16.to_le_bytes());
        out[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        out
    }

    /// Builds a minimal ELF64 x86-64 file with the given program headers
    /// `(type, contents)` and sections `(name, contents)`.
    pub(crate) fn build_elf(segments: &[(u32, &[u8])], sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = elf_header();
        // Payloads first, remembering their offsets.
        let mut seg_offsets = Vec::new();
        for (_, data) in segments {
            seg_offsets.push(out.len() as u64);
            out.extend_from_slice(data);
        }
        let mut shstrtab = vec![0u8];
        let mut sec_entries = Vec::new();
        for (name, data) in sections {
            let name_off = shstrtab.len() as u32;
            shstrtab.extend_from_slice(name.as_bytes());
            shstrtab.push(0);
            sec_entries.push((name_off, out.len() as u64, data.len() as u64));
            out.extend_from_slice(data);
        }
        let shstrtab_name = shstrtab.len() as u32;
        shstrtab.extend_from_slice(b".shstrtab\0");
        let shstrtab_off = out.len() as u64;
        out.extend_from_slice(&shstrtab);
        sec_entries.push((shstrtab_name, shstrtab_off, shstrtab.len() as u64));
        while out.len() % 8 != 0 {
            out.push(0);
        }
        let phoff = out.len() as u64;
        for ((p_type, data), offset) in segments.iter().zip(&seg_offsets) {
            let mut ph = [0u8; 56];
            ph[0..4].copy_from_slice(&p_type.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[32..40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            out.extend_from_slice(&ph);
        }
        let shoff = out.len() as u64;
        out.extend_from_slice(&[0u8; 64]); // the null section
        for (name, offset, size) in &sec_entries {
            let mut sh = [0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes());
            sh[4..8].copy_from_slice(&1u32.to_le_bytes());
            sh[24..32].copy_from_slice(&offset.to_le_bytes());
            sh[32..40].copy_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&sh);
        }
        out[32..40].copy_from_slice(&phoff.to_le_bytes());
        out[40..48].copy_from_slice(&shoff.to_le_bytes());
        out[52..54].copy_from_slice(&64u16.to_le_bytes());
        out[54..56].copy_from_slice(&56u16.to_le_bytes());
        out[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        out[58..60].copy_from_slice(&64u16.to_le_bytes());
        out[60..62].copy_from_slice(&(sec_entries.len() as u16 + 1).to_le_bytes());
        out[62..64].copy_from_slice(&(sec_entries.len() as u16).to_le_bytes());
        out
    }

    /// Encodes one ELF note.
    pub(crate) fn note(name: &str, note_type: u32, desc: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        out.extend_from_slice(&note_type.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(desc);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    #[test]
    fn parses_sections_segments_and_notes() {
        let notes = [note("GNU", 3, b"abcdefgh"), note("Xen", 18, &[1, 0, 0, 1])].concat();
        let elf_bytes = build_elf(
            &[(PT_NOTE, &notes)],
            &[(".text", b"code"), (".modinfo", b"name=x\0")],
        );
        let elf = Elf::parse(&elf_bytes).expect("parse");
        assert_eq!(elf.machine, EM_X86_64);
        assert!(!elf.has_interpreter().expect("phdrs"));
        assert_eq!(
            elf.section_by_name(".modinfo").expect("sections"),
            Some(&b"name=x\0"[..])
        );
        assert_eq!(elf.section_by_name(".missing").expect("sections"), None);
        let headers = elf.program_headers().expect("phdrs");
        let parsed = parse_notes(elf.segment_data(&headers[0]).expect("seg")).expect("notes");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].name, b"Xen");
        assert_eq!(parsed[1].note_type, 18);
        assert_eq!(parsed[1].desc, &[1, 0, 0, 1]);

        let dynamic = build_elf(&[(PT_INTERP, b"/lib/ld.so\0")], &[]);
        assert!(Elf::parse(&dynamic)
            .expect("parse")
            .has_interpreter()
            .expect("phdrs"));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(Elf::parse(b"MZ\0\0").err(), Some(ElfError::NotElf));
        assert!(matches!(
            Elf::parse(b"\x7fELF\x02\x01"),
            Err(ElfError::Truncated(_))
        ));
        let mut bytes = build_elf(&[(PT_NOTE, b"x")], &[]);
        // Point the program header table far past the end.
        bytes[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        let elf = Elf::parse(&bytes).expect("header still parses");
        assert!(elf.program_headers().is_err());
    }
}
