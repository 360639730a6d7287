"""Training-step time of ``video/vae`` network variants, side by side in one process.

    selfflow bench video-vae-speed [--repeats 4] [--batch 8] [--frames 17] [--size 32]

One thread; each variant: AdamW steps of ``decode(encode(x)[0])`` + MSE on random clips
(batch 8, 17 x 32 x 32 gray by default), the best of ``repeats - 1`` timed steps after one
warm-up; prints seconds per step and the ratio to the default network (docs/video.md,
``pixel_patch``). The variants are interleaved round by round, so a load change on a shared
machine reaches all of them alike.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

VARIANTS = (
    {},  # the default: base_channels 16, pixel_patch 1
    {"pixel_patch": 2, "base_channels": 16},
    {"pixel_patch": 2, "base_channels": 32},
    {"pixel_patch": 4, "base_channels": 32},
    {"pixel_patch": 4, "base_channels": 64},
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from selfflow.plugins.video.vae import VideoVAEConfig, VideoVAETokenizer

    x = torch.rand(args.batch, 1, args.frames, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    runs = []
    for options in VARIANTS:
        torch.manual_seed(0)
        net = VideoVAETokenizer(VideoVAEConfig(**options))._build()
        runs.append((options, net, torch.optim.AdamW(net.parameters(), lr=1e-3), []))
    for _ in range(args.repeats):
        for _options, net, opt, times in runs:
            start = time.perf_counter()
            F.mse_loss(net.decode(net.encode(x)[0]), x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    base = min(runs[0][3][1:])
    print(f"video/vae training step, batch {args.batch} x {args.frames} x {args.size} x {args.size}, one thread")
    for options, net, _opt, times in runs:
        best = min(times[1:])
        params = sum(p.numel() for p in net.parameters()) / 1e6
        print(f"  {options or 'default'!s:44s} {params:5.2f}M parameters  {best:5.2f} s/step  x{base / best:4.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
