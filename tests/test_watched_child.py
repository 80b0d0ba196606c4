"""The watchdog of readers run in a child (``formats/watched_child.py``): it stops a child that goes silent,
never one that keeps reporting progress however long it works, says when one crashed, and leaves an ordinary
error to the caller."""

from __future__ import annotations

import time

from ckpttools.formats.watched_child import run_watched

CHILD = "tests.watched_children"


def test_a_child_that_keeps_reporting_is_answered_past_the_silence_limit():
    started = time.monotonic()
    answer, problem = run_watched(CHILD, "steady", seconds=1.0)
    assert (answer, problem) == (b"done", None)
    assert time.monotonic() - started > 2.0  # it worked longer than the limit and was not stopped


def test_a_silent_child_is_stopped_and_said_so():
    answer, problem = run_watched(CHILD, "silent", seconds=1.0)
    assert answer is None and "without progress" in problem


def test_a_crashed_child_is_named_by_its_signal():
    answer, problem = run_watched(CHILD, "crash", seconds=10.0)
    assert answer is None and "SIGSEGV" in problem


def test_an_ordinary_error_is_left_to_the_caller():
    assert run_watched(CHILD, "error", seconds=10.0) == (None, None)


def test_a_process_with_many_files_open_still_watches_its_child(tmp_path):
    """Descriptors past 1,023 (a long-lived process that opened many checkpoints): select() refuses them."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        raise AssertionError(f"this machine allows {hard} open files; the test needs 1,100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    held = [open(tmp_path / "f", "a") for _ in range(1030)]  # noqa: SIM115 - held open on purpose
    try:
        assert run_watched(CHILD, "error", seconds=10.0) == (None, None)
        assert run_watched(CHILD, "silent", seconds=0.5)[1] is not None
    finally:
        for f in held:
            f.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
