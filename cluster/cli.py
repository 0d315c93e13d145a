"""The ``parle`` command line.

    parle train CONFIG [--set key=value ...] [--run-dir DIR]    train on this machine
    parle train --resume RUN_DIR                                continue from the last good checkpoint
    parle eval RUN_DIR [--checkpoint DIR]                       evaluate a run's reference
    parle plot RUN_DIR [RUN_DIR ...] -o curves.png              curves of one or more runs
    parle coordinator | worker | submit | jobs | status | cancel | download   (see cluster/service_cli.py)

Exit status: 0 success, 1 the job failed, 2 bad input (nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cluster.service_cli import add_service_commands, service_errors
from protos.messages import CoordinatorError
from protos.spec import JobSpec, SpecError, load_spec

log = logging.getLogger("parle")

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


class BadInput(Exception):
    """Reported as one line on stderr with exit status 2."""


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _train_spec(args: argparse.Namespace) -> tuple[JobSpec, Path, bool, int]:
    from cluster.local import check_device, load_run_spec, new_run_dir, preflight
    from worker.workloads import WorkloadError

    if args.resume is not None:
        if args.config is not None or args.set:
            raise BadInput("--resume takes the run directory only (its config.yaml is the job)")
        spec, run_dir, resume = load_run_spec(args.resume), args.resume, True
    elif args.config is None:
        raise BadInput("train needs CONFIG or --resume RUN_DIR")
    else:
        spec = load_spec(args.config, args.set)
        run_dir, resume = args.run_dir or new_run_dir(spec), False
        if run_dir.exists() and any(run_dir.iterdir()):
            raise BadInput(f"--run-dir: {run_dir} exists and is not empty (use --resume to continue it)")
    if args.runtime != "ray":  # on Ray the GPUs are the cluster's, not this machine's
        check_device(spec.device)  # device: cuda without a visible GPU: SpecError, exit 2, nothing written
    try:
        train_size = preflight(spec)
    except WorkloadError as err:
        raise BadInput(f"config error: {err}") from None
    return spec, run_dir, resume, train_size


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.local import run_local
    from cluster.plot import plot_run_dirs
    from cluster.processes import run_processes
    from cluster.progress import LineProgress, ProgressBar
    from coordinator.schedules import Schedule

    spec, run_dir, resume, train_size = _train_spec(args)
    schedule = Schedule(spec, train_size)
    print(
        f"parle: {spec.preset} {spec.model.name} on {spec.data.name} ({train_size} training samples), "
        f"{spec.replicas} replica(s), {schedule.total_rounds} rounds of {schedule.steps_per_round} mini-batches "
        f"-> {run_dir}"
    )
    for point in schedule.points_beyond_budget():
        print(
            f"parle: warning: {point} lies beyond the budget of {spec.epochs:g} data passes: "
            "the preset's regime is cut short (raise epochs to reach it)",
            file=sys.stderr,
        )
    bar: ProgressBar | LineProgress
    if sys.stderr.isatty() or args.quiet:
        bar = ProgressBar(schedule.total_rounds, desc=spec.name, enabled=not args.quiet)
    else:
        bar = LineProgress(schedule.total_rounds, desc=spec.name)
    try:
        if args.runtime == "ray":
            from cluster.ray_runtime import RayResourceError, run_ray

            try:
                state, message = run_ray(spec, run_dir, [bar], resume=resume)
            except RayResourceError as err:
                print(f"parle: {err}", file=sys.stderr)
                return EXIT_FAILED
        elif args.workers > 0:
            if resume:
                raise BadInput("--resume runs in-process or on Ray; drop --workers")
            state, message = run_processes(spec, run_dir, args.workers, [bar])
        else:
            result = run_local(spec, run_dir, resume=resume, listeners=[bar], train_size=train_size)
            state, message = result.state, result.message or "; ".join(result.errors)
    finally:
        bar.close()
    if state.value != "succeeded":
        print(f"parle: job {state.value}: {message}", file=sys.stderr)
        print(f"parle: the last good checkpoint is kept in {run_dir / 'checkpoints'}", file=sys.stderr)
        return EXIT_FAILED
    plot_run_dirs([run_dir], run_dir / "curves.png")
    test = bar.last_eval.get("test")
    if test is not None:
        print(
            f"parle: done. test error {100 * test['error']:.2f}% after {test['epoch']:.2f} epochs; "
            f"run directory {run_dir}"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cluster.evaluate import evaluate_reference, load_reference
    from cluster.local import load_run_spec

    spec = load_run_spec(args.run_dir)
    try:
        reference, source = load_reference(args.run_dir, args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise BadInput(str(err)) from None
    results = evaluate_reference(spec, reference)
    if args.json:
        print(json.dumps({"source": source, **{k: {"loss": v[0], "error": v[1]} for k, v in results.items()}}))
    else:
        print(f"reference: {source}")
        for split, (loss, error) in results.items():
            print(f"{split:>6}: loss {loss:.4f}  error {100 * error:.2f}%")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from cluster.plot import plot_run_dirs, plot_runs

    try:
        if args.coordinator:
            from cluster.client import Endpoint, JobsClient

            endpoint = Endpoint.resolve(args.coordinator, args.token_file, args.ca_cert)
            with JobsClient(endpoint) as client:
                path = plot_runs({job_id: client.events(job_id) for job_id in args.runs}, args.output)
        else:
            path = plot_run_dirs([Path(run) for run in args.runs], args.output)
    except FileNotFoundError as err:
        raise BadInput(str(err)) from None
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parle", description="Parle / Entropy-SGD distributed training")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a job: in this process (default), with --workers N processes, or --runtime ray"
    )
    train.add_argument("config", nargs="?", type=Path, help="job YAML (see examples/)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=0.05 (repeatable)",
    )
    train.add_argument("--run-dir", type=Path, help="where results go (default runs/NAME-TIMESTAMP)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last good checkpoint")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--runtime",
        choices=["local", "ray"],
        default="local",
        help="local: this machine (default); ray: worker actors on the Ray cluster (ray job submit)",
    )
    train.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="process mode: a coordinator on a free loopback port and N worker processes",
    )
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a run's reference weights")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default: the final reference)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_eval)

    plot = sub.add_parser("plot", help="plot test error and train loss of runs (or of jobs on a coordinator)")
    plot.add_argument(
        "runs", nargs="+", metavar="RUN_DIR|JOB_ID", help="run directories, or job ids with --coordinator"
    )
    plot.add_argument("--coordinator", metavar="HOST:PORT", help="read the jobs' events from this coordinator")
    plot.add_argument("--token-file", type=Path)
    plot.add_argument("--ca-cert", type=Path)
    plot.add_argument("-o", "--output", type=Path, default=Path("curves.png"))
    plot.set_defaults(func=cmd_plot)
    add_service_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose or args.command in ("coordinator", "worker"))  # services log what they do
    try:
        return int(args.func(args))
    except (SpecError, BadInput) as err:
        print(f"parle: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("parle: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CoordinatorError, ValueError, OSError) as err:
        return service_errors(err)


if __name__ == "__main__":
    sys.exit(main())
