"""What ckpttools knows about the checkpoints of particular trainers: their keys and the run record the
preflight compares.  ``fuse_train`` (the package) imports its checkpoint schema from ``trainers.fuse_train``."""
