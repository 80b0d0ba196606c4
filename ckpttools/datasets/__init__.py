"""Paired RGB+IR detection datasets as they are published (LLVIP, M3FD, FLIR aligned, KAIST, VOC / COCO pairs,
YOLOFuse): the layout table, annotation parsers, an index of pairs with every problem found, and splits.

In ckpttools so that ``ckpt preflight --data`` fingerprints any of them exactly as
fuse-train recorded it; fuse-train's ``data check`` / ``data import`` and its training are built on it.
"""
