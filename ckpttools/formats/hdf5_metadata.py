"""The child of ``hdf5.read``: reads an HDF5 file's groups, attributes and dataset descriptions (no tensor
bytes) and answers with them as a pickle (``python -m ckpttools.formats.hdf5_metadata FILE``).

The answer is our own objects, made by this code from what h5py returned: plain values, numpy arrays,
``StorageRef``/``LazyTensor`` and findings.  The parent unpickles what its own child wrote, never a byte of
the file as a pickle (``watched_child`` says why the reading happens here)."""

from __future__ import annotations

import pickle
import sys

from ckpttools.formats.hdf5 import read_metadata_here
from ckpttools.formats.watched_child import Heartbeat

if __name__ == "__main__":
    heartbeat = Heartbeat()
    answer = read_metadata_here(sys.argv[1], heartbeat.beat)
    heartbeat.answer(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
