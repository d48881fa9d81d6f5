"""Userspace disk encryption, for kernels without device-mapper (dm-crypt).

The cipher side reads TrueCrypt/VeraCrypt and plain volumes' parameters and decrypts
sectors; the serving side (``python -m keyd.crypto.serve``) presents a volume's decrypted
data area as one file on a FUSE mount, which keyd attaches to a loop device so that the
layers above (a file system, an md array, ZFS) see a block device as they would over
dm-crypt. The FUSE binding is an optional extra: nothing else in keyd imports it.
"""
