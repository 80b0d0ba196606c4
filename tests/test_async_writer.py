"""The background checkpoint writer: its share of the CPU (starved while it keeps up, fair once it falls behind),
and the thread the saved tree is let go on."""

from __future__ import annotations

import os
import sys
import threading
import weakref

import pytest
import torch

from fuse_train.checkpoint.async_save import FAIR_NICE, STARVED_NICE, AsyncSaver

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


def _writer(seen: list, release: threading.Event):
    def write(snapshot) -> None:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        release.wait(10)

    return write


def test_the_writer_is_starved_while_it_keeps_up_and_fair_once_a_save_finds_it_busy():
    saver, seen = AsyncSaver(), []
    state = {"w": torch.ones(4)}
    done = threading.Event()
    done.set()
    saver.submit(state, _writer(seen, done))  # keeps up: the next save finds it finished
    saver.wait()
    saver.submit(state, _writer(seen, done))
    saver.wait()
    assert seen == [STARVED_NICE, STARVED_NICE]
    held = threading.Event()
    saver.submit(state, _writer(seen, held))  # still writing when the next save comes
    threading.Timer(0.2, held.set).start()
    saver.submit(state, _writer(seen, done))  # waits for it (at a fair share), then writes at a fair share
    saver.wait()
    assert seen == [STARVED_NICE, STARVED_NICE, STARVED_NICE, FAIR_NICE]


def test_the_saved_trees_tensors_are_let_go_on_the_writers_thread():
    # Freeing a tensor waits for the GIL: were the training thread to free the state dict's thousands of views
    # on its way out of save() while the writer pickles, it would stand still until the writer let go of the
    # GIL.  So the writer holds the tree and drops it when it is done.
    saver, release, freed_on = AsyncSaver(), threading.Event(), []
    view = torch.ones(4).detach()
    weakref.finalize(view, lambda: freed_on.append(threading.current_thread().name))
    saver.submit({"w": view}, lambda snapshot: release.wait(10))
    del view
    assert freed_on == []  # the caller has let go; the writer still holds it
    release.set()
    saver.wait()
    assert freed_on == ["checkpoint-writer"]
