"""One video/vae fit configuration, scored the way ``selfflow eval RUN --reconstructions`` scores
a run's tokenizer: fit ``video/vae`` with the given ``tokenizer_options`` on a run's video
stream (cached by data + config hash, like a run's own fit), then digit/direction accuracy of
the reference network on ``decode(encode(x))`` of 200 held-out clips.

    python -m selfflow.benchmarks.video_vae_trial RUN '{"crop_frames": 5, "steps": 1200}'

``RUN`` is any finished ``video/moving-digits-*`` run directory (its stream, reference network
and cache are reused; ``selfflow train video/moving-digits-selfflow --set run.steps=1`` makes
one); the options go on top of its recorded ``tokenizer_options``. One thread. Prints the fit's
held-out PSNR line and the accuracies (docs/video.md, "Tried and not adopted").
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished video run directory")
    parser.add_argument("options", nargs="?", default="{}", help="video/vae tokenizer_options as JSON")
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from selfflow.core.checkpoint import resolve
    from selfflow.plugins.video.vae import VideoVAEConfig, VideoVAETokenizer
    from selfflow.registry.compose import build_run, recorded_config
    from selfflow.registry.config import MetricSpec
    from selfflow.registry.evaluate import evaluate
    from selfflow.registry.setup import cache_dir

    options = json.loads(args.options)
    ck = resolve(args.run)
    run = build_run(recorded_config(ck, ["output.progress=false"]), resume=ck, read_only=True)
    recorded = dict(run.config.modalities["video"].tokenizer_options)
    tok = VideoVAETokenizer(VideoVAEConfig(**{**recorded, "log_every": 100, **options}))
    start = time.perf_counter()
    tok.fit(run.stream_for("video").train, cache_dir=str(cache_dir()), generator=torch.Generator().manual_seed(0))
    print(f"fit {options}: {tok.source.value}, {time.perf_counter() - start:.0f} s; {tok.metrics.line()}", flush=True)
    run.tokenizers["video"] = tok
    report = evaluate(
        run, metrics=[MetricSpec(name="video/factor-accuracy")], reconstructions=True, num_samples=args.samples
    )
    print(json.dumps({"options": options, **{k: round(v, 4) for k, v in report.results.items()}}))


if __name__ == "__main__":
    main()
