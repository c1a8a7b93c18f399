"""hf_fisher.testing, the public brute force, on the task types of issue 25: seq2seq (token ids
and Whisper's features, padded sources and targets, a sample without labels), image and audio
classification (padded clips, a clip labelled -100). Each against ``hf_fisher.collect`` in float64."""

from __future__ import annotations

import pytest
import seq2seq_models as S
import vision_models as V

import hf_fisher
from hf_fisher.testing import assert_fisher_close, per_sample_fisher, split_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _check(model, batches, task_type, skipped=0):
    ref = per_sample_fisher(model, batches, task_type=task_type)
    fisher = hf_fisher.collect(model, batches, reduction="param", progress=False)
    assert fisher.metadata.extra["task_type"] == task_type
    assert ref.skipped == skipped == fisher.counts.skipped
    assert_fisher_close(fisher, ref)


@pytest.mark.parametrize("build", [S.t5, S.bart, S.whisper], ids=["t5", "bart", "whisper"])
def test_seq2seq_reference_matches_collect(build):
    model = build()
    batches = [S.batch(model, [5, 3, 6], [4, 2, 5], seed=1), S.batch(model, [4, 6], [3, 0], seed=2)]
    _check(model, batches, "seq2seq", skipped=1)
    one = split_batch(batches[0], "seq2seq")[1]
    assert one["labels"].shape == (1, 2)  # the target cut after its last label
    if "input_ids" in one:
        assert one["input_ids"].shape == (1, 3)  # the source cut by its mask


def test_image_and_audio_reference_match_collect():
    b = V.image_batch(3, seed=1)
    b["labels"][1] = -100  # a sample without a label: skipped by both
    _check(V.vit(), [b, V.image_batch(2, seed=2)], "image_classification", skipped=1)
    _check(V.wav2vec2(), [V.audio_batch([400, 320, 360], seed=3)], "audio_classification")
