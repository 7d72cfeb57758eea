"""Model loading: messages that say what is wrong, and a conversion cache that several processes share.

Issue 22 items 5 and 9. The two-process test runs real processes on a temporary cache with a
small conversion function (the real conversion of the embedded model takes ~40 s on two cores;
its two-process run was checked by hand, see the issue note).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import workbench
from workbench import loading


def test_a_path_that_does_not_exist_says_so():
    with pytest.raises(ValueError, match=r"source '/nonexistent/model': the path does not exist"):
        workbench.load("/nonexistent/model")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # also a FileNotFoundError
        workbench.load("./no-such-folder")


@pytest.mark.parametrize("keep", [0, 10, 1000, 2_000_000, -1000])
def test_a_truncated_gguf_names_the_file_and_says_it_is_truncated(tmp_path, monkeypatch, keep):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    data = loading.embedded_gguf_path().read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=re.escape(str(bad)) + " is truncated or corrupt"):
        workbench.load(bad)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()], "a failed conversion left a folder"


def test_a_hub_id_that_cannot_be_fetched_offline_is_named(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"source 'someone/no-such-model' .* hub id failed"):
        workbench.load("someone/no-such-model")


CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from workbench.loading import cached_build

    out, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build(tmp):
        with open(log, "a") as f:
            f.write(f"build {os.getpid()}\\n")
        (tmp / "weights.bin").write_bytes(os.urandom(1 << 20))
        time.sleep(1.5)  # long enough for the other process to arrive while this one builds
        (tmp / "config.json").write_text(str(os.getpid()))

    ready = Path(sys.argv[3])
    ready.touch()
    while len(list(ready.parent.glob("ready-*"))) < 2:  # start both builds together
        time.sleep(0.01)
    print((cached_build(out, build) / "config.json").read_text())
""")


def test_two_processes_building_one_cache_entry_both_succeed_and_leave_no_temporary_folder(tmp_path):
    out, log = tmp_path / "cache" / "model-abc", tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(log), str(tmp_path / f"ready-{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert len(log.read_text().splitlines()) == 1, "the model was built twice"
    built_by = (out / "config.json").read_text()
    assert [o.strip() for o, _ in results] == [built_by, built_by]  # both got the one finished folder
    assert sorted(p.name for p in out.parent.iterdir()) == ["model-abc", "model-abc.lock"]


def test_a_build_that_fails_leaves_nothing_and_the_next_one_builds(tmp_path):
    out = tmp_path / "model-x"

    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        loading.cached_build(out, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-x.lock"]
    (tmp_path / "model-x.tmpstale").mkdir()  # a killed builder's leftovers
    loading.cached_build(out, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-x", "model-x.lock"]

