"""``hf-fisher collect --no-variance``: the mean-only artifact from the command line (the same
mean, bit for bit, no variance), refused before the model for an estimator that does not take it."""

from __future__ import annotations

import pytest
import torch
from test_cli_bad_input import assert_clean_error, collect_args, run_cli, ws  # noqa: F401 (ws: the fixture)

from hf_fisher import Fisher

pytestmark = pytest.mark.usefixtures("one_thread")


def test_no_variance_writes_the_mean_without_variance(ws, tmp_path, capsys):  # noqa: F811
    outs = {}
    for flag in ((), ("--no-variance",)):
        out = tmp_path / f"out{len(flag)}"
        res = run_cli(collect_args(ws / "llama", ws / "lines.txt", out, "--reduction", "param", "--batch-size", "2", *flag),
                      cwd=tmp_path, capsys=capsys)
        assert res.returncode == 0, res.stderr
        outs[flag] = Fisher.from_pretrained(out)
    a, s = outs.values()
    assert a.has_variance and not s.has_variance and s.metadata.extra["variance"] is False
    assert a.counts.samples == s.counts.samples == 3
    for name in a.names():
        assert torch.equal(a[name], s[name]), name


def test_no_variance_refused_for_kfac_before_the_model(ws, tmp_path, capsys):  # noqa: F811
    """The model folder's config is not JSON: the refusal comes before it is read; nothing written."""
    args = collect_args(ws / "broken-config", ws / "lines.txt", tmp_path / "out", "--estimator", "kfac", "--no-variance")
    res = run_cli(args, cwd=tmp_path, capsys=capsys)
    assert_clean_error(res, r"--no-variance applies to the estimators that accumulate per-sample moments "
                            r"\(empirical, true\), not to --estimator kfac")
    assert list(tmp_path.iterdir()) == []


def test_disk_estimate_counts_the_mean_only_with_no_variance():
    """``hf-fisher collect``'s free-space check needs half the bytes for a mean-only param artifact."""
    import argparse

    from hf_fisher.cli.common import disk_need

    shapes = [(1000, 100), (100,)]
    both, detail = disk_need(shapes, argparse.Namespace(storage_dtype="float32", reduction="param", no_variance=False))
    mean, detail_mean = disk_need(shapes, argparse.Namespace(storage_dtype="float32", reduction="param", no_variance=True))
    assert both == 100_100 * 4 * 2 + 2**20 and mean == 100_100 * 4 + 2**20
    assert "mean and variance" in detail and "--no-variance" in detail_mean
