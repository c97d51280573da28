"""tm2fs: a pool of heterogeneous storage backends mounted as one FUSE tree, with the TM2 actions."""

__version__ = "0.1.0"
