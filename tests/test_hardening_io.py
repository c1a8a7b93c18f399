"""Issue 21, output folders, inputs, plugins and Hub pushes (hf_fisher.artifacts.atomic, hf_fisher.plugins,
hf_fisher.artifacts.hub):

- an output folder that cannot be written is refused before any work, naming the user's path
  (API and every CLI command that writes), a symlinked output folder stays a link, and stale
  temporary folders of a killed save are removed at the next save of *any* target in the folder;
- an output folder that is, holds or lies inside an input (the model's own folder) is refused
  before anything is loaded, naming both paths;
- an installed plugin that re-registers a taken name is reported and skipped (built-ins win; the
  first-loaded plugin wins), and ``hf-fisher plugins`` keeps working;
- ``HF_FISHER_DISABLE_PLUGIN_AUTOLOAD`` takes the usual boolean spellings and refuses others;
- ``push_to_hub`` offline or without a token is refused before any work or request.

CLI cases run the real ``hf-fisher`` entry point in a subprocess, with model folders whose loading
would fail differently (a config.json that is not JSON): a check that passes them ran before loading.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from hf_fisher import plugins
from hf_fisher.artifacts import atomic
from hf_fisher.artifacts.fisher import Counts, Fisher, FisherMetadata
from hf_fisher.errors import ArtifactError, InvalidInputError

import tiny_models as tm

pytest_plugins = ["hub_server"]  # the hub_server fixture (a real local Hub-compatible server)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def entry_point() -> list[str]:
    script = Path(sys.executable).with_name("hf-fisher")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hf_fisher.cli"]


def run_cli(*args: str, cwd: Path, env: dict | None = None, drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    base = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    base.update(env or {})
    for k in drop:
        base.pop(k, None)
    return subprocess.run([*entry_point(), *args], cwd=cwd, env=base, capture_output=True, text=True, timeout=180)


def assert_refused(proc: subprocess.CompletedProcess, command: str, pattern: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hf-fisher {command}: error: "), proc.stderr
    assert re.search(pattern, last), last


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def small_fisher(seed: int) -> Fisher:
    g = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.w": (8, 4), "emb.weight": (5, 4)}
    mean = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    var = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    meta = FisherMetadata(task=f"task{seed}", reduction="param", model_name_or_path="org/toy")
    return Fisher(mean, var, reduction="param", groups=None, param_shapes=shapes,
                  counts=Counts(samples=seed, tokens=10 * seed), metadata=meta)


def same(a: Fisher, b: Fisher) -> bool:
    return a.names() == b.names() and all(torch.equal(a[n], b[n]) for n in a.names())


def unwritable(tmp: Path) -> Path | None:
    """A folder path whose nearest existing ancestor cannot be written to (None when there is none)."""
    ro = tmp / "read-only"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    if not os.access(ro, os.W_OK):
        return ro / "new" / "out"
    ro.chmod(0o755)  # root writes anyway: a read-only system folder
    for d in (Path("/sys"), Path("/proc/sys")):
        if d.is_dir():
            try:
                probe = d / f".hf-fisher-probe-{uuid.uuid4().hex[:6]}"
                probe.touch()
                probe.unlink()
            except OSError:
                return d / f"hf-fisher-io-test-{uuid.uuid4().hex[:6]}"
    return None


@pytest.fixture
def ro_target(tmp_path) -> Path:
    found = unwritable(tmp_path)
    if found is None:
        pytest.skip("no unwritable folder on this machine")
    yield found
    (tmp_path / "read-only").chmod(0o755)


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((atomic.TMP_PREFIX, atomic.OLD_PREFIX)))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: a real tiny model with a tokenizer, two more models, data files, Fisher
    artifacts, and a model folder whose config.json is broken (loading it fails)."""
    from hf_fisher.demo import word_tokenizer

    root = tmp_path_factory.mktemp("io")
    lines = ["the cat sat on the mat", "a dog ran in the park", "the bird sang"]
    for i in range(2):
        tm.llama(torch.float32, seed=i + 1).save_pretrained(root / f"m{i}")
        word_tokenizer(sorted({w for line in lines for w in line.split()})).save_pretrained(root / f"m{i}")
        small_fisher(i + 1).save_pretrained(root / f"f{i}")
    (root / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "b.txt").write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{this is not json", encoding="utf-8")
    return root


# =========================================================================== output folders: writable


def test_api_save_to_an_unwritable_folder_names_the_users_path(ro_target):
    with pytest.raises(ArtifactError) as err:
        small_fisher(1).save_pretrained(ro_target)
    msg = str(err.value)
    assert str(ro_target) in msg and "not writable" in msg and atomic.TMP_PREFIX not in msg


def test_api_merge_and_prune_check_writability_before_any_work(ws, ro_target):
    from hf_fisher.consumers.merge.api import merge_with_fisher
    from hf_fisher.consumers.prune.core import prune

    with pytest.raises(ArtifactError, match=rf"output_dir {re.escape(str(ro_target))}: .*not writable"):
        # the inputs do not exist: had the inputs been read first, the error would be about them
        merge_with_fisher([ws / "nowhere-0", ws / "nowhere-1"], method="average", output_dir=ro_target, progress=False)
    model = tm.llama(torch.float32)
    result = prune(model, None, sparsity=0.2, structured=None, score="magnitude", progress=False)
    with pytest.raises(ArtifactError, match=rf"{re.escape(str(ro_target))}.*not writable"):
        result.save_pretrained(ro_target)


def _writing_commands(ws: Path, out: Path, tmp: Path) -> dict[str, list[str]]:
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "average", "models": [
        {"model": str(ws / "broken")}, {"model": str(ws / "broken")}]}), encoding="utf-8")
    two = ["--model", str(ws / "broken"), "--task-a", str(ws / "a.txt"), "--task-b", str(ws / "b.txt"), "--out", str(out)]
    return {
        "prune": ["prune", "--model", str(ws / "broken"), "--sparsity", "0.2", "--score", "magnitude",
                  "--structured", "none", "--out", str(out)],
        "report": ["report", str(ws / "f0"), "--out", str(out)],
        "qkov": ["qkov", *two],
        "conflicts": ["conflicts", *two],
        "analyze": ["analyze", "--model", str(ws / "broken"), "--task", f"a={ws / 'a.txt'}", "--out", str(out)],
        "merge": ["merge", str(recipe), "--out", str(out)],
        "demo": ["demo", "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["prune", "report", "qkov", "conflicts", "analyze", "merge", "demo"])
def test_cli_refuses_an_unwritable_out_before_the_work(ws, tmp_path, ro_target, command):
    args = _writing_commands(ws, ro_target, tmp_path)[command]
    before = tree(tmp_path)
    proc = run_cli(*args, cwd=tmp_path)
    assert_refused(proc, command, rf"{re.escape(str(ro_target))}.*is not writable.*choose another --out")
    assert "config" not in proc.stderr  # the model was never loaded
    assert tree(tmp_path) == before


# =========================================================================== output folders: symlinks


def test_a_symlinked_output_folder_stays_a_link(tmp_path):
    real = tmp_path / "store" / "fisher-real"
    small_fisher(1).save_pretrained(real)
    link = tmp_path / "fisher"
    link.symlink_to(real, target_is_directory=True)
    small_fisher(2).save_pretrained(link)  # replaces the artifact the link points to
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert same(Fisher.from_pretrained(link), small_fisher(2)) and same(Fisher.from_pretrained(real), small_fisher(2))
    assert hidden(tmp_path) == [] and hidden(real.parent) == []
    # a link to a folder that does not exist yet: the folder is created where the link points
    dangling = tmp_path / "later"
    dangling.symlink_to(tmp_path / "store" / "new-place")
    small_fisher(3).save_pretrained(dangling)
    assert dangling.is_symlink() and same(Fisher.from_pretrained(tmp_path / "store" / "new-place"), small_fisher(3))


def test_a_save_through_a_link_killed_between_its_renames_is_restored_through_the_link(tmp_path):
    real = tmp_path / "store" / "fisher-real"
    small_fisher(1).save_pretrained(real)
    link = tmp_path / "fisher"
    link.symlink_to(real)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           atomic.TEST_KILL_ENV: "between-renames"}
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(link), str(REPO / "tests")], env=env, timeout=180)
    assert proc.returncode == -signal.SIGKILL and not real.exists() and hidden(real.parent)
    assert same(Fisher.from_pretrained(link), small_fisher(1))  # the previous version, restored where the link points
    assert link.is_symlink() and real.is_dir() and not any(n.startswith(atomic.OLD_PREFIX) for n in hidden(real.parent))
    small_fisher(2).save_pretrained(link)  # the next save through the link removes the killed save's folder
    assert link.is_symlink() and same(Fisher.from_pretrained(real), small_fisher(2)) and hidden(real.parent) == []


def test_a_link_to_foreign_files_is_still_refused(tmp_path):
    real = tmp_path / "precious"
    real.mkdir()
    (real / "notes.txt").write_text("keep", encoding="utf-8")
    link = tmp_path / "out"
    link.symlink_to(real)
    with pytest.raises(ArtifactError, match="refusing to overwrite .*notes.txt"):
        small_fisher(1).save_pretrained(link)
    assert (real / "notes.txt").read_text(encoding="utf-8") == "keep" and link.is_symlink()


# =========================================================================== output folders: stale leftovers


KILLED_SAVE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from test_hardening_io import small_fisher
    small_fisher(7).save_pretrained(sys.argv[1])
    """
)


def test_killed_save_is_cleaned_at_the_next_save_of_another_target(tmp_path, monkeypatch):
    target_a, target_b = tmp_path / "a", tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           atomic.TEST_KILL_ENV: "tmp-complete"}
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target_a), str(REPO / "tests")], env=env, timeout=180)
    assert proc.returncode == -signal.SIGKILL
    (left,) = [tmp_path / n for n in hidden(tmp_path)]
    assert left.name.startswith(atomic.TMP_PREFIX + "a-") and (left / "fisher.safetensors").is_file()

    # a young leftover of a dead process (it may still be fsync'ing on a shared disk) is kept
    small_fisher(1).save_pretrained(target_b)
    assert left.exists()
    # old enough (unchanged for STALE_AFTER_S seconds; its ctime cannot be set back, so the limit is
    # lowered): the next save of any target in the folder removes it ...
    monkeypatch.setattr(atomic, "STALE_AFTER_S", -1.0)
    # ... but never a leftover of a running save (locked), nor another target's backup whose target is gone
    live = tmp_path / f"{atomic.TMP_PREFIX}c-{os.getpid()}.{atomic._HOST}-{uuid.uuid4().hex[:12]}"
    live.mkdir()
    import fcntl

    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    backup = tmp_path / f"{atomic.OLD_PREFIX}gone-{dead.pid}.{atomic._HOST}-{uuid.uuid4().hex[:12]}"
    backup.mkdir()
    try:
        small_fisher(2).save_pretrained(target_b)
        assert not left.exists()
        assert live.exists() and backup.exists()
    finally:
        os.close(fd)
    assert same(Fisher.from_pretrained(target_b), small_fisher(2)) and not target_a.exists()
    # unlocked now, but its process (this one) is alive: only a dead owner makes another target's folder stale
    assert atomic.sweep(tmp_path) == [] and live.exists()


KILLED_SCRATCH = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from hf_fisher import atomic
    with atomic.scratch_folder(Path(sys.argv[1])) as scratch:  # what analyze() stages its stages in
        (scratch / "big.bin").write_bytes(b"x" * 1000)
        print(scratch, flush=True)
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.readline()
    """
)


def test_killed_analysis_staging_is_swept_but_a_running_one_is_kept(tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILLED_SCRATCH, str(tmp_path / "analysis"), "kill"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    dead_scratch = Path(killed.stdout.strip())
    assert dead_scratch.is_dir() and dead_scratch.name.startswith(atomic.TMP_PREFIX + "analysis~scratch-")
    running = subprocess.Popen([sys.executable, "-c", KILLED_SCRATCH, str(tmp_path / "analysis2"), "wait"], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        live_scratch = Path(running.stdout.readline().strip())
        monkeypatch.setattr(atomic, "STALE_AFTER_S", -1.0)
        small_fisher(1).save_pretrained(tmp_path / "other")
        assert not dead_scratch.exists() and live_scratch.is_dir()
        running.stdin.write("\n")
        running.stdin.flush()
        assert running.wait(timeout=60) == 0
    finally:
        if running.poll() is None:
            running.kill()
    assert not live_scratch.exists() and hidden(tmp_path) == []


# =========================================================================== output folder == an input


@pytest.mark.slow
def test_cli_prune_refuses_the_models_own_folder_before_loading(ws, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{this is not json", encoding="utf-8")  # loading it fails
    (model / "tokenizer.json").write_text("{}", encoding="utf-8")
    before = tree(tmp_path)
    for out in (model, model / "pruned"):
        proc = run_cli("prune", "--model", str(model), "--sparsity", "0.2", "--score", "magnitude",
                       "--structured", "none", "--out", str(out), "--overwrite", cwd=tmp_path)
        assert_refused(proc, "prune", rf"--out {re.escape(str(out))}.* the input --model {re.escape(str(model))}")
        assert tree(tmp_path) == before


def test_cli_merge_refuses_an_input_as_out(ws, tmp_path):
    previous = tmp_path / "merged"  # a previous merge output, used as an input and as --out
    previous.mkdir()
    for f in (ws / "m0").iterdir():
        (previous / f.name).write_bytes(f.read_bytes())
    (previous / "merge_recipe.yaml").write_text("merge_method: average\n", encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "average", "models": [
        {"model": str(previous)}, {"model": str(ws / "m1")}]}), encoding="utf-8")
    before = tree(tmp_path)
    proc = run_cli("merge", str(recipe), "--out", str(previous), cwd=tmp_path)
    assert_refused(proc, "merge", rf"--out {re.escape(str(previous))}: it is the input model 0")
    assert tree(tmp_path) == before


def test_api_merge_and_prune_refuse_their_inputs(ws, tmp_path):
    import transformers as tf

    from hf_fisher.consumers.merge.api import merge_with_fisher
    from hf_fisher.consumers.prune.core import prune

    for out, how in ((ws / "m0", "is"), (ws / "m0" / "sub", "is inside"), (ws, "contains")):
        with pytest.raises(ArtifactError, match=rf"output_dir {re.escape(str(out))}: it {how} the input model 0"):
            merge_with_fisher([ws / "m0", ws / "m1"], method="average", output_dir=out, progress=False)
    with pytest.raises(ArtifactError, match=r"it is the input Fisher 1"):
        merge_with_fisher([ws / "m0", ws / "m1"], [ws / "f0", ws / "f1"], output_dir=ws / "f1", progress=False)
    before = tree(ws)
    model = tf.AutoModelForCausalLM.from_pretrained(ws / "m0")
    result = prune(model, None, sparsity=0.2, structured=None, score="magnitude", progress=False)
    with pytest.raises(ArtifactError, match=rf"{re.escape(str(ws / 'm0'))}: it is the input model"):
        result.save_pretrained(ws / "m0", overwrite=True)
    assert tree(ws) == before
    assert result.save_pretrained(tmp_path / "pruned").is_dir()  # elsewhere it saves


# =========================================================================== plugins


@pytest.fixture
def fresh_plugins(monkeypatch):
    monkeypatch.delenv("HF_FISHER_PLUGINS", raising=False)
    monkeypatch.delenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    plugins.reset()
    yield
    plugins.reset()


def make_dist(where: Path, dist: str, entry_points: dict[str, str]) -> None:
    """A real installed distribution in ``where``: ``<dist>-1.0.dist-info`` (METADATA,
    entry_points.txt) + its plugin modules; ``where`` must be on sys.path / PYTHONPATH."""
    where.mkdir(parents=True, exist_ok=True)
    info = where / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = ["[hf_fisher]"]
    for ep, src in entry_points.items():
        mod = f"hf_fisher_io_{ep}_{uuid.uuid4().hex[:8]}"
        (where / f"{mod}.py").write_text(textwrap.dedent(src))
        lines.append(f"{ep} = {mod}")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    importlib.invalidate_caches()


def plugin_src(estimators: tuple[str, ...] = (), consumers: tuple[str, ...] = ()) -> str:
    return textwrap.dedent(
        f"""
        from hf_fisher.hookspecs import hookimpl

        class Impostor:
            pass

        @hookimpl
        def hf_fisher_register_estimators(register):
            for name in {estimators!r}:
                register(name, Impostor)

        @hookimpl
        def hf_fisher_register_consumers(register):
            for name in {consumers!r}:
                register(name, Impostor)
        """
    )


def test_plugin_reregistering_a_builtin_is_skipped_and_reported(tmp_path, monkeypatch, fresh_plugins, caplog):
    from hf_fisher.estimators.empirical import EmpiricalEstimator

    make_dist(tmp_path / "site", "impostor-dist", {"impostor": plugin_src(estimators=("empirical",), consumers=("extra",))})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with caplog.at_level(logging.WARNING, logger="hf_fisher.plugins"):
        est = plugins.estimators()
    assert est["empirical"] is EmpiricalEstimator  # the built-in wins
    assert "extra" not in plugins.consumers()  # the whole plugin is skipped, not only the clash
    assert "impostor" not in {p["name"] for p in plugins.list_plugins()}
    (failed,) = [f for f in plugins.failed_plugins() if f["name"] == "impostor"]
    assert failed["distribution"] == "impostor-dist" and failed["stage"] == "conflict"
    assert "estimator 'empirical'" in failed["error"] and "a built-in always wins" in failed["error"]
    assert "hf_fisher.estimators.empirical" in failed["error"]
    (record,) = [r for r in caplog.records if "impostor" in r.getMessage()]
    assert record.levelno == logging.WARNING and "skipped" in record.getMessage()


def test_between_two_plugins_the_first_loaded_wins(tmp_path, monkeypatch, fresh_plugins):
    make_dist(tmp_path / "first", "first-dist", {"first": plugin_src(estimators=("shared", "only_first"))})
    make_dist(tmp_path / "second", "second-dist", {"second": plugin_src(estimators=("shared", "only_second"))})
    monkeypatch.syspath_prepend(str(tmp_path / "second"))
    monkeypatch.syspath_prepend(str(tmp_path / "first"))  # first on sys.path: its entry points come first
    est = plugins.estimators()
    assert "only_first" in est and "shared" in est and "only_second" not in est
    assert {d["name"]: d["plugin"] for d in plugins.describe() if d["kind"] == "estimator"}["shared"] == "first"
    (failed,) = [f for f in plugins.failed_plugins() if f["name"] == "second"]
    assert "estimator 'shared'" in failed["error"] and "'first'" in failed["error"] and "loaded first wins" in failed["error"]


@pytest.mark.slow
def test_hf_fisher_plugins_lists_the_skipped_plugin_and_commands_work(tmp_path):
    site = tmp_path / "site"
    make_dist(site, "impostor-dist", {"impostor": plugin_src(estimators=("empirical",))})
    small_fisher(1).save_pretrained(tmp_path / "art")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    proc = run_cli("plugins", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    skipped = proc.stdout[proc.stdout.index("Failed plugins (skipped)"):]
    assert "impostor" in skipped and "impostor-dist" in skipped and "conflict" in skipped
    assert "estimator 'empirical'" in skipped
    assert re.search(r"estimator\s+empirical\s+hf_fisher\.estimators\.empirical\s", proc.stdout), proc.stdout
    assert "impostor" in proc.stderr and "WARNING" in proc.stderr.upper()
    proc = run_cli("show", str(tmp_path / "art"), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("value, loaded", [("1", False), ("TRUE", False), ("Yes", False), ("on", False),
                                           ("0", True), ("False", True), ("NO", True), ("off", True), ("", True)])
def test_autoload_switch_spellings(tmp_path, monkeypatch, fresh_plugins, value, loaded):
    make_dist(tmp_path / "site", "switch-dist", {"switch": plugin_src(estimators=("switched",))})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", value)
    assert ("switched" in plugins.estimators()) is loaded


def test_autoload_switch_refuses_other_values(tmp_path, monkeypatch, fresh_plugins):
    monkeypatch.setenv("HF_FISHER_DISABLE_PLUGIN_AUTOLOAD", "maybe")
    with pytest.raises(InvalidInputError, match=r"HF_FISHER_DISABLE_PLUGIN_AUTOLOAD='maybe' is not a boolean"):
        plugins.estimators()
    proc = run_cli("plugins", cwd=tmp_path, env={"HF_FISHER_DISABLE_PLUGIN_AUTOLOAD": "maybe"})
    assert_refused(proc, "plugins", r"HF_FISHER_DISABLE_PLUGIN_AUTOLOAD='maybe' is not a boolean.*1, true, yes or on")


# =========================================================================== push_to_hub before the work


def test_merge_push_without_token_or_offline_is_refused_before_any_work(ws, tmp_path, hub_server):
    from hf_fisher.consumers.merge.api import merge_with_fisher

    before = len(hub_server.requests)
    # the inputs do not exist: had the push check come after reading them, the error would be about them
    models = [tmp_path / "nowhere-0", tmp_path / "nowhere-1"]
    with pytest.raises(InvalidInputError, match=r"push_to_hub 'user/merged': cannot push without a Hugging Face token.*hf auth login"):
        merge_with_fisher(models, method="average", output_dir=tmp_path / "out", push_to_hub="user/merged", progress=False)
    hub_server.set_offline(True)
    with pytest.raises(InvalidInputError, match=r"push_to_hub 'user/merged': cannot push, offline mode is on \(HF_HUB_OFFLINE=1"):
        merge_with_fisher(models, method="average", output_dir=tmp_path / "out", push_to_hub="user/merged",
                          token=hub_server.token, progress=False)
    assert not (tmp_path / "out").exists() and len(hub_server.requests) == before


def test_fisher_push_without_token_is_refused_before_saving(tmp_path, hub_server):
    from hf_fisher.artifacts import hub

    before = len(hub_server.requests)
    with pytest.raises(InvalidInputError, match=r"without a Hugging Face token"):
        small_fisher(1).push_to_hub("user/fisher")
    with pytest.raises(InvalidInputError, match=r"token=False was passed"):
        hub.check_push_ready("user/fisher", token=False)
    assert len(hub_server.requests) == before
    assert hub.check_push_ready("user/fisher", token=hub_server.token, path_in_repo="fisher") == "fisher"
    hub_server._monkeypatch.setenv("HF_TOKEN", hub_server.token)  # huggingface_hub's get_token() finds it
    assert hub.check_push_ready("user/fisher") is None


def test_cli_merge_push_offline_or_without_token(ws, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "average", "models": [
        {"model": str(ws / "broken")}, {"model": str(ws / "broken")}]}), encoding="utf-8")
    out = tmp_path / "out"
    before = tree(tmp_path)
    proc = run_cli("merge", str(recipe), "--out", str(out), "--push-to-hub", "user/merged", cwd=tmp_path)
    assert_refused(proc, "merge", r"--push-to-hub 'user/merged': cannot push, offline mode is on .*HF_HUB_OFFLINE=1")
    home = tmp_path / "hf-home"
    proc = run_cli("merge", str(recipe), "--out", str(out), "--push-to-hub", "user/merged", cwd=tmp_path,
                   env={"HF_HOME": str(home), "HF_TOKEN_PATH": str(home / "token")},
                   drop=("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"))
    assert_refused(proc, "merge", r"--push-to-hub 'user/merged': cannot push without a Hugging Face token.*hf auth login")
    proc = run_cli("merge", str(recipe), "--out", str(out), "--push-to-hub", "not a repo", cwd=tmp_path)
    assert_refused(proc, "merge", r"not a valid Hub repository id")
    assert tree(tmp_path) == before
