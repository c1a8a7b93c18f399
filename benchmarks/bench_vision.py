"""Fisher of image and audio classifiers: the batched conv rule against the generic one and a
training step, measured in one run (interleaved rounds, medians).

    python benchmarks/bench_vision.py            # ViT (hidden 192, 4 layers, 64x64 images, patch 8),
                                                 # ConvNeXt (2 stages) and wav2vec2 (1 s of 16 kHz audio), B=16
    python benchmarks/bench_vision.py --quick    # tiny models, seconds

For each model, on one batch (after one warm-up round, so the first-batch checks are excluded):

(a) ``plain``: a batched forward + backward of the model's loss -- the baseline;
(b) ``param``: ``FisherCollector(model, reduction="param").update(batch)`` with the built-in
    rules (``nn.Conv1d`` / ``nn.Conv2d`` on the batched im2col rule);
(c) ``param_generic_conv``: the same with the convolutions on the generic ``torch.func`` rule
    (what they got before the conv rule);
(d) ``group``: ``reduction="group"``;
(e) ``loop``: one forward + backward per sample, gradients squared and summed.

Prints wall-clock medians and their ratios to (a), and (c)/(b).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import interleaved, machine_info, machine_line, summary


def models(quick: bool):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if quick:
        vit = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4, num_labels=10)
        cnx = tf.ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
        w2v = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
                   conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
        image, samples, B = 16, 1600, 4
    else:
        vit = tf.ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768, image_size=64, patch_size=8, num_labels=10)
        cnx = tf.ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[48, 96], depths=[2, 2], num_labels=10)
        w2v = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768, conv_dim=(128,) * 4,
                   conv_stride=(5, 2, 2, 2), conv_kernel=(10, 3, 3, 2), num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=8)
        image, samples, B = 64, 16000, 16
    w2v = tf.Wav2Vec2Config(**w2v, feat_extract_norm="layer", do_stable_layer_norm=True, mask_time_prob=0.0, num_labels=10)
    g = torch.Generator().manual_seed(0)
    pixels = {"pixel_values": torch.randn(B, 3, image, image, generator=g), "labels": torch.randint(0, 10, (B,), generator=g)}
    audio = {"input_values": torch.randn(B, samples, generator=g), "attention_mask": torch.ones(B, samples, dtype=torch.long),
             "labels": torch.randint(0, 10, (B,), generator=g)}
    audio["attention_mask"][B // 2 :, samples * 3 // 4 :] = 0
    return {
        "vit": (tf.ViTForImageClassification(vit).eval(), pixels),
        "convnext": (tf.ConvNextForImageClassification(cnx).eval(), pixels),
        "wav2vec2": (tf.Wav2Vec2ForSequenceClassification(w2v).eval(), audio),
    }


def runs(model, batch):
    import torch
    import torch.nn as nn

    from hf_fisher import plugins
    from hf_fisher.collection.collector import FisherCollector

    params = [p for p in model.parameters() if p.requires_grad]

    def plain(_):
        torch.autograd.grad(model(**batch).loss, params, allow_unused=True)

    def collector(reduction, generic_conv=False):
        c = FisherCollector(model, reduction=reduction)
        if generic_conv:
            c.engine.rules = {k: v for k, v in plugins.grad_rules().items() if k not in (nn.Conv1d, nn.Conv2d)}
        c.update(batch)  # the first batch's checks, outside the timing
        return lambda _: c.update(batch)

    def loop(_):
        acc = [torch.zeros_like(p) for p in params]
        B = batch["labels"].shape[0]
        for i in range(B):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            if "attention_mask" in one:
                n = int(one["attention_mask"].sum())
                one = {"input_values": one["input_values"][:, :n], "labels": one["labels"]}
            for a, gr in zip(acc, torch.autograd.grad(model(**one).loss, params, allow_unused=True)):
                if gr is not None:
                    a.add_(gr * gr)

    return {"plain": plain, "param": collector("param"), "param_generic_conv": collector("param", True),
            "group": collector("group"), "loop": loop}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    torch.manual_seed(0)
    info = machine_info()
    print(machine_line(info))
    results = {}
    for name, (model, batch) in models(args.quick).items():
        times = interleaved(runs(model, batch), args.repeats)
        base = times["plain"]["wall"]
        row = {k: summary(v["wall"], base) | ({"error": v["error"]} if "error" in v else {}) for k, v in times.items()}
        if row["param"] and row["param_generic_conv"]:
            row["generic_over_conv_rule"] = row["param_generic_conv"]["median"] / row["param"]["median"]
        results[name] = row
        print(f"{name}: " + ", ".join(f"{k} {v['median']:.3f}s ({v['ratio']:.2f}x)" for k, v in row.items() if isinstance(v, dict) and v.get("median")))
        if "generic_over_conv_rule" in row:
            print(f"  generic conv rule / batched conv rule: {row['generic_over_conv_rule']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
