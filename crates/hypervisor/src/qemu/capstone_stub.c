/*
 * vmfactory's stand-in for libcapstone, the disassembler QEMU links. QEMU calls it only
 * to print guest or host code (`-d in_asm`, `-d out_asm`, the monitor's `x/i`), never to
 * run a VM, yet the dynamic linker relocates the real library's pointer tables in every
 * QEMU process: about 1.3 MiB of private memory per VM. These are the five functions
 * QEMU 7.2 imports; cs_open fails (CS_ERR_ARCH), so QEMU prints no disassembly.
 * Built with -nostdlib -ffreestanding and no headers: it needs nothing, not even libc
 * or its headers (libc6-dev).
 */

typedef unsigned long csh; /* size_t */

int cs_open(int arch, int mode, csh *handle)
{
    (void)arch;
    (void)mode;
    if (handle) {
        *handle = 0;
    }
    return 2; /* CS_ERR_ARCH */
}

int cs_close(csh *handle)
{
    (void)handle;
    return 0;
}

int cs_option(csh handle, int type, unsigned long value)
{
    (void)handle;
    (void)type;
    (void)value;
    return 2; /* CS_ERR_ARCH */
}

void *cs_malloc(csh handle)
{
    (void)handle;
    return (void *)0;
}

int cs_disasm_iter(csh handle, const unsigned char **code, unsigned long *size,
                   unsigned long long *address, void *insn)
{
    (void)handle;
    (void)code;
    (void)size;
    (void)address;
    (void)insn;
    return 0;
}
