"""``hf-fisher collect --no-atomic-batches``: the streaming commit from the command line (the same
artifact, bit for bit), refused before the model for an estimator that does not take it."""

from __future__ import annotations

import pytest
import torch
from test_cli_bad_input import assert_clean_error, collect_args, run_cli, ws  # noqa: F401 (ws: the fixture)

from hf_fisher import Fisher
from hf_fisher.collection.collector import FisherCollector

pytestmark = pytest.mark.usefixtures("one_thread")


def test_no_atomic_batches_writes_the_same_artifact(ws, tmp_path, capsys, monkeypatch):  # noqa: F811
    built = []
    init = FisherCollector.__init__

    def spy(self, model, **kw):
        init(self, model, **kw)
        built.append(self.atomic_batches)

    monkeypatch.setattr(FisherCollector, "__init__", spy)
    outs = {}
    for flag in ((), ("--no-atomic-batches",)):
        out = tmp_path / f"out{len(flag)}"
        res = run_cli(collect_args(ws / "llama", ws / "lines.txt", out, "--reduction", "param", "--batch-size", "2", *flag),
                      cwd=tmp_path, capsys=capsys)
        assert res.returncode == 0, res.stderr
        outs[flag] = Fisher.from_pretrained(out)
    assert built == [True, False]
    a, s = outs.values()
    assert a.counts.samples == s.counts.samples == 3
    for name in a.names():
        assert torch.equal(a[name], s[name]) and torch.equal(a.variances[name], s.variances[name]), name


def test_no_atomic_batches_refused_for_kfac_before_the_model(ws, tmp_path, capsys):  # noqa: F811
    """The model folder's config is not JSON: the refusal comes before it is read; nothing written."""
    args = collect_args(ws / "broken-config", ws / "lines.txt", tmp_path / "out", "--estimator", "kfac", "--no-atomic-batches")
    res = run_cli(args, cwd=tmp_path, capsys=capsys)
    assert_clean_error(res, r"--no-atomic-batches applies to the estimators that accumulate per-sample moments "
                            r"\(empirical, true\), not to --estimator kfac")
    assert list(tmp_path.iterdir()) == []
