"""CUDA-only checks: skipped where no GPU is visible (CI has none).

Run them on a GPU machine with `pytest tests/test_cuda.py`. The fp16 load and the flash-attention
check were first run as scripts on an H100 (docs/benchmarks.md, docs/api.md); this file is their
permanent form. Not yet run on a GPU: the sync count of 0 (it was 1 before the step's verdict moved
onto the device), the trainer run with a skipped step, bench_train.py's --profile, text packing
and finishing uint8 batches on the GPU.
"""

from __future__ import annotations

import pytest
import torch

import clip
from clip.models.hub_export import export_model
from tests.test_bench_train import bench  # noqa: F401  (the fixture that loads scripts/bench_train.py)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "RN50-quickgelu"])
def test_load_on_cuda_is_fp16_and_matches_the_fp32_cpu_model(name, tmp_path):
    """clip.load on a GPU applies OpenAI's fp16 rule; the embeddings stay those of the fp32 model."""
    torch.manual_seed(0)
    reference = clip.create_model(name).eval()
    path = export_model(reference, tmp_path / "model.safetensors")
    model, _ = clip.load(str(path), device="cuda")
    assert model.visual.conv1.weight.dtype == torch.float16  # OpenAI's rule: convolutions in fp16 ...
    assert model.ln_final.weight.dtype == torch.float32  # ... LayerNorm in fp32
    size = reference.config.vision.image_size
    images = torch.randn(4, 3, size, size)
    text = clip.tokenize(["a photo of a cat", "a dog", "x", "a diagram of a bridge"])
    with torch.no_grad():
        want = reference.encode_image(images, normalize=True), reference.encode_text(text, normalize=True)
        got = model.encode_image(images.cuda().half(), normalize=True), model.encode_text(text.cuda(), normalize=True)
    for got_features, want_features in zip(got, want):
        cosine = torch.nn.functional.cosine_similarity(got_features.float().cpu(), want_features, dim=-1)
        assert cosine.min().item() > 0.999


def test_training_step_never_waits_for_the_device_and_attention_is_flash_eligible(bench, capsys):  # noqa: F811
    """Our bf16 step has no synchronising call (the skip decision stays on the device; the host reads
    the previous step's numbers), and every attention call can run on the flash kernel."""
    (ours,) = bench.main(["--model", "tiny-vit", "--batch", "16", "--steps", "2", "--warmup", "2", "--device", "cuda"])
    assert ours.syncs_per_step == 0
    assert "flash attention: usable by every attention call" in capsys.readouterr().out


def test_profile_counts_the_kernels_of_the_step(bench, tmp_path):  # noqa: F811
    """--profile on CUDA adds up kernel time (not the CPU ops that launched it, which carry it too),
    and every kernel of the bf16 step falls into a named category."""
    (ours,) = bench.main(["--model", "tiny-vit", "--batch", "16", "--steps", "1", "--warmup", "2", "--device", "cuda",
                          "--profile", "--profile-trace", str(tmp_path / "trace.json")])  # fmt: skip
    profile = ours.profile
    assert profile.device and 0 < profile.busy <= profile.total * (1 + 1e-9)  # a union of intervals <= their sum
    assert profile.busy <= 1.05 * profile.wall  # the kernels ran inside the synchronised window
    for category in ("matrix products", "attention", "optimizer (AdamW)"):
        assert profile.categories[category] > 0, category
    assert profile.share("anything else") < 0.1, profile.top


def test_the_trainer_skips_a_non_finite_step_on_cuda_without_waiting_for_it(tmp_path, monkeypatch):
    """The whole loop on CUDA: the device-side skip, the pinned copy read one step late, the count."""
    from clip.train import train
    from tests.train_fixtures import read_metrics, tiny_train_config, use_memory_data

    use_memory_data(monkeypatch)
    result = train(tiny_train_config(tmp_path, "device=cuda", "precision=bf16", "compile=false", "deterministic=false",
                                     "fault.nan_at_steps=[3]", "max_steps=6", "checkpoint.every_steps=0",
                                     "log.every_steps=6"))  # fmt: skip
    assert result.step == 6
    assert read_metrics(tmp_path)[-1]["train/nonfinite_steps"] == 1


def test_text_packing_on_cuda_matches_padding_under_bf16_and_compiles_once():
    """Packed captions give the padded tower's features on the GPU's kernels (flash attention per
    group, bf16), and inductor compiles one graph for batches of different lengths."""
    from torch._dynamo.utils import counters

    from clip.models.text_packing import pack_text
    from tests.test_text_packing import EOT, _texts

    torch.manual_seed(0)
    model = clip.create_model("ViT-B-32").cuda().eval()
    torch._dynamo.reset()
    counters.clear()
    encode = torch.compile(model.encode_text)
    for seed in range(3):
        texts = _texts([(7 * i + 5 * seed) % 77 + 1 for i in range(64)], seed=seed)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            padded = model.encode_text(texts.cuda(), normalize=True)
            packed = encode(pack_text(texts, EOT, 8).pin_memory().to("cuda", non_blocking=True), normalize=True)
        assert torch.nn.functional.cosine_similarity(packed.float(), padded.float(), dim=-1).min().item() > 0.999
    assert counters["stats"]["unique_graphs"] == 1


def test_uint8_batches_finish_on_the_gpu_bitwise_as_on_the_cpu_without_waiting():
    """The loader ships uint8 pixels; finishing them on the GPU (float conversion + Normalize) gives
    the CPU's bits and never synchronises (no tensor is made from the statistics per batch)."""
    from clip.data.stream import ImageBatcher
    from clip.transforms import image_transform_eval, image_transform_train

    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for transform in (image_transform_train(32), image_transform_eval(32)):
        batcher = ImageBatcher(transform)
        on_gpu = pixels.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            finished = batcher.finish(on_gpu)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(finished.cpu(), batcher.finish(pixels))
