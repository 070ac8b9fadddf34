"""blockfs: virtual block devices (raw, qcow2, ...) exposed as plain files through FUSE."""

__version__ = "0.1.0"
