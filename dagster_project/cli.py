"""`pseudolabel` console script: the offline demo and a few operator helpers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from dagster_project.demo import DemoNeedsGpu, run_demo

    try:
        summary = run_demo(
            out_dir=Path(args.out).resolve(),
            images=args.images,
            shard_size=args.shard_size,
            random_weights=args.random_weights,
            device=args.device,
        )
    except DemoNeedsGpu as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.render())
    return 0


def _gpu_pool(args: argparse.Namespace) -> int:
    """Set the `gpu` pool's slots: at most one concurrent GPU step per visible GPU (at least 1, so CPU
    hosts still run; ``nvidia-smi -L`` or ``PSEUDOLABEL_GPUS``, no torch here)."""
    from dagster import DagsterInstance

    from assets.common import GPU_POOL
    from resources.workers import visible_gpus

    limit = max(1, len(visible_gpus())) if args.limit is None else args.limit
    if limit < 1:
        print(f"error: gpu pool limit must be >= 1, got {limit}", file=sys.stderr)
        return 1
    instance = DagsterInstance.get()
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, limit)
    print(f"pool {GPU_POOL!r} limit set to {limit} in {instance.root_directory}")
    return 0


def _fetch_models(args: argparse.Namespace) -> int:
    """Run ``python -m pseudolabel.models.loading`` in the ``worker`` model-worker environment (built on
    first use), where the checkpoint tables and huggingface_hub live (see that module's docstring), with
    this process's environment (cache, ``PSEUDOLABEL_CHECKPOINT_*`` mirror settings, ``HF_*``)."""
    import os
    import subprocess

    from pseudolabel.models.loading import WORKER_ENV
    from pseudolabel.workers.environment import ensure_worker_python, source_path_entry

    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        python = ensure_worker_python((WORKER_ENV,), log=log)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    env = {**os.environ, "PYTHONPATH": source_path_entry()}
    return subprocess.run([python, "-m", "pseudolabel.models.loading"], env=env).returncode


def _workers_install(args: argparse.Namespace) -> int:
    from pseudolabel.workers.environment import ensure_worker_python

    try:
        python = ensure_worker_python(
            tuple(args.extra or ("worker",)), log=lambda line: print(line, file=sys.stderr, flush=True)
        )
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(python)
    return 0


def _workers_python(args: argparse.Namespace) -> int:
    from pseudolabel.workers.environment import built_worker_python

    try:
        python = built_worker_python(tuple(args.extra or ("worker",)))
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if python is None:
        print("the model-worker environment is not built; run `pseudolabel workers install`", file=sys.stderr)
        return 1
    print(python)
    return 0


def _segment(args: argparse.Namespace) -> int:
    """Check the arguments here, then run ``python -m pseudolabel.segment`` with the same arguments in
    the backends' model-worker environment (built on first use), streaming its progress."""
    import os
    import subprocess

    from pseudolabel.models.loading import ModelConfigError
    from pseudolabel.segment import request_from_args
    from pseudolabel.workers.environment import ensure_worker_python, source_path_entry

    try:
        environment = request_from_args(args).environment
    except ModelConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    python = ensure_worker_python((environment,), log=log) if environment else sys.executable
    env = {**os.environ, "PYTHONPATH": source_path_entry()}
    return subprocess.run([python, "-m", "pseudolabel.segment", *args.argv], env=env).returncode


def _read_text(location: str) -> str:
    """A local file's text, or an ``s3://bucket/key`` object's (credentials from the environment)."""
    if location.startswith("s3://"):
        from pseudolabel.storage import open_store

        parent, _, name = location.rpartition("/")
        return open_store(parent).get_text(name)
    return Path(location).expanduser().read_text()


def _latest_proposal() -> str:
    """The newest label_quality proposal in the storage ``PSEUDOLABEL_STORAGE`` names."""
    from pseudolabel import layout
    from resources.storage import storage_from_env

    store = storage_from_env().store()
    found = [
        i.key for i in store.list(f"{layout.LABEL_QUALITY_ROOT}/") if i.key.endswith(layout.PROPOSAL_NAME)
    ]
    if not found:
        raise ValueError(
            f"no threshold proposal in {store.uri(layout.LABEL_QUALITY_ROOT)}: materialize label_quality "
            "with reviewed labels first"
        )
    return store.uri(max(found))  # keys start with the run's UTC time


def _thresholds_adopt(args: argparse.Namespace) -> int:
    """Validate a thresholds proposal, show what changes, and make it the thresholds file in use."""
    import os
    import tempfile

    from pseudolabel.labels.thresholds import (
        ThresholdsError,
        load_thresholds,
        parse_thresholds,
        thresholds_code_version,
        thresholds_path,
    )

    target = Path(args.to).expanduser() if args.to else thresholds_path()
    try:
        location = args.proposal or _latest_proposal()
        text = _read_text(location)
        proposed = parse_thresholds(text)
        current = load_thresholds(target) if target.exists() else None
    except (OSError, ThresholdsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    before = current.to_dict() if current else {}
    after = proposed.to_dict()
    changes = [
        f"  {key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]
    if not changes:
        print(f"{target} already holds these thresholds ({thresholds_code_version(proposed)}); nothing to do")
        return 0
    print(f"adopting {location} as {target}:")
    print("\n".join(changes))
    if args.dry_run:
        return 0
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temp, target)
    print(
        f"pseudo_labels code version is now {thresholds_code_version(proposed)}: reload the code location, then "
        "materialize the unsynced pseudo_labels partitions (relabel_job backfill; no GPU)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pseudolabel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole chain offline on a synthetic catalog")
    demo.add_argument("--out", default="./pseudolabel-demo", help="where data and the Dagster instance go")
    demo.add_argument("--images", type=int, default=48, help="synthetic catalog size")
    demo.add_argument("--shard-size", type=int, default=16, help="images per shard")
    demo.add_argument(
        "--random-weights",
        action="store_true",
        help="SMOKE RUN: real architectures at tiny size with random weights (no downloads; says nothing "
        "about label quality). Without it the official checkpoints are used (cached or downloaded).",
    )
    demo.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the models run (default auto: the leased GPU; the official checkpoints refuse to start "
        "without one unless --device cpu)",
    )
    demo.set_defaults(func=_demo)

    pool = sub.add_parser("gpu-pool", help="set the Dagster `gpu` pool to the number of visible GPUs")
    pool.add_argument("--limit", type=int, default=None, help="override the detected GPU count")
    pool.set_defaults(func=_gpu_pool)

    fetch = sub.add_parser("fetch-models", help="download and verify the default checkpoints into the cache")
    fetch.set_defaults(func=_fetch_models)

    workers = sub.add_parser(
        "workers", help="the model-worker Python environment (torch, SAM2, Grounding DINO)"
    )
    workers_sub = workers.add_subparsers(dest="workers_command", required=True)
    extra_help = "pyproject extra to install (repeatable; default: worker)"
    install = workers_sub.add_parser(
        "install", help="build the worker environment if needed; prints its interpreter on the last line"
    )
    install.add_argument("--extra", action="append", metavar="NAME", help=extra_help)
    install.set_defaults(func=_workers_install)
    from pseudolabel.segment import build_parser as segment_parser

    segment = sub.add_parser(
        "segment",
        help="prompt and segment image files (text, --auto, --boxes, --points): masks, JSON, a 3-panel picture",
        description="Runs the assets' detector and segmenter code on image files in the model-worker environment.",
    )
    segment_parser(segment).set_defaults(func=_segment)

    thresholds = sub.add_parser("thresholds", help="the label thresholds file")
    thresholds_sub = thresholds.add_subparsers(dest="thresholds_command", required=True)
    adopt = thresholds_sub.add_parser(
        "adopt",
        help="make a label_quality proposal (thresholds.proposal.yaml) the thresholds file in use",
        description="Validates the proposal, prints what changes, and writes it over the thresholds file in "
        "use ($PSEUDOLABEL_THRESHOLDS, else the packaged file) or --to. Then relabel: no GPU stage re-runs.",
    )
    adopt.add_argument(
        "proposal",
        nargs="?",
        help="path or s3:// URI of the proposal (label_quality's `adopt_with`); default: the newest one in "
        "$PSEUDOLABEL_STORAGE",
    )
    adopt.add_argument("--to", default=None, help="thresholds file to write (default: the one in use)")
    adopt.add_argument("--dry-run", action="store_true", help="only print what would change")
    adopt.set_defaults(func=_thresholds_adopt)

    python = workers_sub.add_parser("python", help="print the worker interpreter (exit 1 if not built)")
    python.add_argument("--extra", action="append", metavar="NAME", help=extra_help)
    python.set_defaults(func=_workers_python)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # what follows the subcommand, passed on unchanged (`segment` re-runs it)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
