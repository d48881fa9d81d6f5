"""The host tier: tests that need root, /dev/fuse and loop devices on this machine (no VM)."""
