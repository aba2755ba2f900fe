# The devices of vmfactory's QEMU (`configure --without-default-devices
# --with-devices-x86_64=vmfactory`): what vmfactory's VMs use, nothing else. Kconfig
# adds what these select (Q35 brings the ICH9 chipset, ACPI with CPU and memory
# hot-plug, VMGenID, fw_cfg, the 8250 serial port, PC DIMMs).
#
# A VM vmfactory starts: q35, the serial console, vmgenid, virtio-serial-pci with one
# port (the agent), PCIe root ports (hot-plugged virtio-blk-pci disks for containers),
# pc-dimm memory hot-plug, CPU hot-plug. virtio-net-pci and virtio-rng-pci are here for
# the networking to come and for users' own `-device` lines.
CONFIG_PCI_DEVICES=n
CONFIG_Q35=y
CONFIG_PCIE_PORT=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_SERIAL=y
CONFIG_VIRTIO_BLK=y
CONFIG_VIRTIO_NET=y
CONFIG_VIRTIO_RNG=y
