"""Does channels_last speed up the segmentation model? The project's UperNet-Swin-T (shrunk as in
segment_bench.py's mmseg part, or ``--full``) on random batches, contiguous and channels_last alternating in one
process, so that the machine's drift hits both alike; prints seconds per batch of each and their ratio, and the
largest difference of the logits.

    python benchmarks/memory_format.py                           # CPU, shrunk model, batch 4
    python benchmarks/memory_format.py --device cuda --full --batch-size 16 --amp
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from segment_bench import MMSEG_CONFIG, mmseg_options


def seconds_per_batch(model: torch.nn.Module, batch: torch.Tensor, reps: int, amp: bool) -> tuple[float, torch.Tensor]:
    """Mean seconds of ``reps`` forward passes (backbone, neck, decode head) after one warm-up, and the logits."""
    with torch.inference_mode(), torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model.decode_head(model.extract_feat(batch))
        if batch.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            out = model.decode_head(model.extract_feat(batch))
        if batch.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps, out.float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help="the config's own sizes (default: shrunk, as segment_bench)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds of each layout")
    p.add_argument("--reps", type=int, default=4, help="timed passes per round")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = p.parse_args()

    from mmseg.apis import init_model

    from densevision.compat import patch_mmengine

    patch_mmengine()
    torch.manual_seed(0)
    options = mmseg_options(args.tile, args.tile - 64, full=args.full)
    model = init_model(str(MMSEG_CONFIG), None, device=args.device, cfg_options=options).eval()
    batch = torch.randn(args.batch_size, 3, args.tile, args.tile, device=args.device)
    times: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
    worst = 0.0
    for _ in range(args.rounds):
        model = model.to(memory_format=torch.contiguous_format)
        s, ref = seconds_per_batch(model, batch, args.reps, args.amp)
        times["contiguous"].append(s)
        model = model.to(memory_format=torch.channels_last)
        s, out = seconds_per_batch(model, batch.contiguous(memory_format=torch.channels_last), args.reps, args.amp)
        times["channels_last"].append(s)
        worst = max(worst, float((out - ref).abs().max()))
    a, b = (statistics.median(times[k]) for k in ("contiguous", "channels_last"))
    what = f"{'full' if args.full else 'shrunk'} UperNet-Swin-T, batch {args.batch_size} x {args.tile}^2"
    rounds = " / ".join(", ".join(f"{x:.2f}" for x in times[k]) for k in ("contiguous", "channels_last"))
    print(
        f"{what} on {args.device}{' (bf16)' if args.amp else ''}: contiguous {a:.3f} s, channels_last {b:.3f} s "
        f"per batch (medians of {args.rounds} rounds: {rounds}); channels_last / contiguous {b / a:.2f}; logits "
        f"differ by at most {worst:.2g}"
    )


if __name__ == "__main__":
    main()
