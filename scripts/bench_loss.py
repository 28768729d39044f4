"""Benchmark the contrastive loss of one rank of a large job: time and peak memory of forward+backward.

    PYTHONPATH=. python scripts/bench_loss.py                       # CPU, default configurations
    PYTHONPATH=. python scripts/bench_loss.py --device cuda --dim 768 --configs 32768:1024

One process plays one rank of a job with `global / local` ranks: its local features [local, D]
(with grad) meet the other ranks' features, made up in advance, where the all-gather would put
them; the all-gather itself is replaced by that concatenation, which keeps the gradient path to
the local rows (communication is not measured). Implementations, on identical inputs:

    plain      clip.loss.ClipLoss(chunk_size=0): [local, global] logits at once
    chunked    clip.loss.ClipLoss(chunk_size=C): column chunks of C, recomputed in backward
    open_clip  open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True), its exact
               distributed setting (its gather_features replaced by the same concatenation)

Each (configuration, implementation) runs in a fresh subprocess. Peak memory is the growth of
the peak during one forward+backward over what the inputs already hold: on CUDA
torch.cuda.max_memory_allocated; on CPU the resident set's high-water mark (VmHWM, reset to the
current size just before the step through /proc/self/clear_refs), with glibc told to mmap every
allocation over 64 KiB so that freed memory leaves the resident set at once. It includes the
gathered [global, D] features of both towers and their gradients. Time is the best of --repeats
timed runs after warm-up (on a shared machine other processes only ever add time), with glibc back
to its usual thresholds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

IMPLEMENTATIONS = ("plain", "chunked", "open_clip")


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def _reset_peak_rss_mib() -> float:
    """Reset the resident set's high-water mark to its current size (Linux >= 4.0); return that size."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _proc_status_mib("VmRSS")


def run_one(impl: str, global_batch: int, local_batch: int, dim: int, chunk_size: int, device: str,
            repeats: int, threads: int) -> dict:
    """Measure one implementation on one configuration, in this (fresh) process."""
    import ctypes

    import torch
    import torch.nn.functional as F

    import clip.loss

    if threads:
        torch.set_num_threads(threads)
    if device == "cpu":
        # Every allocation over 64 KiB gets its own mmap, returned to the system when freed, so the
        # resident set follows live memory (glibc would otherwise keep freed blocks in its heap).
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    generator = torch.Generator(device).manual_seed(0)

    def features(rows):
        return F.normalize(torch.randn(rows, dim, device=device, generator=generator), dim=-1)

    # This rank sits in the middle of the job; the others' features are constants here.
    rank, world_size = (global_batch // local_batch) // 2, global_batch // local_batch
    before, after = rank * local_batch, global_batch - (rank + 1) * local_batch
    others = {name: (features(before), features(after)) for name in ("image", "text")}
    image, text = features(local_batch).requires_grad_(), features(local_batch).requires_grad_()
    logit_scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)

    def gather(x, name):
        head, tail = others[name]
        return torch.cat([head, x, tail])

    if impl == "open_clip":
        import open_clip.loss

        open_clip.loss.gather_features = lambda i, t, **kwargs: (gather(i, "image"), gather(t, "text"))
        loss_fn = open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    else:
        clip.loss.all_gather_with_grad = lambda x: gather(x, "image" if x is image else "text")
        loss_fn = clip.loss.ClipLoss(chunk_size=chunk_size if impl == "chunked" else 0)

    def step():
        image.grad = text.grad = logit_scale.grad = None
        loss = loss_fn(image, text, logit_scale)
        loss.backward()
        return loss.item()

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    loss = step()  # warm-up: first-call allocations, lazy imports (checkpointing imports torch._dynamo)
    synchronize()
    if device == "cpu":
        baseline = _reset_peak_rss_mib()
    else:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    step()
    synchronize()
    if device == "cpu":
        peak = _proc_status_mib("VmHWM") - baseline
        # Back to glibc's usual steady state for timing (mmap only above 32 MiB; forced mmap is slow).
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
        step()
    else:
        peak = torch.cuda.max_memory_allocated() / 2**20 - baseline

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return {"loss": loss, "peak_mib": peak, "time_ms": 1000 * min(times) if times else float("nan"),
            "grad_scale": logit_scale.grad.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="4096:512,16384:512,32768:256,32768:1024",
                        help="comma-separated global:local batch sizes")
    parser.add_argument("--dim", type=int, default=512, help="embedding width (ViT-B: 512, ViT-L: 768)")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads; 0: torch's default (on a shared machine 1 gives steadier times)")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = parser.parse_args()

    if args.worker:
        impl, global_batch, local_batch = args.worker.split(":")
        result = run_one(impl, int(global_batch), int(local_batch), args.dim, args.chunk_size, args.device,
                         args.repeats, args.threads)
        print(json.dumps(result))
        return

    print(f"device={args.device} dim={args.dim} chunk_size={args.chunk_size} repeats={args.repeats} "
          f"threads={args.threads or 'default'}")
    print("| global | local | ranks | implementation | fwd+bwd ms (best) | peak MiB | loss |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for config in args.configs.split(","):
        global_batch, local_batch = map(int, config.split(":"))
        reference = None
        for impl in args.impls.split(","):
            command = [sys.executable, __file__, "--worker", f"{impl}:{global_batch}:{local_batch}",
                       "--dim", str(args.dim), "--chunk-size", str(args.chunk_size), "--device", args.device,
                       "--repeats", str(args.repeats), "--threads", str(args.threads)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            reference = reference or result
            # Same inputs, same loss: a cheap guard against benchmarking something wrong.
            assert abs(result["loss"] - reference["loss"]) <= 1e-4 * abs(reference["loss"]), (impl, result)
            assert abs(result["grad_scale"] - reference["grad_scale"]) <= 1e-3 * abs(reference["grad_scale"])
            label = f"{impl} (chunk {args.chunk_size})" if impl == "chunked" else impl
            print(f"| {global_batch} | {local_batch} | {global_batch // local_batch} | {label} | "
                  f"{result['time_ms']:.0f} | {result['peak_mib']:.0f} | {result['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
