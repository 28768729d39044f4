"""Seconds to build an ImageNet zero-shot classifier (class names x 80 prompt templates).

    PYTHONPATH=. python scripts/bench_zero_shot.py [--model ViT-B-32] [--classes 1000] [--device cuda]
        [--precision bf16] [--clip-benchmark]

Builds the classifier of the first --classes ImageNet classes with OpenAI's 80 templates on a
randomly initialised model (the text tower's cost does not depend on its weights) three ways:
- ours: `clip.zero_shot.build_zero_shot_classifier`, which hands our CLIP about 1,000 prompts per
  call, packed (the padding after each prompt is not computed: clip.models.text_packing);
- ours padded: the same calls with the padded [N, 77] token rows (the model wrapped so that it
  cannot see that it is our CLIP);
- with --clip-benchmark, CLIP_benchmark's `zero_shot_classifier` on the same model: one padded call
  per class of 80 prompts (as OpenCLIP's training code does too). Needs clip-benchmark (a test extra).
Each is timed once after a warm-up call on 2 classes; all three must agree (cosine > 0.999 per class).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from clip.config import PRECISIONS
from clip.data.eval_assets import get_classnames, get_templates
from clip.models import CLIP, get_model_config
from clip.precision import autocast_dtype
from clip.tokenizer import tokenize
from clip.zero_shot import build_zero_shot_classifier


class PaddedTextTower(nn.Module):
    """Our CLIP behind a wrapper: the evaluation cannot tell it is ours, so it passes padded rows."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model, self.config = model, model.config

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(text, normalize)


def timed(build, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    weights = build()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--classes", type=int, default=1000, help="the first N ImageNet classes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast dtype")
    parser.add_argument("--clip-benchmark", action="store_true", help="also time CLIP_benchmark's classifier")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model = CLIP(get_model_config(args.model)).to(device).eval()
    classnames, templates = get_classnames("imagenet1k")[: args.classes], get_templates("imagenet1k")
    dtype = autocast_dtype(args.precision)

    def ours(model: nn.Module, names: list[str]) -> torch.Tensor:
        return build_zero_shot_classifier(model, tokenize, names, templates, device=device, autocast_dtype=dtype)

    def clip_benchmark(model: nn.Module, names: list[str]) -> torch.Tensor:
        from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

        amp, their_templates = dtype is not None, [template.replace("{}", "{c}") for template in templates]
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            return zero_shot_classifier(model, tokenize, names, their_templates, device.type, amp=amp).float()

    runs = {"ours (packed)": (ours, model), "ours padded": (ours, PaddedTextTower(model))}
    if args.clip_benchmark:
        runs["CLIP_benchmark (a call per class)"] = (clip_benchmark, model)
    size = f"{len(classnames)} classes x {len(templates)} templates"
    print(f"{args.model} text tower, {size}, {args.precision}, {device}")
    results = {}
    for label, (build, subject) in runs.items():
        build(subject, classnames[:2])  # warm-up (allocator, kernels)
        results[label] = timed(lambda: build(subject, classnames), device)
    reference = results["ours padded"][1]
    for label, (seconds, weights) in results.items():
        agreement = torch.nn.functional.cosine_similarity(weights, reference, dim=0).min().item()
        if agreement < 0.999:
            raise SystemExit(f"{label}: classifier disagrees with the padded one (min cosine {agreement:.6f})")
        print(f"{label:36s} {seconds:8.2f} s  ({len(classnames) / seconds:8.1f} classes/s)")
    packed, padded = results["ours (packed)"][0], results["ours padded"][0]
    print(f"packed / padded: {packed / padded:.3f}")


if __name__ == "__main__":
    main()
