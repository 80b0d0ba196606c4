"""Paired RGB+IR data: the training dataset, the embedded demo, and `fuse-train data check / import`."""
