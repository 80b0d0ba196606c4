"""`fuse-train` (also `python -m fuse_train`): train an RGB+IR fused detector, or resume one exactly."""

from __future__ import annotations

import atexit
import shlex
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console

from ckpttools.datasets.spec import DatasetError
from ckpttools.errors import EXIT_OK, EXIT_PREFLIGHT, EXIT_PROBLEMS, EXIT_USAGE
from ckpttools.options import OneLineErrors
from ckpttools.report import counted
from fuse_train import __version__
from fuse_train.command_errors import one_line
from fuse_train.commands import register
from fuse_train.config import FUSIONS, OPTIMIZERS, SAVE_FORMATS, SCALES, SCHEDULES, ConfigError, RunConfig
from fuse_train.launch.relaunch import launch_record, newest_last, relaunched_run, restart_reason, write_launch
from fuse_train.launch.runlock import RunLocked, run_lock
from fuse_train.process.signals import exit_code, exit_now, stop_after_run, stop_before_training

EPILOG = """\b
Examples:
  fuse-train                          # mid fusion on the built-in demo data
  fuse-train --data /data/LLVIP       # a published layout, read as it is
  fuse-train --data LLVIP.yaml --fusion mid --epochs 50 --batch 32
  fuse-train --resume                 # the newest last.pt under --project
  fuse-train --resume runs/fuse/exp/weights/last.pt
  torchrun --nproc_per_node 2 -m fuse_train --batch 32   # DDP, batch 32

\b
Exit codes: 0 done, 1 training failed, 2 bad option or input, 3 resume
blocked by the preflight, 130 / 143 stopped by SIGINT / SIGTERM after
saving a resumable last.pt.

\b
Signals (to the process or its whole group; DataLoader workers ignore
them): SIGINT / SIGTERM finish the step, save last.pt and exit; a second
one exits at once. SIGUSR1 saves last.pt and keeps training (Slurm:
--signal=USR1@90). Restarts by torchrun --max-restarts or Slurm --requeue
continue the run by themselves (README: Preemptible clusters).
"""

D = RunConfig()  # defaults shown in --help


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class TrainByDefault(OneLineErrors):
    """``fuse-train [OPTIONS]`` trains (as it always has); ``fuse-train data|val|predict|export ...`` are the
    other commands.  ``--help`` shows the training options and the command list together."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help", "--version")):
            args = ["train", *args]
        return super().parse_args(ctx, args)

    def shown_path(self, ctx):
        # the training options are the program's own (`fuse-train --epochs 3`): name it as typed
        return ctx.parent.command_path if ctx.parent is not None and ctx.info_name == "train" else ctx.command_path

    def format_help(self, ctx, formatter):
        train_cmd = self.commands["train"]
        with click.Context(train_cmd, info_name=ctx.info_name, parent=None) as train_ctx:
            train_cmd.format_help(train_ctx, formatter)
        formatter.write_paragraph()
        with formatter.section("Other commands (fuse-train COMMAND --help)"):
            formatter.write_dl(
                [(name, cmd.get_short_help_str(80)) for name, cmd in self.commands.items() if name != "train"]
            )


@click.group(cls=TrainByDefault, context_settings=CONTEXT, invoke_without_command=False)
@click.version_option(__version__, "--version", prog_name="fuse-train")
def cli() -> None:
    """fuse-train: train, validate, predict with and export RGB+IR fused detectors."""


@cli.command("train", context_settings=CONTEXT, epilog=EPILOG)
@click.option(
    "--data",
    default=D.data,
    show_default=True,
    help="data.yaml, a dataset folder as published (LLVIP, M3FD, FLIR aligned, KAIST, VOC/COCO pairs: "
    "docs/datasets.md), or 'demo' for the built-in synthetic night scenes.",
)
@click.option(
    "--fusion",
    type=click.Choice(FUSIONS),
    default=D.fusion,
    show_default=True,
    help="early: 4-channel input; mid: two backbones fused at P3-P5; late: two detectors merged before NMS; rgb / ir: "
    "one modality.",
)
@click.option(
    "--scale", type=click.Choice(SCALES), default=D.scale, show_default=True, help="Model width/depth, as YOLOv8 n/s/m."
)
@click.option("--epochs", type=int, default=D.epochs, show_default=True)
@click.option("--batch", type=int, default=D.batch, show_default=True, help="Global batch size, split over processes.")
@click.option(
    "--img-size",
    type=int,
    default=None,
    help="Square input size, a multiple of 32 [default: data.yaml's imgsz, else 640].",
)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=D.optimizer, show_default=True)
@click.option("--lr0", type=float, default=D.lr0, show_default=True, help="Initial learning rate (after warmup).")
@click.option("--lrf", type=float, default=D.lrf, show_default=True, help="Final learning rate as a fraction of lr0.")
@click.option("--momentum", type=float, default=D.momentum, show_default=True, help="SGD momentum / AdamW beta1.")
@click.option("--weight-decay", type=float, default=D.weight_decay, show_default=True)
@click.option("--warmup-epochs", type=float, default=D.warmup_epochs, show_default=True)
@click.option(
    "--schedule", type=click.Choice(SCHEDULES), default=D.schedule, show_default=True, help="Decay after warmup."
)
@click.option("--grad-clip", type=float, default=D.grad_clip, show_default=True, help="Max gradient norm (0: off).")
@click.option(
    "--seed", type=int, default=D.seed, show_default=True, help="Same seed on CPU gives bitwise the same run."
)
@click.option("--device", default=D.device, help="cpu, 0 or cuda:0 [default: cuda:0 when present, else cpu].")
@click.option("--workers", type=int, default=D.workers, show_default=True, help="DataLoader worker processes.")
@click.option("--project", default=D.project, show_default=True, help="Folder holding run folders.")
@click.option(
    "--name",
    default=D.name,
    show_default=True,
    help="Run folder name; a fresh run never reuses a folder with checkpoints (it takes name2, name3, ...).",
)
@click.option(
    "--save-period",
    type=int,
    default=D.save_period,
    show_default=True,
    help="Also keep weights/epoch{N}.pt every N epochs (-1: never).",
)
@click.option(
    "--save-every",
    type=int,
    default=D.save_every,
    show_default=True,
    help="Also save last.pt every N optimizer steps (0: at epoch ends only).",
)
@click.option(
    "--amp/--no-amp", default=D.amp, show_default=True, help="Mixed precision on CUDA (bf16 where supported)."
)
@click.option(
    "--async-save/--no-async-save",
    default=D.async_save,
    show_default=True,
    help="Write checkpoints on a background thread: training only waits for a snapshot of the step (pinned-memory "
    "copies on CUDA). Interrupt and final saves always complete before exit.",
)
@click.option(
    "--plots/--no-plots",
    default=D.plots,
    show_default=True,
    help="Draw results.png after each epoch and the curves, confusion matrix and labels.png at the end (about "
    "2 s of CPU for a short run); results.csv and TensorBoard are written either way.",
)
@click.option(
    "--save-format",
    type=click.Choice(SAVE_FORMATS),
    default=D.save_format,
    show_default=True,
    help="pt: weights/last.pt, one file. dcp: weights/last.dcp, a torch.distributed.checkpoint folder "
    "written by dcp.async_save, every rank writing its share (multi-GPU runs); same crash safety.",
)
@click.option(
    "--resume",
    "resume",
    is_flag=False,
    flag_value="auto",
    default=None,
    metavar="[PATH]",
    help="Continue a run exactly: the newest last.pt / last.dcp under --project (or --name's run), or PATH. Options "
    "not given come from the checkpoint.",
)
@click.option(
    "--allow-change",
    default="",
    metavar="FIELDS",
    help="With --resume: comma-separated preflight fields allowed to differ, e.g. batch,lr0.",
)
@click.option(
    "--log-interval",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="When output is not a terminal (a log file, nohup, a cluster's log): one line per this many seconds "
    "with step, losses, speed and the epoch's ETA; 0 turns the lines off.",
)
@click.option(
    "--stop-grace",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds the scheduler allows between SIGTERM and SIGKILL (torchrun and Kubernetes: 30); a one-line warning "
    "after the first epoch if a stop needs longer.",
)
@click.option(
    "--auto-resume",
    is_flag=True,
    help="Continue the run this same command started, if it has a checkpoint (else train fresh): for launchers that "
    "restart a job with its command line. Implied under torchrun restarts and Slurm requeues.",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="With --resume: skip the integrity check (CRC32s, digest) of the checkpoint; by default a damaged last.pt "
    "falls back to last.prev.pt.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def train(
    ctx: click.Context,
    resume: str | None,
    allow_change: str,
    auto_resume: bool,
    stop_grace: float,
    log_interval: float,
    no_verify: bool,
    debug: bool,
    **options,
) -> None:
    """Train a dual-stream RGB+infrared object detector (YOLOFuse-style early / mid / late fusion) with
    exact, crash-safe resume.  Writes <project>/<name>/ with weights/last.pt, best.pt, results.csv, args.yaml."""
    stop_before_training()  # a stop signal before the loop's handlers: one line, 130 / 143, nothing written
    console = Console(soft_wrap=True, emoji=False)
    explicit = {k for k in options if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    dist_info = None
    trained = False  # the loop ran: the process then leaves through exit_now (see the end)
    launch = launch_record({k: options[k] for k in sorted(explicit)})
    try:
        # torch, the model and the trainer are imported here, when a run starts: `fuse-train --help` and the
        # other commands do not pay for them (tests/test_architecture.py holds the start-up lean)
        import torch

        from fuse_train.process.distributed import init_distributed
        from fuse_train.training.trainer import Trainer

        cfg, run_dir, ckpt, event = _plan(
            resume, options, explicit, allow_change, auto_resume, no_verify, launch, console
        )
        use_cuda = (cfg.device or "").lower() != "cpu" and torch.cuda.is_available()
        dist_info = init_distributed(use_cuda)
        trainer = Trainer(
            cfg,
            run_dir,
            dist_info,
            resume=ckpt,
            console=console,
            history_event=event,  # reads only
            stop_grace=stop_grace,
            log_interval=log_interval,
        )
        with run_lock(run_dir, take=dist_info.is_main):  # one process per run folder, from the first write on
            if dist_info.is_main and ckpt is None:
                write_launch(run_dir, launch)  # what a restart with this command line looks for
            line = _starting_line(trainer, ckpt is not None)
            say_start = (lambda: console.print(line, markup=False, highlight=False)) if dist_info.is_main else None
            trained = True
            metrics = trainer.train(on_start=say_start)  # said once the loop handles stop signals
        stop_after_run(EXIT_OK)
        if dist_info.is_main:
            console.print(
                f"done: best fitness {trainer.best_fitness:.4f}, final mAP50 {metrics.get('mAP50', 0):.3f} "
                f"mAP50-95 {metrics.get('mAP50-95', 0):.3f}; weights in {run_dir / 'weights'}",
                markup=False,
            )
        code = EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the top-level catch: one line, one exit code
        code = _failure(exc, dist_info, debug)
        stop_after_run(code)
    finally:
        if dist_info is not None:
            from fuse_train.process.distributed import shutdown

            shutdown(dist_info)
    if trained or (dist_info is not None and dist_info.enabled):
        # A run that trained leaves through exit_now, not sys.exit:
        # - the interpreter's finalisation puts the default signal handlers back before torch's C++ static
        #   destructors run, so a Ctrl-C or group SIGTERM in that last window killed a finished run (-2, seen
        #   once in CI);
        # - a worker of a multi-process run, its group closed, must skip those destructors: they have aborted
        #   ranks whose run had succeeded ("terminate called without an active exception", SIGABRT after the
        #   last Python frame), which torchrun then reports as a failed job or restarts.
        # The atexit callbacks (logging, multiprocessing's child clean-up) still run, under stop_after_run's handler.
        atexit._run_exitfuncs()
        exit_now(code)
    sys.exit(code)  # an error before training (also what click's test runner expects)


def _plan(
    resume, options: dict, explicit: set, allow_change: str, auto_resume: bool, no_verify: bool, launch: dict, console
):
    """(config, run folder, checkpoint or None, history event or None): a fresh run, or the checkpoint to resume
    (given, found by --auto-resume, or the newest save of the run a restart of this job belongs to)."""
    from fuse_train.launch.resume import RunFinished, fresh_run_dir, prepare_resume

    restart = restart_reason()
    fresh_in = None
    if resume is None and (auto_resume or restart or launch["job"]):
        fresh_in = relaunched_run(options["project"], options["name"], launch)
        last = newest_last(fresh_in) if fresh_in is not None else None
        if last is not None:
            resume, fresh_in = str(last), None
            restart = restart or f"same job ({launch['job']})"
    elif resume not in (None, "auto") and restart and Path(resume).absolute().parent.name == "weights":
        resume = str(newest_last(Path(resume).absolute().parent.parent) or resume)  # the run's newest save
    if resume is None:
        cfg = RunConfig(**options)
        return cfg, fresh_in or fresh_run_dir(cfg, console), None, None
    if restart or auto_resume:
        console.print(f"{restart or '--auto-resume'}: continuing the run from {resume}", markup=False, highlight=False)
    try:
        plan = prepare_resume(resume, options, explicit, allow_change, console, check=not no_verify)
    except RunFinished as exc:
        exc.relaunch = restart or ("--auto-resume" if auto_resume else None)  # then done, not failed
        raise
    if restart:
        plan.event["restart"] = restart
    return plan.cfg, plan.run_dir, plan.checkpoint, plan.event


def _starting_line(trainer, resuming: bool) -> str:
    cfg = trainer.cfg
    # epochs counted from 1, as results.csv and the log lines count them
    where = f"epoch {trainer.epoch + 1} of {cfg.epochs}" + (
        f", step {trainer.step_in_epoch + 1} of {trainer.sampler.steps_per_epoch}" if trainer.step_in_epoch else ""
    )
    processes = counted(trainer.dist.world_size, "process", "processes")
    line = (
        f"{'resuming' if resuming else 'training'} {cfg.fusion} fusion ({cfg.scale}) at {where} "
        f"on {trainer.device} ({processes}, global batch {cfg.batch}) -> {trainer.run_dir}"
    )
    return line + _best_so_far(trainer.results) if resuming else line


def _best_so_far(rows: list[dict]) -> str:
    """What a resumed run remembers, said where a person checks it: the best epoch and its mAP."""
    scored = [r for r in rows if isinstance(r.get("fitness"), (int, float))]
    if not scored:
        return ""
    best = max(scored, key=lambda r: r["fitness"])  # the first of equals, as the trainer keeps best.pt
    maps = ", ".join(f"{k} {best[f'metrics/{k}']:.3f}" for k in ("mAP50", "mAP50-95") if f"metrics/{k}" in best)
    return f"\n  best so far: epoch {best.get('epoch')}" + (f", {maps}" if maps else "")


def _failure(exc: BaseException, dist_info, debug: bool) -> int:
    """What a run that ended early says (one line on stderr; the traceback only with --debug), and its exit code.
    (No KeyboardInterrupt reaches here: from the command's start a stop signal has one of fuse_train.process.signals'
    handlers, none of which raises.)"""
    from fuse_train.launch.resume import PreflightBlocked, ResumeError, RunFinished
    from fuse_train.training.trainer import TrainingFailed, TrainingInterrupted

    err = Console(stderr=True, soft_wrap=True, emoji=False)

    def say(text: str) -> None:
        err.print(text, markup=False, highlight=False)

    if isinstance(exc, TrainingInterrupted):
        if dist_info is None or dist_info.is_main:
            say(f"{exc}: saved {exc.checkpoint}\nresume with: fuse-train --resume {shlex.quote(str(exc.checkpoint))}")
        return exit_code(exc.signum)
    if isinstance(exc, RunFinished) and exc.relaunch:  # restarted after the run's last save: done, not failed
        Console(soft_wrap=True, emoji=False).print(f"{exc.relaunch}: {exc}", markup=False, highlight=False)
        return EXIT_OK
    if isinstance(exc, PreflightBlocked):
        exc.render(err)
        return EXIT_PREFLIGHT
    if debug and not isinstance(exc, (RunFinished, TrainingFailed)):
        traceback.print_exc()
    if isinstance(exc, (RunFinished, ConfigError, DatasetError, ResumeError, RunLocked)):
        say(f"fuse-train: error: {one_line(exc)}")
        return EXIT_USAGE
    if isinstance(exc, TrainingFailed):
        say(f"fuse-train: error: {exc}")
        return EXIT_PROBLEMS
    say(f"fuse-train: error: {exc.__class__.__name__}: {one_line(exc)} (run with --debug for the traceback)")
    return EXIT_PROBLEMS


register(cli)  # the other commands, beside the default one


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="fuse-train")


if __name__ == "__main__":
    main()
