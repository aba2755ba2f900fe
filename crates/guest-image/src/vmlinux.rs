//! Extraction of the uncompressed `vmlinux` ELF from an LZ4-compressed bzImage, so QEMU
//! can boot it through its Xen PVH entry point (faster than the bzImage's decompressor).

use thiserror::Error;

use crate::elf::{self, Elf, PT_NOTE};

/// Magic of the LZ4 "legacy" frame format (`lz4 -l`), as stored little-endian.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Each legacy block decompresses to at most this many bytes.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Xen ELF note type carrying the 32-bit PVH entry point.
pub(crate) const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Why no bootable `vmlinux` could be extracted (the bzImage is used instead).
#[derive(Debug, Error)]
pub enum VmlinuxError {
    /// No LZ4 legacy stream was found in the bzImage.
    #[error(
        "No LZ4-compressed payload in the bzImage (is the kernel built with CONFIG_KERNEL_LZ4?)"
    )]
    NoLz4Payload,
    /// The LZ4 stream did not decode.
    #[error("LZ4 block {block} of the kernel payload does not decode: {reason}")]
    Lz4 {
        /// Index of the failing block.
        block: usize,
        /// The decoder's complaint.
        reason: String,
    },
    /// The decoded size disagrees with the size the kernel build appended.
    #[error("Decompressed kernel is {actual} bytes but the bzImage says {expected}")]
    SizeMismatch {
        /// Size recorded at the end of the payload.
        expected: u64,
        /// Size actually decoded.
        actual: u64,
    },
    /// The decoded payload is not an ELF file.
    #[error("Decompressed kernel is not a readable ELF file")]
    Elf(#[from] elf::ElfError),
    /// The ELF is not for x86-64.
    #[error("Decompressed kernel is for ELF machine {0}, not x86-64")]
    WrongMachine(u16),
    /// The ELF has no PVH entry note.
    #[error("Decompressed kernel has no Xen PVH entry note (is it built with CONFIG_PVH?)")]
    NoPvhNote,
}

/// Decompresses the kernel inside `bzimage` and checks it is a PVH-bootable x86-64 ELF.
pub(crate) fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let vmlinux = match payload_from_setup_header(bzimage) {
        Some(payload) if payload.starts_with(&LZ4_LEGACY_MAGIC.to_le_bytes()) => {
            let decoded = decode_lz4_legacy(&payload[4..])?;
            // The kernel build appends the uncompressed size after the stream.
            if let Some(expected) = payload
                .len()
                .checked_sub(4)
                .and_then(|at| elf::read_u32(payload, at))
            {
                if u64::from(expected) != decoded.len() as u64 {
                    return Err(VmlinuxError::SizeMismatch {
                        expected: expected.into(),
                        actual: decoded.len() as u64,
                    });
                }
            }
            decoded
        }
        _ => {
            let magic = LZ4_LEGACY_MAGIC.to_le_bytes();
            let start = bzimage
                .windows(4)
                .position(|window| window == magic)
                .ok_or(VmlinuxError::NoLz4Payload)?;
            decode_lz4_legacy(&bzimage[start + 4..])?
        }
    };
    validate_pvh_elf(&vmlinux)?;
    Ok(vmlinux)
}

/// `vmlinux` as QEMU boots it: the ELF header, the program headers and the segments byte
/// for byte, without the section header table and whatever lies after the last segment
/// (the symbol and string tables). QEMU's ELF loader reads the program headers to load
/// the kernel, and also copies a symbol table it finds through the section headers into
/// its heap, for its disassembler: for vmfactory's kernel 1.4 MiB of every direct-booted
/// VM's memory and about 6 ms of its start, for nothing a guest needs.
pub(crate) fn without_sections(vmlinux: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let elf = Elf::parse(vmlinux)?;
    let mut end = elf
        .program_header_table_end()
        .ok_or(elf::ElfError::Truncated("the program header table"))?;
    for header in elf.program_headers()? {
        // `segment_data` checks that the segment lies inside the file.
        elf.segment_data(&header)?;
        end = end.max(header.offset + header.filesz);
    }
    let end = usize::try_from(end)
        .ok()
        .filter(|end| *end <= vmlinux.len())
        .ok_or(elf::ElfError::Truncated("the program header table"))?;
    let mut out = vmlinux[..end.max(64)].to_vec();
    // e_shoff, and e_shnum with e_shstrndx: no section header table.
    out[40..48].fill(0);
    out[60..64].fill(0);
    validate_pvh_elf(&out)?;
    Ok(out)
}

/// Locates the compressed payload with the boot protocol (2.08+) header fields.
fn payload_from_setup_header(bzimage: &[u8]) -> Option<&[u8]> {
    if bzimage.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let version = u16::from_le_bytes([*bzimage.get(0x206)?, *bzimage.get(0x207)?]);
    if version < 0x0208 {
        return None;
    }
    let setup_sects = match *bzimage.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let protected_mode_start = (setup_sects + 1) * 512;
    let offset = usize::try_from(elf::read_u32(bzimage, 0x248)?).ok()?;
    let length = usize::try_from(elf::read_u32(bzimage, 0x24c)?).ok()?;
    let start = protected_mode_start.checked_add(offset)?;
    bzimage.get(start..start.checked_add(length)?)
}

/// Decodes an LZ4 legacy stream (the bytes after its magic): repeated
/// `[u32 LE compressed size][block]`, each block 8 MiB decompressed except the last.
/// Stops at the end of the data, after a short (final) block unless a new magic follows
/// (concatenated streams), or at a size field that cannot be a block (such as the
/// kernel's appended uncompressed size).
pub(crate) fn decode_lz4_legacy(mut data: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    // A block never compresses to more than its input plus LZ4's worst-case overhead.
    let max_block = lz4_flex::block::get_maximum_output_size(LZ4_LEGACY_BLOCK);
    let mut out = Vec::new();
    let mut block_index = 0usize;
    let mut stream_ended = false;
    while let Some(size) = elf::read_u32(data, 0) {
        if size == LZ4_LEGACY_MAGIC {
            data = &data[4..];
            stream_ended = false;
            continue;
        }
        let size = size as usize;
        let rest = &data[4..];
        if stream_ended || size == 0 || size > rest.len() || size > max_block {
            break;
        }
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let written =
            lz4_flex::block::decompress_into(&rest[..size], &mut out[start..]).map_err(|err| {
                VmlinuxError::Lz4 {
                    block: block_index,
                    reason: err.to_string(),
                }
            })?;
        out.truncate(start + written);
        stream_ended = written < LZ4_LEGACY_BLOCK;
        data = &rest[size..];
        block_index += 1;
    }
    if block_index == 0 {
        return Err(VmlinuxError::NoLz4Payload);
    }
    Ok(out)
}

/// Checks that `vmlinux` is an x86-64 ELF64 with a `Xen` PHYS32_ENTRY note.
pub(crate) fn validate_pvh_elf(vmlinux: &[u8]) -> Result<(), VmlinuxError> {
    let elf = Elf::parse(vmlinux)?;
    if elf.machine != elf::EM_X86_64 {
        return Err(VmlinuxError::WrongMachine(elf.machine));
    }
    for header in elf.program_headers()? {
        if header.p_type != PT_NOTE {
            continue;
        }
        let notes = elf::parse_notes(elf.segment_data(&header)?)?;
        if notes
            .iter()
            .any(|note| note.name == b"Xen" && note.note_type == XEN_ELFNOTE_PHYS32_ENTRY)
        {
            return Ok(());
        }
    }
    Err(VmlinuxError::NoPvhNote)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::tests::{build_elf, elf_header, note};

    /// Wraps `data` in the LZ4 legacy framing, in blocks of `block` bytes.
    fn legacy_frame(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let compressed = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            out.extend_from_slice(&compressed);
        }
        out
    }

    /// The Xen note with the kernel's 32-bit PVH entry point.
    fn pvh_note() -> Vec<u8> {
        note(
            "Xen",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0000u32.to_le_bytes(),
        )
    }

    fn pseudo_random(len: usize) -> Vec<u8> {
        let mut state = 0x1234_5678u32;
        (0..len)
            .map(|i| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                // Mix compressible runs with noise.
                if i % 64 < 32 {
                    (i / 64) as u8
                } else {
                    (state >> 24) as u8
                }
            })
            .collect()
    }

    #[test]
    fn decodes_multi_block_legacy_stream_with_appended_size() {
        let data = pseudo_random(LZ4_LEGACY_BLOCK * 2 + 12_345);
        let mut framed = legacy_frame(&data, LZ4_LEGACY_BLOCK);
        framed.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let decoded = decode_lz4_legacy(&framed[4..]).expect("decode");
        assert_eq!(decoded.len(), data.len());
        assert!(decoded == data);
    }

    #[test]
    fn skips_repeated_magic_and_stops_at_trailing_garbage() {
        let first = pseudo_random(1000);
        let second = pseudo_random(2000);
        let mut framed = legacy_frame(&first, LZ4_LEGACY_BLOCK);
        framed.extend_from_slice(&legacy_frame(&second, LZ4_LEGACY_BLOCK));
        // After a short (final) block, bytes that look like another block are not one.
        framed.extend_from_slice(&4u32.to_le_bytes());
        framed.extend_from_slice(b"wxyz");
        let decoded = decode_lz4_legacy(&framed[4..]).expect("decode");
        assert_eq!(decoded, [first, second].concat());
    }

    #[test]
    fn reports_corrupt_blocks_and_empty_streams() {
        assert!(matches!(
            decode_lz4_legacy(&[]),
            Err(VmlinuxError::NoLz4Payload)
        ));
        // One block whose first sequence copies from 65535 bytes before the start.
        let mut framed = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        framed.extend_from_slice(&3u32.to_le_bytes());
        framed.extend_from_slice(&[0x0f, 0xff, 0xff]);
        assert!(matches!(
            decode_lz4_legacy(&framed[4..]),
            Err(VmlinuxError::Lz4 { block: 0, .. })
        ));
    }

    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        image[0x1f1] = setup_sects;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let offset = 0x40u32;
        image[0x248..0x24c].copy_from_slice(&offset.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(&[0x90; 0x40]);
        image.extend_from_slice(payload);
        image.extend_from_slice(b"decompressor code after the payload");
        image
    }

    #[test]
    fn extracts_pvh_elf_from_fake_bzimage() {
        let notes = pvh_note();
        let vmlinux = build_elf(&[(PT_NOTE, &notes)], &[(".text", &pseudo_random(50_000))]);
        let mut payload = legacy_frame(&vmlinux, LZ4_LEGACY_BLOCK);
        payload.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
        assert_eq!(
            extract_vmlinux(&fake_bzimage(&payload)).expect("extract"),
            vmlinux
        );

        // Without a usable setup header the magic scan still finds the stream.
        let mut headerless = b"junk".to_vec();
        headerless.extend_from_slice(&payload);
        assert_eq!(extract_vmlinux(&headerless).expect("scan"), vmlinux);

        // A wrong appended size is caught.
        let mut bad_size = legacy_frame(&vmlinux, LZ4_LEGACY_BLOCK);
        bad_size.extend_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            extract_vmlinux(&fake_bzimage(&bad_size)),
            Err(VmlinuxError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn without_sections_keeps_the_segments_and_drops_the_symbols() {
        let notes = pvh_note();
        let code = pseudo_random(5_000);
        let vmlinux = build_elf(
            &[(PT_NOTE, &notes), (1, &code)],
            &[
                (".symtab", &pseudo_random(3_000)),
                (".strtab", b"start_kernel\0"),
            ],
        );
        let before = Elf::parse(&vmlinux).expect("parse");
        assert!(before.section_by_name(".symtab").expect("read").is_some());

        let stripped = without_sections(&vmlinux).expect("strip");
        let after = Elf::parse(&stripped).expect("parse stripped");
        assert!(after.section_headers().expect("sections").is_empty());
        assert_eq!(after.section_by_name(".symtab").expect("read"), None);
        // The section header table (after everything else here) is gone.
        assert!(stripped.len() < vmlinux.len());
        let segments = |elf: &Elf<'_>| -> Vec<Vec<u8>> {
            elf.program_headers()
                .expect("headers")
                .iter()
                .map(|h| elf.segment_data(h).expect("segment").to_vec())
                .collect()
        };
        assert_eq!(segments(&after), segments(&before));
        assert_eq!(segments(&after)[1], code);
        validate_pvh_elf(&stripped).expect("still PVH-bootable");
        // Stripping twice changes nothing more.
        assert_eq!(without_sections(&stripped).expect("again"), stripped);

        // A segment reaching past the end of the file is refused, not cut.
        let mut truncated = vmlinux.clone();
        let phoff = usize::try_from(u64::from_le_bytes(
            vmlinux[32..40].try_into().expect("8 bytes"),
        ))
        .expect("offset");
        truncated[phoff + 56 + 32..phoff + 56 + 40]
            .copy_from_slice(&(vmlinux.len() as u64).to_le_bytes());
        assert!(matches!(
            without_sections(&truncated),
            Err(VmlinuxError::Elf(_))
        ));
        // So is an ELF without the PVH note.
        let no_pvh = build_elf(&[(PT_NOTE, &note("GNU", 3, b"buildid!"))], &[]);
        assert!(matches!(
            without_sections(&no_pvh),
            Err(VmlinuxError::NoPvhNote)
        ));
    }

    /// An ELF laid out as a linked kernel is: header, program headers, the segments (here
    /// in reverse file order of their headers), then the symbols and the section header
    /// table.
    fn kernel_layout(segments: &[(u32, &[u8])], symbols: &[u8]) -> Vec<u8> {
        let mut out = elf_header();
        let phoff = 64u64;
        let data_start = phoff + 56 * segments.len() as u64;
        out.resize(data_start as usize, 0);
        let mut offsets = vec![0u64; segments.len()];
        for (index, (_, data)) in segments.iter().enumerate().rev() {
            offsets[index] = out.len() as u64;
            out.extend_from_slice(data);
        }
        for (index, ((p_type, data), offset)) in segments.iter().zip(&offsets).enumerate() {
            let at = (phoff as usize) + 56 * index;
            out[at..at + 4].copy_from_slice(&p_type.to_le_bytes());
            out[at + 8..at + 16].copy_from_slice(&offset.to_le_bytes());
            out[at + 32..at + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
        }
        out.extend_from_slice(symbols);
        let shoff = out.len() as u64;
        out.extend_from_slice(&[0u8; 128]); // the null section and one more
        out[32..40].copy_from_slice(&phoff.to_le_bytes());
        out[40..48].copy_from_slice(&shoff.to_le_bytes());
        out[54..56].copy_from_slice(&56u16.to_le_bytes());
        out[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        out[58..60].copy_from_slice(&64u16.to_le_bytes());
        out[60..62].copy_from_slice(&2u16.to_le_bytes());
        out[62..64].copy_from_slice(&1u16.to_le_bytes());
        out
    }

    #[test]
    fn without_sections_cuts_a_kernel_after_its_last_segment() {
        let notes = pvh_note();
        let code = pseudo_random(7_000);
        let symbols = pseudo_random(4_000);
        let vmlinux = kernel_layout(&[(PT_NOTE, &notes), (1, &code)], &symbols);
        let stripped = without_sections(&vmlinux).expect("strip");
        // The note segment comes last in the file: everything up to its end stays, byte
        // for byte but for the section header fields; the symbols and the table go.
        let end = vmlinux.len() - symbols.len() - 128;
        assert_eq!(stripped.len(), end);
        assert_eq!(stripped[64..], vmlinux[64..end]);
        assert_eq!(stripped[..40], vmlinux[..40]);
        assert_eq!(stripped[48..60], vmlinux[48..60]);
        assert_eq!(&stripped[40..48], &[0u8; 8]);
        assert_eq!(&stripped[60..64], &[0u8; 4]);
        let elf = Elf::parse(&stripped).expect("parse");
        assert!(elf.section_headers().expect("sections").is_empty());
        let headers = elf.program_headers().expect("headers");
        assert_eq!(elf.segment_data(&headers[1]).expect("code"), &code[..]);
        validate_pvh_elf(&stripped).expect("still PVH-bootable");
    }

    #[test]
    fn rejects_elf_without_pvh_note() {
        let notes = note("GNU", 3, b"buildid!");
        let vmlinux = build_elf(&[(PT_NOTE, &notes)], &[]);
        assert!(matches!(
            validate_pvh_elf(&vmlinux),
            Err(VmlinuxError::NoPvhNote)
        ));
        let mut payload = legacy_frame(&vmlinux, LZ4_LEGACY_BLOCK);
        payload.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
        assert!(extract_vmlinux(&fake_bzimage(&payload)).is_err());
        assert!(matches!(
            extract_vmlinux(b"no compressed data here"),
            Err(VmlinuxError::NoLz4Payload)
        ));
    }
}
