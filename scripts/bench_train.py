"""Benchmark one training step: step time, samples/s, MFU and peak memory, ours against OpenCLIP's.

    PYTHONPATH=. python scripts/bench_train.py --model ViT-B-32 --batch 32 --precision fp32 --open-clip
    PYTHONPATH=. python scripts/bench_train.py --model ViT-B-16 --batch 256 --compile --open-clip   # on a GPU
    PYTHONPATH=. python scripts/bench_train.py --model ViT-B-32 --batch 64 --shards '/data/{00000..00007}.tar'

**Our step** is the trainer's own object, `clip.step.TrainStep`, on the module
`clip.parallelize.build_train_module` builds (channels_last for ResNets, activation checkpointing,
torch.compile): the batch prepared (text packed on the host), forward, fp32 loss, backward, gradient
norm clipped to 1.0, the all-gather and finiteness verdict on the device, fused AdamW skipped on the
device by that verdict, the temperature clamp; then, as the trainer does, the host's read of the
previous step's numbers (`clip.step.StepLedger`: no step waits for its own).

**OpenCLIP's step** (`--open-clip`; open_clip_torch is a test-only reference) is `open_clip_train`'s
with its best flags: a model built from the same config (`tests/references.py`) holding our initial
weights; autocast as `--precision amp_bf16` (its loss runs inside autocast, as in its train loop);
`--torchcompile` (torch.compile of the whole model) when `--compile`; `ClipLoss(local_loss=True,
gather_with_grad=True)` (on one process the same math as ours); AdamW with its parameter groups
and our hyperparameters; `--grad-clip-norm 1.0`; the logit_scale clamp. The first step's losses
of the two are printed: equal (fp32) or close (autocast) when the comparison is apples to apples.

**Text packing.** Our step packs its captions as the trainer does (`--text-packing-groups`, default
the trainer's 8; 0 pads them as OpenCLIP does), so the caption lengths matter: `--caption-lengths`
uniform (default) or web (alt-text-like; `synthetic_batch`). MFU counts the padded FLOPs for both;
the script prints the share of them our packed step executes (MFU x that share: the hardware's MFU).

**Timing.** A synthetic batch (random images, token rows with the end-of-text token at random
positions); each implementation runs `--warmup` steps (compilation, optimizer state),
then timed runs alternate (ours, OpenCLIP, ours, ...) so both see the same machine load. A timed run
is `--chain` consecutive steps from an idle device to an idle device, the host queueing each step
while the device computes the previous one as in training (`--chain 1` times single steps, which
charges a step for any wait of the host on the device); figures are per-step medians over `--steps`
runs; the torch thread
count is fixed (`--threads`). MFU = samples/s x training FLOPs per sample (`clip.flops`: forward
x 3, logits included) / the device's peak (`clip.flops.get_peak_flops`), on known GPUs only.
Peak memory (CUDA) is the high-water mark of allocated memory during one step above what was
allocated before the implementation was built (its weights, gradients, AdamW state, activations).
On CPU memory is not reported (use scripts/measure_memory.py). On CUDA the script also counts the
synchronising calls in one step (`torch.cuda.set_sync_debug_mode`; it does not see our wait on
the previous step's copy event, which the device has passed by then) and checks that every
attention call can run on the flash kernel.

**Real shards** (`--shards PATTERN`, ours only): batches from `clip.data.build_train_loader`
(resampled, `--workers` processes, the real tokenizer and training transform), in the trainer's
order: the step is queued, the next batch is fetched while the device works, then the previous
step's numbers are read. The data-wait share is the time spent blocked fetching over the wall time
of the timed runs.

**Profile** (`--profile`, ours, synthetic batch): after the timed runs, `torch.profiler` records
`--chain` more steps of ours (CPU activity, plus CUDA activity on a GPU) and the script prints where
a step's time goes: per category (`PROFILE_CATEGORIES`: matrix products, attention, torch.compile's
fused kernels, other elementwise/copies/reductions, optimizer, communication, anything else) and for
the 10 costliest kernels or operators. On CUDA it counts the kernels' device time and compares the
device-busy time (the union of the kernels' intervals) with the wall time of the same steps: the idle
rest is time the device waited for the host. On CPU it counts the operators' self time (each
operator's time less its children's, so nothing counts twice; inductor's C++ kernels run inside
its `## Call CompiledFxGraph ##` events). Profiling slows the host a little; time the step without
it. `--profile-trace PATH` also writes the Chrome trace (open it in https://ui.perfetto.dev).

    PYTHONPATH=. python scripts/bench_train.py --model ViT-B-16 --batch 512 --precision bf16 --compile --profile
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from clip.config import LossConfig, NanConfig, OptimConfig, TrainConfig, TrainModelConfig, to_model_config
from clip.flops import get_mfu, get_peak_flops, skipped_text_flops, training_flops_per_sample
from clip.loss import build_loss
from clip.models import CLIP, get_model_config
from clip.models.hub_export import open_clip_model_config
from clip.models.text_packing import pack_text
from clip.optim import build_optimizer
from clip.parallelize import build_train_module
from clip.precision import build_grad_scaler, get_autocast
from clip.step import Progress, StepLedger, TrainStep

MIB = 2**20


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The trainer's config for this setting (defaults elsewhere: AdamW, clip loss, gradient clip 1.0)."""
    architecture = get_model_config(args.model)
    fields = {name: getattr(architecture, name) for name in architecture.__dataclass_fields__}
    return TrainConfig(
        output_dir="unused",
        global_batch_size=args.batch,
        max_steps=1,
        precision=args.precision,
        compile=args.compile,
        grad_checkpointing=args.grad_checkpointing,
        text_packing_groups=args.text_packing_groups,
        model=TrainModelConfig(name=args.model, **fields),
        optim=OptimConfig(),
        loss=LossConfig(),
    )


def synthetic_batch(
    cfg: TrainConfig, device: torch.device, caption_lengths: str = "uniform", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, H, W] ~ N(0, 1) and token rows [B, L] of random ids ending at an end-of-text
    token, on the host (pinned for a CUDA device), as the loader yields them.

    Caption lengths (end-of-text included) are uniform over [6, L] (mean 41 at L = 77), or, with
    "web", lognormal with median 17 and sigma 0.69 clipped to [2, L]: the token lengths of
    scripts/bench_tokenizer.py's synthetic web alt-texts (mean 21.4, 90th percentile 41).
    """
    generator = torch.Generator().manual_seed(seed)
    size, text, batch = cfg.model.vision.image_size, cfg.model.text, cfg.global_batch_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    texts = torch.randint(1, text.eot_token_id, (batch, text.context_length), generator=generator)
    if caption_lengths == "web":
        normal = torch.randn(batch, generator=generator)
        ends = (math.log(17) + 0.69 * normal).exp().round().long().clamp(2, text.context_length) - 1
    else:
        ends = torch.randint(min(5, text.context_length - 1), text.context_length, (batch,), generator=generator)
    positions = torch.arange(text.context_length)
    texts[positions > ends[:, None]] = 0
    texts[positions == ends[:, None]] = text.eot_token_id
    if device.type == "cuda":
        images, texts = images.pin_memory(), texts.pin_memory()
    return images, texts


class OurStep:
    """The trainer's training step, `clip.step.TrainStep` (see the module docstring)."""

    name = "ours"

    def __init__(self, cfg: TrainConfig, device: torch.device, finish_images: Callable = lambda images: images):
        torch.manual_seed(cfg.seed)
        self.cfg, self.device = cfg, device
        self.model = CLIP(to_model_config(cfg.model)).to(device)
        self.initial_state = {key: value.detach().clone() for key, value in self.model.state_dict().items()}
        module, self.image_format = build_train_module(cfg, self.model, device)
        self.autocast = get_autocast(cfg.precision, device)
        self.step = TrainStep(
            cfg, model=self.model, module=module, optimizer=build_optimizer(self.model, cfg.optim),
            scaler=build_grad_scaler(cfg.precision, device), autocast=self.autocast, loss_fn=build_loss(cfg.loss),
            num_microbatches=1, image_format=self.image_format, finish_images=finish_images, device=device,
        )  # fmt: skip
        self.progress = Progress()
        # As in the trainer: the previous step's numbers are read during this one (a NaN stops the benchmark).
        self.ledger = StepLedger(NanConfig(max_consecutive=1), self.progress, self.model, lambda: "none")

    def prepare(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Device images in the step's memory format; the token ids stay on the host (see __call__)."""
        return images.to(self.device, memory_format=self.image_format), texts

    def __call__(
        self, images: torch.Tensor, texts: torch.Tensor, while_running: Callable[[], None] = lambda: None
    ) -> torch.Tensor:
        """One step on `images` and host `texts`, prepared as the trainer prepares a batch (the token ids
        packed on the host, `text_packing_groups`, then copied to the device)."""
        self.progress.step += 1
        outcome = self.step(*self.step.prepare(images, texts), step=self.progress.step, lr=self.cfg.optim.lr)
        while_running()  # the trainer fetches the next batch here
        self.ledger.defer(self.progress.step, self.cfg.optim.lr, outcome)
        return outcome.loss


class OpenClipStep:
    """open_clip_train's step with its best flags (see the module docstring)."""

    name = "OpenCLIP"

    def __init__(self, cfg: TrainConfig, device: torch.device, initial_state: dict[str, torch.Tensor]):
        from open_clip.loss import ClipLoss
        from open_clip.model import CLIP as OpenClipModel
        from open_clip_train.precision import get_autocast as openclip_autocast

        self.model = OpenClipModel(**open_clip_model_config(to_model_config(cfg.model)))
        self.model.load_state_dict(initial_state)  # our initial weights: the same network, value for value
        self.device = device
        self.model.to(device).train()
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing()
        # open_clip_train/main.py: no weight decay on gains, biases, BatchNorm and logit_scale.
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = list(self.model.named_parameters())
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": o.weight_decay},
            ],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps,
        )  # fmt: skip
        self.forward = torch.compile(self.model) if cfg.compile else self.model  # --torchcompile
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=1)
        self.autocast = openclip_autocast({"bf16": "amp_bf16", "fp16": "amp", "fp32": "fp32"}[cfg.precision], device.type)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self.grad_clip_norm = o.grad_clip_norm

    def prepare(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images.to(self.device), texts.to(self.device)

    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        # open_clip_train/train.py, train_one_epoch with accum_freq=1.
        self.optimizer.zero_grad()
        with self.autocast():
            image_features, text_features, logit_scale = self.forward(images, texts)
            loss = self.loss_fn(image_features, text_features, logit_scale)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm, norm_type=2.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm, norm_type=2.0)
            self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()


@dataclass
class Measured:
    name: str
    warmup_losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    peak_mib: Optional[float] = None
    syncs_per_step: Optional[int] = None
    data_wait: Optional[float] = None
    profile: Optional[StepProfile] = None  # --profile, ours only

    @property
    def first_loss(self) -> float:
        return self.warmup_losses[0]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, images, texts, device: torch.device, chain: int) -> float:
    """Seconds per step over `chain` consecutive steps, from an idle device to an idle device."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(chain):
        step(images, texts)
    synchronize(device)
    return (time.perf_counter() - start) / chain


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def warm_up(step, images, texts, device: torch.device, num_steps: int, allocated_before: int) -> Measured:
    """`num_steps` untimed steps. Records their losses and, on CUDA, the peak memory of the last one
    above `allocated_before` (what was allocated before `step` was built)."""
    measured = Measured(step.name)
    for index in range(num_steps):
        if device.type == "cuda" and index == num_steps - 1:
            torch.cuda.reset_peak_memory_stats(device)
        measured.warmup_losses.append(float(step(images, texts)))
    if device.type == "cuda":
        measured.peak_mib = (torch.cuda.max_memory_allocated(device) - allocated_before) / MIB
    return measured


def count_syncs(step, images, texts, device: torch.device) -> Optional[int]:
    """Synchronising CUDA calls in one step (torch's sync debug mode warns at each); None on CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(images, texts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Only the per-call warnings: the mode also warns once per process that it is a prototype
    # ("... does not yet detect all synchronizing operations"), which is not a sync.
    return sum(str(w.message).startswith("called a synchronizing CUDA operation") for w in caught)


def check_flash_attention(ours: OurStep, images: torch.Tensor, texts: torch.Tensor) -> str:
    """Whether every attention call of our towers can run on the flash kernel (CUDA, half precision)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if ours.device.type != "cuda" or ours.cfg.precision == "fp32":
        return "not checked (flash attention needs CUDA and bf16/fp16)"
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]), ours.autocast():
            ours.model.encode_image(images[:2].to(ours.device, memory_format=ours.image_format))
            ours.model.encode_text(texts[:2].to(ours.device))
    except RuntimeError as error:
        return f"NOT usable: {str(error).splitlines()[0]}"
    return "usable by every attention call"


# Profile (--profile): where one step's time goes, by kernel or operator category.

# Display order. Patterns are case-sensitive regular expressions searched in a CUDA kernel's name (on a
# GPU) or a CPU event's name (aten:: operators, autograd nodes, record_function ranges); a name takes
# the first category of PROFILE_MATCH_ORDER whose pattern it contains, else "anything else".
PROFILE_CATEGORIES = {
    # cuBLAS (nvjet, sm90_xmma, cutlass gemm), Triton templates (max-autotune), ATen products and convolutions
    "matrix products": r"gemm|gemv|nvjet|cutlass|sm90|cublas|triton_tem|"
                       r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|mv|addmv|dot)$|^aten::\w*convolution",
    # flash / memory-efficient / cuDNN SDPA kernels; aten::_scaled_dot_product_* on CPU
    "attention": r"flash|fmha|sdpa|attention|^aten::_?scaled_dot_product",
    # inductor's Triton kernels (CUDA); its C++ kernels run inside "## Call CompiledFxGraph <hash> ##" (CPU)
    "fused elementwise (torch.compile)": r"^triton_(?!tem)|CompiledFxGraph|cpp_fused",
    "other elementwise, copies, reductions": r"^aten::|at::native|cub::|Memcpy|Memset",
    "optimizer (AdamW)": r"[Aa]dam",  # fused AdamW kernel and op, the Optimizer.step#AdamW.step range
    "communication": r"nccl|gloo|c10d::|all_?gather|all_?reduce|reduce_?scatter",
    # autograd engine and nodes, AOTAutograd/Dynamo wrappers, Python-level ranges, unmatched kernels
    "anything else": r"",
}
# Specific before generic: a compiled Triton kernel may be named after the attention op it feeds,
# cuDNN's attention kernels contain "sm90", memory-efficient attention's contain "cutlass", and
# the fused AdamW op and kernel also match the generic ATen patterns.
PROFILE_MATCH_ORDER = ("communication", "fused elementwise (torch.compile)", "optimizer (AdamW)", "attention",
                       "matrix products", "other elementwise, copies, reductions", "anything else")  # fmt: skip
PROFILE_TOP = 10  # individual kernels or operators listed


def categorise(name: str) -> str:
    """The PROFILE_CATEGORIES category of a profiled kernel or operator, by its name."""
    return next(category for category in PROFILE_MATCH_ORDER if re.search(PROFILE_CATEGORIES[category], name))


@dataclass
class StepProfile:
    """Seconds per step of the profiled steps: by category (every one of PROFILE_CATEGORIES, in its
    order) and for the costliest kernels or operators."""

    device: bool  # True: kernels' device time (CUDA); False: operators' CPU self time
    wall: float  # wall time per step of the profiled steps, idle device to idle device
    categories: dict[str, float]
    top: list[tuple[str, str, float, float]]  # (name, category, seconds per step, calls per step)
    busy: Optional[float] = None  # CUDA: time per step with at least one kernel running

    @property
    def total(self) -> float:
        return sum(self.categories.values())

    def share(self, category: str) -> float:
        return self.categories[category] / self.total


def counted_events(events, device: bool) -> list:
    """The profiler events whose self time the profile adds up: on CUDA the device's kernels, copies
    and memsets (not the CPU ops that launched them, which carry the same device time, nor the device
    copies of record_function ranges); on CPU every synchronous CPU event (self times do not overlap)."""
    from torch.autograd import DeviceType

    if device:
        return [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    return [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]


def busy_seconds(kernels: list) -> float:
    """The length of the union of the kernels' intervals: concurrent streams count once."""
    busy, end = 0.0, -math.inf
    for start, stop in sorted((k.time_range.start, k.time_range.end) for k in kernels):  # microseconds
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return busy / 1e6


def profile_step(step: OurStep, images: torch.Tensor, texts: torch.Tensor, chain: int,
                 trace_path: str = "") -> StepProfile:  # fmt: skip
    """Profiles `chain` consecutive steps (after the caller's warm-up) and adds up their time by category."""
    from torch.profiler import ProfilerActivity, profile

    device = step.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device else [])
    with profile(activities=activities) as prof:
        wall = timed(step, images, texts, step.device, chain)
    if trace_path:
        prof.export_chrome_trace(trace_path)
    self_time = (lambda e: e.self_device_time_total) if device else (lambda e: e.self_cpu_time_total)
    events = counted_events(prof.key_averages(), device)  # one per name, summed over the steps
    per_name = [(e.key, self_time(e) / 1e6 / chain, e.count / chain) for e in events]
    categories = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    for name, seconds, _ in per_name:
        categories[categorise(name)] += seconds
    top = sorted(per_name, key=lambda row: row[1], reverse=True)[:PROFILE_TOP]
    return StepProfile(
        device=device, wall=wall, categories=categories,
        top=[(name, categorise(name), seconds, calls) for name, seconds, calls in top],
        busy=busy_seconds(counted_events(prof.events(), device)) / chain if device else None,
    )  # fmt: skip


def format_profile(profile: StepProfile, chain: int) -> str:
    what = "kernels' device time" if profile.device else "operators' CPU self time"
    lines = [f"profile of {chain} consecutive steps of ours, {what} per step:",
             f"{'category':<40}{'per step':>12}{'share':>8}"]  # fmt: skip
    for category, seconds in profile.categories.items():
        lines.append(f"{category:<40}{1000 * seconds:9.2f} ms{100 * profile.share(category):7.1f}%")
    lines.append(f"{'total':<40}{1000 * profile.total:9.2f} ms{100.0:7.1f}%")
    wall = f"wall time per step in the profiled window: {1000 * profile.wall:.2f} ms"
    if profile.busy is not None:
        lines.append(f"{wall}; device busy {1000 * profile.busy:.2f} ms ({100 * profile.busy / profile.wall:.1f}%; "
                     "the idle rest is the device waiting for the host)")  # fmt: skip
    else:
        operators = 100 * profile.total / profile.wall
        lines.append(f"{wall}; operators {operators:.1f}% of it (the rest: Python between them)")
    lines.append(f"top {len(profile.top)} by self time:\n{'per step':>12}{'calls':>7}  {'category':<40}name")
    for name, category, seconds, calls in profile.top:
        shown = name if len(name) <= 80 else name[:77] + "..."
        lines.append(f"{1000 * seconds:9.2f} ms{calls:7g}  {category:<40}{shown}")
    return "\n".join(lines)


def bench_synthetic(cfg: TrainConfig, device: torch.device, args: argparse.Namespace) -> list[Measured]:
    images, texts = synthetic_batch(cfg, device, args.caption_lengths)
    # Each implementation is warmed up (and its memory measured) before the next one is built.
    before = allocated(device)
    ours = OurStep(cfg, device)
    implementations, results = [ours], [warm_up(ours, *ours.prepare(images, texts), device, args.warmup, before)]
    if args.open_clip:
        before = allocated(device)
        theirs = OpenClipStep(cfg, device, ours.initial_state)
        implementations.append(theirs)
        results.append(warm_up(theirs, *theirs.prepare(images, texts), device, args.warmup, before))
    inputs = [implementation.prepare(images, texts) for implementation in implementations]
    for _ in range(args.steps):  # interleaved: every round runs each implementation once
        for implementation, (step_images, step_texts), result in zip(implementations, inputs, results):
            result.seconds.append(timed(implementation, step_images, step_texts, device, args.chain))
    for implementation, (step_images, step_texts), result in zip(implementations, inputs, results):
        result.syncs_per_step = count_syncs(implementation, step_images, step_texts, device)
    if args.profile:
        results[0].profile = profile_step(ours, *inputs[0], args.chain, args.profile_trace)
    print(f"flash attention: {check_flash_attention(ours, images, texts)}")
    if cfg.text_packing_groups:
        packing = pack_text(texts, ours.model.eot_token_id, cfg.text_packing_groups)
        padded = texts.numel()
        print(
            f"text packing: our text tower computes {packing.num_tokens} of the {padded} padded positions "
            f"({100 * packing.num_tokens / padded:.0f}%); MFU counts all {padded}, as OpenCLIP computes them"
        )
        model_config = to_model_config(cfg.model)
        if model_config.vision.kind != "timm":
            skipped = skipped_text_flops(model_config, (group.shape for group in packing.groups))
            share = 1 - skipped / (len(packing) * training_flops_per_sample(model_config, global_batch=len(packing)))
            print(f"our step executes {100 * share:.1f}% of the model FLOPs: its hardware MFU is MFU x {share:.3f}")
    return results


def bench_shards(cfg: TrainConfig, device: torch.device, args: argparse.Namespace) -> list[Measured]:
    """Our step fed by the real loader, in the trainer's order; records the data-wait share."""
    from clip.config import DataConfig
    from clip.data import build_train_loader
    from clip.tokenizer import get_tokenizer
    from clip.transforms import image_transform_train

    model_config = to_model_config(cfg.model)
    data_cfg = DataConfig(train_shards=args.shards, resampled=True, num_workers=args.workers)
    loader = build_train_loader(
        data_cfg, batch_size=cfg.global_batch_size, image_transform=image_transform_train(model_config.vision.image_size),
        tokenize=get_tokenizer(model_config.text), rank=0, world_size=1, seed=0,
    )  # fmt: skip
    ours = OurStep(cfg, device, finish_images=loader.finish_images)
    result = Measured(ours.name + " (real shards)")
    batches = iter(loader)
    batch = next(batches)  # worker start-up is not timed
    waited = 0.0

    def fetch_next() -> None:
        nonlocal batch, waited
        start = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - start

    def step() -> torch.Tensor:
        return ours(batch.images, batch.texts, while_running=fetch_next)  # prepared on the device, as in training

    for _ in range(args.warmup):
        result.warmup_losses.append(float(step()))
    waited = 0.0
    for _ in range(args.steps):
        result.seconds.append(timed(lambda *_: step(), None, None, device, args.chain))
    result.data_wait = waited / (sum(result.seconds) * args.chain)
    return [result]


def describe_machine(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return f"CPU {model}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}"


def format_results(cfg: TrainConfig, device: torch.device, results: list[Measured], chain: int) -> str:
    model_config = to_model_config(cfg.model)
    flops = training_flops_per_sample(model_config, global_batch=cfg.global_batch_size) if model_config.vision.kind != "timm" else 0.0
    precision = "tf32" if cfg.precision == "fp32" and torch.backends.cuda.matmul.allow_tf32 else cfg.precision
    peak = get_peak_flops(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None
    lines = [f"{'':<22}{'step ms':>10}{'samples/s':>11}{'MFU':>7}{'peak MiB':>10}{'syncs':>7}{'data wait':>11}  first loss"]
    for result in results:
        samples_per_s = cfg.global_batch_size / result.median
        mfu = get_mfu(samples_per_s, flops, peak) if flops else None
        cells = [
            f"{1000 * result.median:10.1f}",
            f"{samples_per_s:11.1f}",
            f"{100 * mfu:6.1f}%" if mfu is not None else f"{'-':>7}",
            f"{result.peak_mib:10.0f}" if result.peak_mib is not None else f"{'-':>10}",
            f"{result.syncs_per_step:7d}" if result.syncs_per_step is not None else f"{'-':>7}",
            f"{100 * result.data_wait:10.1f}%" if result.data_wait is not None else f"{'-':>11}",
        ]
        lines.append(f"{result.name:<22}{''.join(cells)}  {result.first_loss:.6f}")
    if len(results) == 2:
        ratio = results[0].median / results[1].median
        runs = f"{len(results[0].seconds)} interleaved runs of {chain} step{'s' if chain > 1 else ''}"
        lines.append(f"step time ratio ours/OpenCLIP: {ratio:.3f} (medians of {runs})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Measured]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="registered architecture (clip.list_models())")
    parser.add_argument("--batch", type=int, default=32, help="per-device batch")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile (ours: the trainer's; OpenCLIP: --torchcompile)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument(
        "--text-packing-groups", type=int, default=TrainConfig.text_packing_groups,
        help="ours: the trainer's text_packing_groups (0: every caption padded to the context length, as OpenCLIP)",
    )  # fmt: skip
    parser.add_argument("--open-clip", action="store_true", help="also OpenCLIP's step with its best flags")
    parser.add_argument(
        "--caption-lengths", choices=("uniform", "web"), default="uniform",
        help="synthetic captions' lengths: uniform up to the context length, or web alt-text-like (synthetic_batch)",
    )  # fmt: skip
    parser.add_argument("--shards", default="", help="measure our step on these WebDataset shards (brace pattern)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes with --shards")
    parser.add_argument("--steps", type=int, default=7, help="timed runs per implementation (median)")
    parser.add_argument("--chain", type=int, default=3, help="consecutive steps per timed run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, optimizer state)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--profile", action="store_true", help="also print where our step's time goes (torch.profiler)")
    parser.add_argument("--profile-trace", default="", metavar="PATH", help="with --profile: write the Chrome trace")
    args = parser.parse_args(argv)
    if args.shards and args.open_clip:
        parser.error("--open-clip compares on synthetic batches; run --shards without it")
    if args.profile and args.shards:
        parser.error("--profile profiles our step on a synthetic batch; run --shards without it")
    if args.profile_trace and not args.profile:
        parser.error("--profile-trace needs --profile")
    if args.warmup < 1 or args.steps < 1 or args.chain < 1:
        parser.error("--warmup, --steps and --chain must be >= 1")
    if args.batch < 1 or args.text_packing_groups < 0:
        parser.error("--batch must be >= 1 and --text-packing-groups >= 0 (0: padded captions)")
    try:
        get_model_config(args.model)
    except KeyError as error:
        parser.error(f"--model: {error.args[0]}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    torch.set_num_threads(args.threads or os.cpu_count())
    torch.backends.cudnn.benchmark = True  # as the trainer (unless deterministic) and open_clip_train do
    cfg = build_config(args)

    load_before = os.getloadavg()[0]
    results = bench_shards(cfg, device, args) if args.shards else bench_synthetic(cfg, device, args)
    print(
        f"{args.model}, batch {args.batch}, {args.precision}, {'compiled' if args.compile else 'eager'}"
        f"{', activation checkpointing' if args.grad_checkpointing else ''}, "
        f"text packing {args.text_packing_groups or 'off'}, "
        f"{'shards ' + args.shards if args.shards else f'synthetic batch ({args.caption_lengths} caption lengths)'}; {describe_machine(device, torch.get_num_threads())}; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(format_results(cfg, device, results, args.chain))
    if results[0].profile is not None:
        print(format_profile(results[0].profile, args.chain))
    return results


if __name__ == "__main__":
    main()
