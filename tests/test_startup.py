"""Start-up needs no compiler: nothing is JIT-built when training starts (issue 12, item 6).

DeepSpeed's CPU backend would JIT-compile its shared-memory comm op on the first start (about 70 s)
under a lock file that a killed build leaves behind. lucatrain starts DeepSpeed without that op
(`engine._no_cpu_shm_comm_op`). These runs prove it the hard way: no C/C++ compiler or ninja is on
PATH, the extension cache is empty except for the stale lock a killed build would leave, and two
processes still train.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import launch, read_history, tiny_overrides

COMPILERS = ("c++", "g++", "gcc", "cc", "clang", "clang++", "ninja")


def _path_without_compilers(tmp_path: Path) -> str:
    """A PATH holding only this Python and DeepSpeed's launcher."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("python", sys.executable), ("python3", sys.executable), ("deepspeed", shutil.which("deepspeed"))):
        (bin_dir / name).symlink_to(target)
    path = str(bin_dir)
    assert not [c for c in COMPILERS if shutil.which(c, path=path)]
    return path


def _extension_cache_with_stale_lock(tmp_path: Path) -> Path:
    """An empty torch extension cache, except the lock a build killed half-way leaves: torch's JIT
    loader would wait on it forever."""
    cache = tmp_path / "torch_extensions"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    (cache / tag / "deepspeed_shm_comm").mkdir(parents=True)
    (cache / tag / "deepspeed_shm_comm" / "lock").write_text("")
    return cache


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [1, 2])
def test_training_starts_with_no_compiler_and_a_stale_build_lock(tmp_path, nproc):
    path = _path_without_compilers(tmp_path)
    cache = _extension_cache_with_stale_lock(tmp_path)
    env = {"PATH": path, "TORCH_EXTENSIONS_DIR": str(cache), "CC": "", "CXX": ""}
    args = ["train", "--config", "demo_tiny", *tiny_overrides(tmp_path, **{"train.max_steps": 2, "train.save_steps": 2})]
    result = launch(args, nproc=nproc, timeout=300, launcher="deepspeed" if nproc > 1 else "python", env=env)
    assert [h["step"] for h in read_history(tmp_path / "run") if "lr" in h][-1] == 2
    # Nothing was built or even attempted: the cache holds only the stale lock, and no shared-memory
    # all-reduce buffer (which only that op maps) was created.
    built = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert built == [f"py{sys.version_info.major}{sys.version_info.minor}_cpu/deepspeed_shm_comm/lock"]
    assert result.shm_left == []
    assert "deepspeed_shm_comm" not in result.stdout + result.stderr


def test_the_comm_op_is_marked_incompatible_only_while_deepspeed_starts():
    """DeepSpeed's own table of compatible ops is restored afterwards (another library in the same
    process sees it unchanged)."""
    import deepspeed

    from lucatrain.engine import _no_cpu_shm_comm_op

    name = deepspeed.get_accelerator().create_op_builder("ShareMemCommBuilder").NAME
    before = deepspeed.ops.__compatible_ops__.get(name)
    with _no_cpu_shm_comm_op():
        assert deepspeed.ops.__compatible_ops__[name] is False
        from deepspeed.comm.torch import build_shm_op

        assert build_shm_op() is None  # DeepSpeed's backend start then skips the build
    assert deepspeed.ops.__compatible_ops__.get(name) == before
