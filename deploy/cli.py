"""The ``deploy`` command: a thin layer over the Python API with the same names.

deploy optimize [--model FILE] [--data FILE] [--device-profile FILE] [--out DIR]
deploy pick RUN_DIR (--max-latency-ms X | --max-accuracy-drop P)
deploy profile (--out FILE [--model FILE] [--threads N] | --check RUN_DIR [--json])
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import logging
import math
import sys
import warnings

from deploy.errors import DeployError
from deploy.report import format_quality

logger = logging.getLogger("deploy")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that names the bad value and the fix."""

    def error(self, message: str):
        unknown = message.partition("unrecognized arguments: ")[2].split()
        options = [s for a in self._actions for s in a.option_strings]
        for commands in (a for a in self._actions if isinstance(a, argparse._SubParsersAction)):
            for sub in commands.choices.values():
                options += [s for a in sub._actions for s in a.option_strings]
        hint = f"; see '{self.prog} --help'"
        if unknown:
            flag = unknown[0].split("=")[0]
            own = {s for a in self._actions for s in a.option_strings}
            close = difflib.get_close_matches(flag, sorted(set(options)), n=3)
            if flag in own:
                # A global option such as --debug given after the command.
                hint = f"; put {flag} before the command: '{self.prog} {flag} COMMAND ...'"
            elif close:
                hint = f"; did you mean {' or '.join(close)}?{hint}"
        # Arguments may hold control characters; escape them to keep one line.
        line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in f"{message}{hint}")
        print(f"deploy: error: {line}", file=sys.stderr)
        sys.exit(2)


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of milliseconds such as 0.5,0.8"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} lists no budget; give at least one, e.g. 0.5")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise argparse.ArgumentTypeError(
            f"budget {bad[0]} ms is not a positive, finite number of milliseconds"
        )
    return values


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0 <= value <= 600):
        raise argparse.ArgumentTypeError(
            f"{text} s is outside 0 to 600 seconds; the default is 10, 0 keeps the fewest rounds"
        )
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give at least 1")
    return value


def _passes(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} lists no layer name; give NAME[,NAME...]")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deploy",
        description="Shrink a trained PyTorch model for a device, export and validate each "
        "variant, and pick an accuracy-latency point.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    optimize = commands.add_parser(
        "optimize", help="shrink a model for a device and report the frontier"
    )
    optimize.add_argument(
        "--model",
        help="a .py file with build_model() (or FILE.py:NAME), or a .pt2 "
        "ExportedProgram; default: the CNN trained on scikit-learn's digits",
    )
    optimize.add_argument(
        "--data", help=".npz with 'inputs' and optional 'labels'; default: held-out digits"
    )
    optimize.add_argument(
        "--device-profile",
        help="device profile YAML; default: device_profiles/local-cpu.yaml, "
        "measured on this machine where missing",
    )
    optimize.add_argument("--out", help="run folder to create; default: runs/<model>-<time>")
    optimize.add_argument(
        "--budget-ms",
        type=_floats,
        help="comma-separated latency budgets in ms; "
        "default: a sweep from the fastest plan to the fp32 baseline",
    )
    optimize.add_argument(
        "--budget-mj",
        type=_floats,
        help="comma-separated energy budgets in mJ per inference, planned like latency budgets "
        "through the device profile's power (an estimate with declared watts)",
    )
    optimize.add_argument(
        "--num-budgets",
        type=_positive_int,
        default=10,
        help="budgets in the default sweep (default 10)",
    )
    optimize.add_argument(
        "--passes",
        type=_passes,
        default=None,
        help="comma-separated passes from lowrank,prune,quantize (default: all)",
    )
    optimize.add_argument(
        "--keep-float",
        type=_names,
        default=None,
        metavar="NAME,...",
        help="comma-separated layers that stay in float: PyTorch module names (classifier.1) "
        "or ONNX node names of the fp32 export (/classifier/classifier.1/Gemm)",
    )
    optimize.add_argument(
        "--no-finetune", action="store_true", help="skip recovery fine-tuning by distillation"
    )
    optimize.add_argument(
        "--task",
        choices=["classification", "embedding"],
        default="classification",
        help="how agreement is measured (default: classification)",
    )
    optimize.add_argument(
        "--min-timing-s",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="minimum time, in seconds, that the alternating timing rounds take, so that a burst of load on a "
        "shared machine meets few of them (default: 10; 0 for the fewest rounds)",
    )
    optimize.add_argument(
        "--resume", action="store_true", help="finish an interrupted run of the same --out"
    )
    optimize.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow a pickled .pt model; unpickling can run arbitrary code",
    )

    pick = commands.add_parser("pick", help="choose one variant of a finished run by constraint")
    pick.add_argument("run_dir", help="folder written by 'deploy optimize'")
    pick.add_argument(
        "--max-latency-ms", type=float, help="most accurate variant with p50 at or under this"
    )
    pick.add_argument(
        "--max-accuracy-drop",
        type=float,
        help="fastest variant within this many percentage points of the baseline",
    )
    pick.add_argument("--json", action="store_true", help="print the chosen manifest entry as JSON")

    profile = commands.add_parser(
        "profile",
        help="measure this machine's latency table into a device profile, or check a run's "
        "predicted latency against the measured",
    )
    target = profile.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--out", help="device profile to create or resume, e.g. device_profiles/NAME.yaml"
    )
    target.add_argument(
        "--check", metavar="RUN_DIR", help="summarize predicted vs measured latency of a run"
    )
    profile.add_argument(
        "--model",
        help="sweep this model's layers (.py with build_model(), or .pt2); "
        "default: a standard sweep of common CNN and transformer layer shapes",
    )
    profile.add_argument("--data", help=".npz whose inputs give the model's input shape")
    profile.add_argument(
        "--input-shape",
        type=lambda text: tuple(_positive_int(x) for x in text.split(",")),
        help="the model's input shape instead of --data, batch first, e.g. 1,3,224,224",
    )
    profile.add_argument(
        "--threads", type=_positive_int, help="intra-op threads to measure with (default 1)"
    )
    profile.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow a pickled .pt model; unpickling can run arbitrary code",
    )
    profile.add_argument("--json", action="store_true", help="with --check: print JSON")
    profile.add_argument(
        "--retime",
        type=_positive_int,
        default=0,
        metavar="ROUNDS",
        help="with --check: time the baseline and variants again side by side, ROUNDS times, "
        "and recalibrate the predictions to the re-timed baseline (default: the run's figures)",
    )
    return parser


def config_from_args(args: argparse.Namespace):
    """Build the ``OptimizeConfig`` that ``deploy optimize`` arguments describe.

    Raises:
        DeployError: an argument value is invalid.
    """
    from deploy.finetune import FinetuneConfig
    from deploy.passes.quantize import QuantizeConfig
    from deploy.pipeline import OptimizeConfig

    config_args = {
        "budgets_ms": args.budget_ms,
        "budgets_mj": args.budget_mj,
        "num_budgets": args.num_budgets,
        "task": args.task,
        "finetune": None if args.no_finetune else FinetuneConfig(),
    }
    if args.passes is not None:
        config_args["passes"] = args.passes
    if args.min_timing_s is not None:
        config_args["min_timing_s"] = args.min_timing_s
    if args.keep_float:
        config_args["quantize"] = QuantizeConfig(keep_float=args.keep_float)
    return OptimizeConfig(**config_args)


def _optimize(args) -> int:
    from deploy.pipeline import optimize

    config = config_from_args(args)
    manifest = optimize(
        args.model,
        args.data,
        args.device_profile,
        out=args.out,
        config=config,
        resume=args.resume,
        allow_pickle=args.allow_pickle,
    )
    front = [v for v in manifest["variants"] if v["on_frontier"]]
    base = manifest["baseline"]["latency_ms"]["p50"]
    for v in sorted(front, key=lambda v: v["latency_ms"]["p50"]):
        print(
            f"{v['name']}  p50 {v['latency_ms']['p50']:.3f} ms ({base / v['latency_ms']['p50']:.2f}x)  "
            f"accuracy {format_quality(v['accuracy'])}  agreement {v['agreement']:.4f}  "
            f"{v['summary']}"
        )
    return 0


def _pick(args) -> int:
    from deploy.pick import pick

    chosen = pick(
        args.run_dir, max_latency_ms=args.max_latency_ms, max_accuracy_drop=args.max_accuracy_drop
    )
    if args.json:
        print(json.dumps(chosen, indent=2))
    else:
        print(
            f"{chosen['name']}: p50 {chosen['latency_ms']['p50']:.3f} ms, "
            f"accuracy {format_quality(chosen['accuracy'])}, "
            f"agreement {chosen['agreement']:.4f}, {chosen.get('summary', '')}"
        )
        print(f"artifact: {args.run_dir.rstrip('/')}/{chosen['artifact']}")
    return 0


def _profile(args) -> int:
    from deploy.profiling import check, profile

    if args.json and not args.check:
        raise DeployError("--json applies to --check RUN_DIR only; drop it, or pass --check")
    if args.check:
        summary = check(args.check, args.retime)
        if args.json:
            print(json.dumps(summary, indent=2))
            return 0
        for row in summary["rows"]:
            print(
                f"{row['name']}  predicted {row['predicted_ms']:.3f} ms  measured p50 "
                f"{row['measured_p50_ms']:.3f} ms  error {row['error_pct']:+.1f}%"
            )
        if summary["variants"]:
            print(
                f"{summary['variants']} variants: {summary['within_10pct']:.0%} within 10% of the "
                f"measured p50, median absolute error {summary['median_abs_error_pct']:.1f}%"
            )
        else:
            print(f"{args.check}: no validated variant has a predicted latency")
        return 0
    result = profile(
        args.out,
        args.model,
        data=args.data,
        input_shape=args.input_shape,
        threads=args.threads,
        allow_pickle=args.allow_pickle,
    )
    print(f"{result.path}: {len(result.data['latency_table'])} entries")
    return 0


class _LevelPrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"deploy: {record.levelname.lower()}: {text.strip()}"
        return text


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"deploy: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    # Progress lines stay bare, and warnings and errors from loggers carry their level.
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_LevelPrefixFormatter("%(message)s"))
    if not args.debug:
        for noisy in ("torch_pruning", "onnxslim", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = _one_line_warning
    handlers = {"optimize": _optimize, "pick": _pick, "profile": _profile}
    try:
        return handlers[args.command](args)
    except DeployError as exc:
        if args.debug:
            raise
        print(f"deploy: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.debug:
            raise
        print(f"deploy: error: {_describe_os_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"deploy: internal error: {type(exc).__name__}: {message}; rerun with --debug "
            f"for the traceback and report it as a bug",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        hint = (
            "pass --resume with the same --out to finish the run"
            if args.command == "optimize"
            else "rerun the same command to go on where it stopped"
        )
        print(f"deploy: interrupted; {hint}", file=sys.stderr)
        return 130


def _describe_os_error(exc: OSError) -> str:
    where = f" on {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device{where}; free some space, then rerun the same "
            f"command with --resume to finish the run"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}; choose a writable --out or fix the permissions"
    return f"{exc.strerror or exc}{where}; check the path and rerun"


if __name__ == "__main__":
    sys.exit(main())
