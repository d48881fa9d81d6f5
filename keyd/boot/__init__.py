"""keyd before the root file system is mounted: the initramfs-tools boot script and hook."""
