"""Demo data is made in a temporary directory under a file lock and renamed into place (issue #23)."""
from __future__ import annotations

import os
import threading
import time

import pytest

from medjax.data.demo import COMPLETE_MARKER, build_demo, demo_is_current
from medjax.errors import MedjaxInputError


def _writer(calls, delay=0.2):
    def write(tmp):
        calls.append(tmp)
        with open(os.path.join(tmp, "a.txt"), "w") as f:
            f.write("half")
        time.sleep(delay)  # a reader must never see this half-written state at the final path
        with open(os.path.join(tmp, "a.txt"), "w") as f:
            f.write("whole")
    return write


def test_two_concurrent_makers_build_once_and_nobody_sees_a_partial_demo(tmp_path):
    out, calls, seen = str(tmp_path / "demo"), [], []

    def reader():
        while not calls or threads[0].is_alive() or threads[1].is_alive():
            if os.path.exists(os.path.join(out, "a.txt")):
                seen.append(open(os.path.join(out, "a.txt")).read())
            time.sleep(0.005)

    threads = [threading.Thread(target=build_demo, args=(out, {"n": 1}, _writer(calls), ("a.txt",)),
                                kwargs={"log": lambda _: None}) for _ in range(2)]
    watcher = threading.Thread(target=reader)
    for t in threads:
        t.start()
    watcher.start()
    for t in threads + [watcher]:
        t.join()
    assert len(calls) == 1 and not calls[0].endswith("/demo")  # made once, in a temporary directory
    assert open(os.path.join(out, "a.txt")).read() == "whole" and set(seen) <= {"whole"}
    assert demo_is_current(out, {"n": 1}, ("a.txt",))
    assert sorted(os.listdir(tmp_path)) == ["demo", "demo.lock"]  # no temporary directory left behind


def test_failed_build_leaves_nothing_and_other_arguments_replace_the_demo(tmp_path):
    out = str(tmp_path / "demo")

    def broken(tmp):
        open(os.path.join(tmp, "a.txt"), "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_demo(out, {"n": 1}, broken, log=lambda _: None)
    assert sorted(os.listdir(tmp_path)) == ["demo.lock"]
    calls = []
    build_demo(out, {"n": 1}, _writer(calls, 0.0), log=lambda _: None)
    build_demo(out, {"n": 1}, _writer(calls, 0.0), log=lambda _: None)  # current: skipped
    assert len(calls) == 1
    build_demo(out, {"n": 2}, lambda tmp: open(os.path.join(tmp, "b.txt"), "w").close(), log=lambda _: None)
    assert sorted(os.listdir(out)) == [COMPLETE_MARKER, "b.txt"]  # replaced whole, not mixed
    assert sorted(os.listdir(tmp_path)) == ["demo", "demo.lock"]


def test_a_directory_that_is_not_a_demo_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    with pytest.raises(MedjaxInputError, match=r"mine: exists and is not a finished medjax demo"):
        build_demo(str(out), {"n": 1}, lambda tmp: None, log=lambda _: None)
    assert (out / "notes.txt").read_text() == "user data"
