"""Video data benchmark: decoded frames per second with decord vs PyAV, and what the
encode-once latent cache saves per training step.

1. **Readers**, side by side on one thread: every clip of the built-in ``video/moving-digits``
   set (H.264 MP4s, 17 frames of 32 x 32, written by selfflow) and a folder of "user" videos
   made by imageio-ffmpeg's ffmpeg binary (different containers, codecs, sizes and rates),
   each decoded whole by ``decode.read_video(reader="decord")`` and ``(reader="pyav")``;
   frames/s is frames decoded / wall time, the median of ``--repeats`` passes. A file decord
   cannot read (its 0.6.0 row-stride bug hits some widths) is shown as such: ``read_video``
   reads it with PyAV.
2. **The latent cache**: one real training step (``core.train_step``, flow matching, a small
   ``FlowTransformer``) on a batch of moving digits tokenized by ``video/patch``, fed either
   from the cached encoding (``plugins.batching.encode_dataset``: what a run does; the batch
   is a slice of tensors) or by decoding the batch's MP4s and encoding them every step (what
   a loader without the cache would do). Medians of ``--steps`` steps; the ratio is
   decode-every-step / cached.

    python -m selfflow.benchmarks.video_data            # about a minute on 2 cores
    python -m selfflow.benchmarks.video_data --quick    # seconds: checks the pipeline
    selfflow bench video-data [--clips ... --repeats ... --steps ...]

Writes ``video_data.json`` and ``video_data.md`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# (name, container, codec, width, height, fps, seconds): what a user's folder may hold
USER_VIDEOS = (
    ("h264-64x48-30fps", "mp4", "libx264", 64, 48, 30, 2.0),
    ("h264-128x96-24fps", "mkv", "libx264", 128, 96, 24, 2.0),
    ("vp9-96x64-25fps", "webm", "libvpx-vp9", 96, 64, 25, 2.0),
    ("mpeg4-80x64-15fps", "mov", "mpeg4", 80, 64, 15, 2.0),
    ("mpeg4-64x64-30fps", "avi", "mpeg4", 64, 64, 30, 2.0),
    ("h264-48x36-30fps", "mp4", "libx264", 48, 36, 30, 2.0),  # a width decord 0.6.0 mis-reads
)


def make_user_videos(directory: Path, seconds_scale: float = 1.0) -> list[Path]:
    """Encode ``USER_VIDEOS`` (ffmpeg's ``testsrc2`` pattern plus noise) into ``directory``."""
    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    paths = []
    for name, ext, codec, w, h, fps, seconds in USER_VIDEOS:
        path = directory / f"{name}.{ext}"
        src = f"testsrc2=size={w}x{h}:rate={fps}:duration={seconds * seconds_scale}"
        cmd = [ffmpeg, "-loglevel", "error", "-y", "-f", "lavfi", "-i", src, "-vf", "noise=alls=20:allf=t"]
        cmd += ["-c:v", codec, "-pix_fmt", "yuv420p", "-threads", "1", str(path)]
        subprocess.run(cmd, check=True, capture_output=True)
        paths.append(path)
    return paths


def time_reader(paths: Sequence[Path], reader: str, repeats: int) -> dict[str, Any]:
    """Frames/s of decoding every file of ``paths`` whole with ``reader`` (median of passes);
    files it cannot read are counted, not timed."""
    from selfflow.plugins.video.decode import VideoReadError, read_video

    readable, failed = [], []
    for p in paths:
        try:
            read_video(p, reader=reader)
            readable.append(p)
        except VideoReadError:
            failed.append(p.name)
    rates, frames = [], 0
    for _ in range(repeats):
        frames, t0 = 0, time.perf_counter()
        for p in readable:
            frames += read_video(p, reader=reader).frames.shape[0]
        rates.append(frames / (time.perf_counter() - t0) if readable else 0.0)
    return {"frames_per_s": statistics.median(rates), "frames": frames, "files": len(readable), "failed": failed}


def reader_rows(paths: Sequence[Path], repeats: int) -> dict[str, Any]:
    decord, pyav = time_reader(paths, "decord", repeats), time_reader(paths, "pyav", repeats)
    ratio = decord["frames_per_s"] / pyav["frames_per_s"] if pyav["frames_per_s"] and decord["files"] else None
    return {"decord": decord, "pyav": pyav, "decord_over_pyav": ratio}


def cache_effect(dataset, *, batch: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Median step time fed from the cached encoding vs decoding + encoding every step."""
    from selfflow.core.distill import EMAConfig, EMATeacher
    from selfflow.core.model import FlowTransformer, ModelConfig
    from selfflow.core.objectives import FlowMatching
    from selfflow.core.train_step import TrainState, train_step
    from selfflow.core.types import TokenBatch
    from selfflow.plugins.batching import encode_dataset
    from selfflow.plugins.video.decode import read_video, to_media
    from selfflow.plugins.video.patch import VideoPatchConfig, VideoPatchTokenizer

    tok = VideoPatchTokenizer(VideoPatchConfig(patch=8, fps=dataset.fps))
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        encoded = encode_dataset(dataset, {"video": tok}, labels=False, cache_dir=cache)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        encoded = encode_dataset(dataset, {"video": tok}, labels=False, cache_dir=cache)
        again = time.perf_counter() - t0
    torch.manual_seed(seed)
    model = FlowTransformer(ModelConfig(channels={"video": tok.channels}, width=128, depth=4, heads=4))
    state = TrainState(
        model=model,
        teacher=EMATeacher(model, EMAConfig(decay=0.999)),
        objective=FlowMatching(),
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
    )
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)

    def cached_batch() -> TokenBatch:
        return encoded.take(torch.from_numpy(rng.choice(len(dataset), batch, replace=False)))

    def decoded_batch() -> TokenBatch:
        idx = rng.choice(len(dataset), batch, replace=False)
        media = torch.stack([to_media(read_video(dataset.files[i]).frames, 1) for i in idx])
        return TokenBatch(segments=(tok.encode(media),))

    times: dict[str, list[float]] = {"cached": [], "decode_every_step": [], "decode_encode_only": []}
    for k in range(steps + 1):  # the first of each is a warm-up
        for name, make in (("cached", cached_batch), ("decode_every_step", decoded_batch)):
            t0 = time.perf_counter()
            b = make()
            t1 = time.perf_counter()
            train_step(state, b, generator=g)
            t2 = time.perf_counter()
            if k:
                times[name].append(t2 - t0)
                if name == "decode_every_step":
                    times["decode_encode_only"].append(t1 - t0)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {
        "tokenizer": "video/patch (patch 8: 17 x 4 x 4 = 272 tokens of 64 channels)",
        "model": "FlowTransformer width 128, depth 4, heads 4; flow matching",
        "batch": batch,
        "steps": steps,
        "ms_per_step": med,
        "ratio": med["decode_every_step"] / med["cached"],
        "encode_dataset_s": {"first (decode + encode, writes the cache)": first, "again (reads the cache)": again},
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Video data benchmark ({report['date']}, {report['environment']['cpu']}, 1 thread)", ""]
    lines += ["| videos | files | frames | decord frames/s | PyAV frames/s | decord / PyAV | decord cannot read |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for name, r in report["readers"].items():
        d, p = r["decord"], r["pyav"]
        ratio = f"{r['decord_over_pyav']:.1f}x" if r["decord_over_pyav"] else "-"
        lines.append(
            f"| {name} | {p['files']} | {p['frames']} | {d['frames_per_s']:,.0f} | {p['frames_per_s']:,.0f} | "
            f"{ratio} | {', '.join(d['failed']) or '-'} |"
        )
    if report.get("per_file"):
        lines += ["", "| user video | decord frames/s | PyAV frames/s |", "|---|---|---|"]
        for name, r in report["per_file"].items():
            d = f"{r['decord']['frames_per_s']:,.0f}" if r["decord"]["files"] else "cannot read (PyAV used)"
            lines.append(f"| {name} | {d} | {r['pyav']['frames_per_s']:,.0f} |")
    c = report["cache"]
    ms = c["ms_per_step"]
    lines += [
        "",
        f"Latent cache ({c['tokenizer']}; {c['model']}; batch {c['batch']}, median of {c['steps']} steps):",
        "",
        "| feeding | ms per step |",
        "|---|---|",
        f"| cached latents (what a run does) | {ms['cached']:.1f} |",
        f"| decode MP4s + encode every step | {ms['decode_every_step']:.1f} |",
        f"| of which decode + encode | {ms['decode_encode_only']:.1f} |",
        "",
        f"Decoding every step is {c['ratio']:.2f}x the cached step time. encode_dataset over the set: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in c["encode_dataset_s"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="selfflow bench video-data", description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=400, help="moving-digits clips decoded (default 400)")
    p.add_argument("--repeats", type=int, default=3, help="passes over the files per reader (median)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per feeding (median)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline in seconds")
    p.add_argument("--out", default=None, help="directory for video_data.json/.md (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.clips, args.repeats, args.steps, args.batch = 32, 1, 2, 8
    torch.set_num_threads(1)  # the house rule on shared cores; decord and PyAV decode on one thread too

    from selfflow.benchmarks.step import cpu_name
    from selfflow.plugins.video.moving_digits import MovingDigitsConfig, moving_digits

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        cfg = MovingDigitsConfig(train_count=args.clips, eval_count=1, cache_dir=str(tmp_path / "cache"))
        digits = moving_digits(cfg, split="train", seed=0)
        generated = time.perf_counter() - t0
        user_dir = tmp_path / "user"
        user_dir.mkdir()
        users = make_user_videos(user_dir, 0.5 if args.quick else 1.0)
        readers = {
            f"moving digits ({args.clips} MP4s, 17x32x32, H.264)": reader_rows(digits.files, args.repeats),
            f"user videos ({len(users)} files, ffmpeg-made)": reader_rows(users, args.repeats),
        }
        per_file = {path.name: reader_rows([path], args.repeats) for path in users}
        cache = cache_effect(digits, batch=args.batch, steps=args.steps)
    report = {
        "benchmark": "video-data",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "environment": {"cpu": cpu_name(), "torch": torch.__version__, "python": platform.python_version()},
        "generation_s": generated,
        "readers": readers,
        "per_file": per_file,
        "cache": cache,
    }
    md = markdown(report)
    print(md)
    out_dir = Path(args.out or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "video_data.json").write_text(json.dumps(report, indent=1))
    (out_dir / "video_data.md").write_text(md)
    print(f"wrote {out_dir / 'video_data.json'}, {out_dir / 'video_data.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
