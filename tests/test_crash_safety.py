"""Crash safety of saves (hf_fisher.artifacts.atomic): a save killed with SIGKILL at any point leaves the
target holding the old or the new artifact, never none, and the next save (or load) cleans up.

The child processes use the test hook ``HF_FISHER_TEST_KILL_AT=<point>`` of hf_fisher.artifacts.atomic, or
kill themselves in the middle of writing a tensor file. Leftovers of other targets, of running
saves (locked) and of live processes are never removed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_fisher.artifacts import atomic
from hf_fisher.artifacts.fisher import Fisher, is_artifact_file
from hf_fisher.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[1]

# shared by this process and the children: a small Fisher built from tensors, numbers set by seed
BUILD = textwrap.dedent(
    """
    import torch
    from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata

    def build(seed):
        g = torch.Generator().manual_seed(seed)
        shapes = {"layers.0.w": (64, 32), "layers.1.w": (64, 32), "emb.weight": (50, 32)}
        mean = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
        var = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
        meta = FisherMetadata(task=f"task{seed}", reduction="param", model_name_or_path="org/toy")
        return Fisher(mean, var, reduction="param", groups=None, param_shapes=shapes,
                      counts=Counts(samples=seed, tokens=10 * seed), metadata=meta)
    """
)
_ns: dict = {}
exec(BUILD, _ns)
build = _ns["build"]

# A helper process with torch imported once: for each request it forks a child that saves
# build(seed) into target (with the kill point set) and reports the child's wait status. The helper
# runs no torch computation itself, so forking it is safe; each child costs a fraction of a second.
SERVER = BUILD + textwrap.dedent(
    """
    import os, signal, sys, traceback
    # import what a save needs now, so that each forked child only computes and writes
    import huggingface_hub, jinja2, safetensors.torch, hf_fisher.analysis, hf_fisher.artifacts.atomic, hf_fisher.artifacts.cards
    from huggingface_hub import ModelCard, ModelCardData, split_torch_state_dict_into_shards
    import torch.distributed.tensor  # imported lazily by split_torch_state_dict_into_shards (slow)
    hf_fisher.artifacts.cards.load_template()

    def save(target, seed, mode):
        if mode == "mid-write":  # die while the second tensor file is half written
            import safetensors.torch
            real, calls = safetensors.torch.save_file, []
            def save_file(tensors, filename, metadata=None):
                calls.append(filename)
                if len(calls) == 2:
                    real(tensors, filename, metadata=metadata)
                    data = open(filename, "rb").read()
                    with open(filename, "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(tensors, filename, metadata=metadata)
            safetensors.torch.save_file = save_file
        elif mode != "none":
            os.environ["HF_FISHER_TEST_KILL_AT"] = mode
        build(seed).save_pretrained(target, max_shard_size=20_000)

    def child(target, seed, mode, times):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for _ in range(times):
                    save(target, seed, mode)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        return pid

    for line in sys.stdin:
        target, mode, *rest = line.split()
        seeds = [int(x) for x in rest]
        times = 4 if len(seeds) > 1 else 1  # several seeds: concurrent children, each saving 4 times
        pids = [child(target, seed, mode, times) for seed in seeds]
        print(" ".join(str(os.waitpid(pid, 0)[1]) for pid in pids), flush=True)
    """
)


@pytest.fixture(scope="module")
def saver():
    """``saver(target, mode, *seeds) -> [exit code of each child]`` (-9: killed by SIGKILL)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(atomic.TEST_KILL_ENV, None)
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)

    def run(target: Path, mode: str, *seeds: int) -> list[int]:
        server.stdin.write(f"{target} {mode} {' '.join(map(str, seeds))}\n")
        server.stdin.flush()
        line = server.stdout.readline()
        assert line, "the helper process died"
        return [os.waitstatus_to_exitcode(int(x)) for x in line.split()]

    yield run
    server.stdin.close()
    server.wait(timeout=60)


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((atomic.TMP_PREFIX, atomic.OLD_PREFIX)))


def same(a: Fisher, b: Fisher) -> bool:
    return a.names() == b.names() and all(torch.equal(a[n], b[n]) for n in a.names()) and all(
        torch.equal(a.variances[n], b.variances[n]) for n in a.names()) and a.counts == b.counts


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def fake_leftover(parent: Path, prefix: str, target_name: str, pid: int, host: str | None = None) -> Path:
    path = parent / f"{prefix}{target_name}-{pid}.{host or atomic._HOST}-{os.urandom(4).hex()}"
    path.mkdir()
    (path / "fisher.safetensors").write_bytes(b"partial")
    return path


# ---------------------------------------------------------------------------- SIGKILL at each point
#: (kill point, is there an artifact already, what the target holds afterwards)
CASES = [
    ("mid-write", True, "old"),
    ("tmp-created", True, "old"),
    ("tmp-complete", True, "old"),
    ("between-renames", True, "old"),  # the target is missing on disk: restored by the next load/save
    ("after-swap", True, "new"),
    ("mid-write", False, None),
    ("tmp-complete", False, None),
]


@pytest.mark.parametrize("point,existing,holds", CASES, ids=[f"{p}-{'overwrite' if e else 'new'}" for p, e, _ in CASES])
@pytest.mark.parametrize("then", ["load", "save"])
def test_killed_save_leaves_old_or_new_artifact(tmp_path, saver, point, existing, holds, then, caplog):
    target = tmp_path / "art"
    old, new, third = build(1), build(2), build(3)
    if existing:
        old.save_pretrained(target)
    assert saver(target, point, 2) == [-signal.SIGKILL]
    assert hidden(tmp_path), "the kill left nothing behind: the kill point was not reached"
    if point == "between-renames":
        assert not target.exists() and any(n.startswith(atomic.OLD_PREFIX) for n in hidden(tmp_path))
    if then == "load":
        if holds is None:
            with pytest.raises(ArtifactError, match="does not exist"):
                Fisher.from_pretrained(target)
        else:
            with caplog.at_level(logging.WARNING, logger="hf_fisher.artifacts.atomic"):
                loaded = Fisher.from_pretrained(target)
            assert same(loaded, old if holds == "old" else new)
            if point == "between-renames":
                assert "restored the previous version" in caplog.text and target.is_dir()
    # the next save cleans up every leftover of this target and writes the new numbers
    third.save_pretrained(target)
    assert hidden(tmp_path) == []
    assert same(Fisher.from_pretrained(target), third)
    assert sorted(os.listdir(target)) == ["README.md", "fisher.safetensors", "fisher_config.json"]


def test_check_target_restores_the_backup_before_judging(tmp_path, saver):
    """Between the renames the target is missing: check_target(overwrite=False) must still see the
    restored previous artifact (and refuse), not a free name."""
    target = tmp_path / "art"
    build(1).save_pretrained(target)
    assert saver(target, "between-renames", 2) == [-signal.SIGKILL] and not target.exists()
    with pytest.raises(ArtifactError, match="already holds a Fisher artifact"):
        atomic.check_target(target, allowed=is_artifact_file, what="Fisher artifact", overwrite=False)
    assert same(Fisher.from_pretrained(target), build(1))
    assert hidden(tmp_path) == []


def test_child_without_kill_point_saves_normally(tmp_path, saver):
    assert saver(tmp_path / "art", "none", 4) == [0]
    assert same(Fisher.from_pretrained(tmp_path / "art"), build(4)) and hidden(tmp_path) == []


# ---------------------------------------------------------------------------- whose leftovers
def test_only_stale_leftovers_of_the_same_target_are_removed(tmp_path):
    target = tmp_path / "art"
    build(1).save_pretrained(target)
    gone = dead_pid()
    stale_tmp = fake_leftover(tmp_path, atomic.TMP_PREFIX, "art", gone)
    stale_old = fake_leftover(tmp_path, atomic.OLD_PREFIX, "art", gone)
    other_target = fake_leftover(tmp_path, atomic.TMP_PREFIX, "art-2", gone)  # "art-2" is another target
    other_target_old = fake_leftover(tmp_path, atomic.OLD_PREFIX, "ar", gone)
    live = fake_leftover(tmp_path, atomic.TMP_PREFIX, "art", os.getpid())  # young, live process: may be running
    other_host = fake_leftover(tmp_path, atomic.TMP_PREFIX, "art", gone, host="0badc0de")
    legacy = tmp_path / ".tmp-hf-fisher-k2j3h4"  # unknown format: not ours to judge
    legacy.mkdir()
    locked = fake_leftover(tmp_path, atomic.TMP_PREFIX, "art", gone)  # dead pid in the name, but locked
    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        kinds = {lo.path: lo for lo in atomic.leftovers(target)}
        assert set(kinds) == {stale_tmp, stale_old, live, other_host, locked}
        assert kinds[stale_tmp].stale and kinds[stale_old].stale
        assert not kinds[live].stale and not kinds[other_host].stale and not kinds[locked].stale
        assert "locked" in kinds[locked].reason and "another host" in kinds[other_host].reason
        build(2).save_pretrained(target)
    finally:
        os.close(fd)
    for p in (stale_tmp, stale_old):
        assert not p.exists(), p
    for p in (other_target, other_target_old, live, other_host, legacy, locked):
        assert p.exists(), p
    assert same(Fisher.from_pretrained(target), build(2))


def test_reused_pid_makes_an_old_unlocked_leftover_stale(tmp_path, monkeypatch):
    target = tmp_path / "art"
    live = fake_leftover(tmp_path, atomic.TMP_PREFIX, "art", os.getpid())
    assert not atomic.leftovers(target)[0].stale
    monkeypatch.setattr(atomic, "STALE_AFTER_S", -1.0)  # "older than the limit"
    assert atomic.leftovers(target)[0].stale
    rec = atomic.recover(target)
    assert rec.removed == [live] and not live.exists()


def test_a_running_save_keeps_its_folder(tmp_path):
    """Another process's save in progress (its temporary folder locked) is left alone."""
    target = tmp_path / "art"
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from hf_fisher.artifacts import atomic
        with atomic.atomic_folder(Path(sys.argv[1])) as tmp:
            (tmp / "fisher_config.json").write_text("{}")
            print(tmp, flush=True)
            sys.stdin.readline()  # wait for the parent
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", script, str(target)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        tmp = Path(child.stdout.readline().strip())
        assert tmp.is_dir() and tmp.name.startswith(atomic.TMP_PREFIX + "art-")
        build(1).save_pretrained(target)  # a concurrent save of the same target
        assert tmp.is_dir() and (tmp / "fisher_config.json").read_text() == "{}"
        (lo,) = atomic.leftovers(target)
        assert lo.path == tmp and not lo.stale and "locked" in lo.reason
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
    assert not tmp.exists() and hidden(tmp_path) == []
    assert sorted(os.listdir(target)) == ["fisher_config.json"]  # the child's (later) folder won


def test_concurrent_saves_of_one_target(tmp_path, saver):
    """Two processes overwriting the same target 4 times each: a complete artifact, no leftovers."""
    target = tmp_path / "art"
    build(1).save_pretrained(target)
    assert saver(target, "none", 5, 6) == [0, 0]
    loaded = Fisher.from_pretrained(target)
    assert same(loaded, build(5)) or same(loaded, build(6))
    assert hidden(tmp_path) == []


def test_unrestorable_backup_is_reported(tmp_path, monkeypatch):
    target = tmp_path / "art"
    build(1).save_pretrained(target)
    aside = tmp_path / f"{atomic.OLD_PREFIX}art-{dead_pid()}.{atomic._HOST}-abc123"
    target.rename(aside)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == aside:
            raise PermissionError("read-only folder")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ArtifactError, match="rename it to art by hand"):
        atomic.check_target(target, allowed=is_artifact_file, what="Fisher artifact")
    assert same(Fisher.from_pretrained(target), build(1))  # read from the backup in place
    assert aside.is_dir() and not target.exists()
    monkeypatch.setattr(os, "rename", real_rename)
    assert same(Fisher.from_pretrained(target), build(1)) and target.is_dir() and not aside.exists()


def test_long_target_names_are_shortened_but_matched(tmp_path):
    name = "f" * 200
    target = tmp_path / name
    build(1).save_pretrained(target)
    stale = fake_leftover(tmp_path, atomic.TMP_PREFIX, atomic._target_key(name), dead_pid())
    assert len(stale.name) < 200
    similar = fake_leftover(tmp_path, atomic.TMP_PREFIX, atomic._target_key("f" * 199 + "g"), dead_pid())
    build(2).save_pretrained(target)
    assert not stale.exists() and similar.exists()
    assert same(Fisher.from_pretrained(target), build(2))
