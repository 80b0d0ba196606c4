"""What ckpttools knows about particular trainers' checkpoints, behind one protocol (``base.TrainerRules``):
one module per trainer, listed in ``registry.py``; the commands ask the registry and never name a trainer.
``fuse_train_schema`` is fuse-train's checkpoint schema, shared with the ``fuse_train`` package and the layout
table (it imports nothing)."""
