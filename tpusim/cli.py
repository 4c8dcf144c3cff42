"""Command-line interface: argument parsing -> pipeline -> report. Errors are one line and exit code 2."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

# Only what building the parser needs is imported here, so that `tpusim --help` and argument errors are
# instant; each command imports the stages (onnx, numba, matplotlib, ...) it uses when it runs.
from tpusim.arguments import positive_int, shape
from tpusim.errors import ConfigError, TpusimError, TpusimWarning
from tpusim.compare import add_compare_command
from tpusim.sweeps import add_sweep_command

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command that Ctrl-C ended
_BUILT_IN = "a built-in workload name (`tpusim workloads list` shows them)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tpusim")
    except PackageNotFoundError:
        return "(not installed)"


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="hardware config YAML, e.g. configs/tpu_v1.yaml")
    parser.add_argument("--model", required=True, help=f"path to an .onnx file or {_BUILT_IN}")
    parser.add_argument("--batch", type=positive_int,
                        help="batch size (default: the N of --input-shape, else the model's own batch, else 1)")
    parser.add_argument("--input-shape", type=shape, metavar="N,C,H,W",
                        help="input shape for models with dynamic dimensions; N is the batch unless --batch is given "
                             "(default: the model's own input shape)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value, e.g. --set array.rows=128 (repeatable; default: the config "
                             "file's values)")


def _add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib-data", metavar="PATH",
                        help="calibration inputs: a .npy/.npz of input tensors or a folder of images "
                             "(default: a seeded synthetic set, reported as such)")
    parser.add_argument("--weights", choices=("per-tensor", "per-channel"),
                        help="weight quantization granularity (default: the config's quant.weights, per-channel "
                             "in the shipped configs)")
    parser.add_argument("--calibration", choices=("minmax", "percentile", "entropy", "mse"),
                        help="activation range method (default: the config's quant.calibration, percentile in "
                             "the shipped configs)")


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless its text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or default == []):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in tpusim's one-line form (and exit code 2), defaults shown in every help,
    and a misspelt flag named as such (argparse would first complain that a required flag is missing)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"tpusim: error: {self.prog}: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        if args is not None and self._subparsers is None:  # a command's own parser: all its arguments are here
            self._refuse_unknown_flags(args)
        return super().parse_known_args(args, namespace)

    def _refuse_unknown_flags(self, args: Sequence[str]) -> None:
        known = self._option_string_actions
        for token in args:
            if token == "--":
                return
            if not token.startswith("-") or token == "-" or self._negative_number_matcher.match(token):
                continue
            flag = token.split("=", 1)[0] if token.startswith("--") else token[:2]
            if flag in known or any(option.startswith(flag) for option in known if option.startswith("--")):
                continue  # an exact flag or an abbreviation argparse resolves (or calls ambiguous) itself
            import difflib

            long_flags = [option for option in known if option.startswith("--")]
            close = difflib.get_close_matches(flag, long_flags, n=1, cutoff=0.75)
            self.error(f"unrecognized argument {flag}" + (f"; did you mean {close[0]}?" if close else ""))


class _VersionAction(argparse.Action):
    """--version: the installed version is looked up only when asked for (the lookup is not free)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"tpusim {_version()}")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tpusim",
        description="Cycle-level, bit-exact simulator of a TPU-v1-style weight-stationary systolic array.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the installed version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser("run", help="lower, quantize, map and simulate a model; write reports",
                              description="Run a model on the configured chip and write the reports to --out.")
    _add_model_arguments(run)
    run.add_argument("--out", type=Path, help="output folder (default results/<model>-<config>/)")
    _add_quant_arguments(run)
    run.add_argument("--no-quantize", dest="quantize", action="store_false",
                     help="skip calibration and integer execution (timing and energy only)")
    run.add_argument("--fidelity", choices=("kernel", "pe"), default="kernel",
                     help="what computes the int8 values: the int8 GEMM kernel or the PE-level "
                          "cycle-stepped array (slower; adds pe_array_cycles to layers.csv)")
    # RunOptions.eval_samples, written out so that the parser needs no pipeline import (a test holds them equal)
    run.add_argument("--eval-samples", type=positive_int, default=16, metavar="N",
                     help="inputs on which int8 fidelity is measured")
    run.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bars or phase lines on stderr")
    run.set_defaults(handler=_cmd_run)

    comp = commands.add_parser("compile", help="compile a model to the TPU instruction stream",
                               description="Lower and tile a model; print a summary of the program or, with "
                                           "--listing, one line per instruction with its operands.")
    _add_model_arguments(comp)
    comp.add_argument("--listing", action="store_true", help="print every instruction")
    comp.add_argument("-o", "--output", type=Path,
                      help="write the listing to this file instead of stdout (default: stdout)")
    comp.set_defaults(handler=_cmd_compile)

    quant = commands.add_parser("quantize", help="calibrate and quantize a model; export standard QDQ ONNX",
                                description="Calibrate and quantize a model as the config says and write it as a "
                                            "QDQ ONNX file (int8 weights, int32 biases, our scales) that ONNX "
                                            "Runtime runs.")
    _add_model_arguments(quant)
    _add_quant_arguments(quant)
    quant.add_argument("-o", "--output", type=Path, required=True, help="QDQ ONNX file to write")
    quant.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bars or phase lines on stderr")
    quant.set_defaults(handler=_cmd_quantize)

    check = commands.add_parser("check", help="list every node of a model and whether tpusim supports it",
                                description="Canonicalise a model and list every node with its op and status "
                                            "(lowered, folded, quantization, unsupported); exit code 2 and one "
                                            "line naming every unsupported op when there is any.")
    check.add_argument("model", help=f"path to an .onnx file or {_BUILT_IN}")
    check.add_argument("--input-shape", type=shape, metavar="N,C,H,W",
                       help="input shape for models with dynamic dimensions (default: the model's own input shape)")
    check.set_defaults(handler=_cmd_check)

    add_sweep_command(commands)
    add_compare_command(commands, _add_model_arguments)

    wl = commands.add_parser("workloads", help="list or build the built-in ONNX workloads")
    wl_commands = wl.add_subparsers(dest="workloads_command", required=True, metavar="ACTION")
    wl_list = wl_commands.add_parser("list", help="list the built-in workloads")
    wl_list.set_defaults(handler=_cmd_workloads_list)
    wl_build = wl_commands.add_parser("build", help="write a built-in workload as an ONNX file")
    wl_build.add_argument("name", help="workload name (see `tpusim workloads list`)")
    wl_build.add_argument("-o", "--output", type=Path, required=True, help="ONNX file to write")
    wl_build.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    wl_build.set_defaults(handler=_cmd_workloads_build)
    return parser


def _overrides(items: Sequence[str], args: argparse.Namespace | None = None) -> dict:
    from tpusim.config import parse_override

    overrides = dict(parse_override(item) for item in items)
    for flag, key in (("weights", "quant.weights"), ("calibration", "quant.calibration")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return overrides


def _cmd_run(args: argparse.Namespace) -> int:
    from tpusim.report.figure_worker import FigureRenderer

    with FigureRenderer() as figures:  # first: its worker imports matplotlib while this process imports the rest
        from tpusim import pipeline
        from tpusim.report.files import check_output_dir

        check_output_dir(args.out if args.out is not None else Path("results"))
        options = pipeline.RunOptions(config=args.config, model=args.model, out_dir=args.out, batch=args.batch,
                                      overrides=_overrides(args.overrides, args), input_shape=args.input_shape,
                                      calib_data=args.calib_data, quantize=args.quantize,
                                      eval_samples=args.eval_samples, fidelity=args.fidelity, progress=args.progress)
        result = pipeline.run(options, figures)
    from tpusim.report.run_report import terminal_summary, terminal_table

    for warning in result.evaluation.warnings:
        print(f"tpusim: warning: {warning}", file=sys.stderr)
    print(terminal_table(result.layer_rows))
    print()
    print("\n".join(terminal_summary(result.graph.name, len(result.graph.layers), result.summary)))
    for path in result.files:
        print(f"wrote {path}")
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    import typing
    from collections import Counter

    from tpusim import pipeline
    from tpusim.mapping import compile_program, isa
    from tpusim.report.files import atomic_write_text, check_output_file

    if args.output:
        check_output_file(args.output)
    options = pipeline.RunOptions(config=args.config, model=args.model, batch=args.batch,
                                  overrides=_overrides(args.overrides), input_shape=args.input_shape)
    config, graph, _ = pipeline.prepare(options)
    program = compile_program(graph, config)
    if args.listing or args.output:
        text = program.listing() + "\n"
        if args.output:
            atomic_write_text(args.output, text)
            print(f"wrote {args.output}")
        else:
            sys.stdout.write(text)
        return 0
    counts = Counter(type(instruction) for instruction in program.instructions)
    mnemonics = {type(instruction): isa.mnemonic(instruction) for instruction in program.instructions}
    print(f"{graph.name} on {config.name}: {len(program.instructions):,} instructions for {len(graph.layers):,} layers")
    for kind in typing.get_args(isa.Instruction):  # in the ISA's order, named as --listing names them
        if counts[kind]:
            print(f"  {mnemonics[kind]:<5} {kind.__name__:<18} {counts[kind]:>9,}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import onnx

    from tpusim import pipeline, workloads
    from tpusim.progress import Progress
    from tpusim.quant.export import export_qdq
    from tpusim.quant.stage import calibrate_and_quantize
    from tpusim.report.files import check_output_file

    check_output_file(args.output)
    options = pipeline.RunOptions(config=args.config, model=args.model, batch=1, overrides=_overrides(args.overrides, args),
                                  input_shape=args.input_shape, calib_data=args.calib_data)
    with Progress(args.progress) as progress:
        progress.phase("loading and lowering the model")
        config, graph, model_path = pipeline.prepare(options)
        if config.array.datatype != "int8":
            raise TpusimError(f"{args.config}: array.datatype is {config.array.datatype}; quantize needs an int8 config")
        source = onnx.load(str(model_path))
        progress.phase("quantizing")

        def calibrated(_: str, done: int, total: int) -> None:
            progress.phase("quantizing", total, "calibration samples")
            progress.update(done)

        quantized = calibrate_and_quantize(graph, source, config, args.calib_data,
                                           progress=calibrated if progress.enabled else None)
        progress.phase("writing the QDQ model")
        workloads.save_model(export_qdq(quantized.qgraph, quantized.graph, like=source), args.output)
    if quantized.calibration.synthetic:
        print(f"tpusim: warning: calibrated on SYNTHETIC data ({quantized.calibration.source})", file=sys.stderr)
    print(f"wrote {args.output} ({config.quant.weights} weights, {config.quant.calibration} calibration, "
          f"{config.quant.activations} activations)")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from tpusim import pipeline
    from tpusim.frontend.canonical import load_model
    from tpusim.frontend.check import check_model, unsupported_summary
    from tpusim.report.tables import format_table

    path = pipeline.resolve_model(args.model)
    report = check_model(load_model(path), str(path), input_shape=args.input_shape)
    rows = [{"node": n.name, "op": n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}",
             "status": n.status} for n in report.nodes]
    print(format_table(("op", "status", "node"), rows, left=("op", "status", "node")))
    by_status: dict[str, int] = {}
    for n in report.nodes:
        by_status[n.status] = by_status.get(n.status, 0) + 1
    print(f"\n{path}: {len(report.nodes):,} nodes: "
          + ", ".join(f"{count:,} {status}" for status, count in by_status.items()))
    if report.canonical_error:
        print(f"canonicalisation failed: {report.canonical_error}")
    if report.unsupported:
        raise TpusimError(f"{path}: unsupported ops: {unsupported_summary(report.unsupported)}")
    return 0


def _cmd_workloads_list(args: argparse.Namespace) -> int:
    from tpusim import workloads

    width = max(len(name) for name in workloads.WORKLOADS)
    for name, workload in workloads.WORKLOADS.items():
        dims = "x".join(str(d) for d in workload.input_shape)
        print(f"{name.ljust(width)}  {dims:>14}  {workload.description}")
    return 0


def _cmd_workloads_build(args: argparse.Namespace) -> int:
    from tpusim import workloads
    from tpusim.report.files import check_output_file

    if args.name not in workloads.WORKLOADS:
        raise TpusimError(f"{args.name}: unknown workload (built-in: {', '.join(workloads.WORKLOADS)})")
    check_output_file(args.output)
    workloads.save_model(workloads.build_model(args.name, seed=args.seed), args.output)
    print(f"wrote {args.output}")
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning) -> None:
    """tpusim's own warnings (calibration data, ...) as one line on stderr; others as Python shows them."""
    if issubclass(category, TpusimWarning):
        print(f"tpusim: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def _name_the_set_flag(message: str, args: argparse.Namespace) -> str:
    """A config error that a --set value caused says so (the loader names only the file and the key)."""
    if "(--set " in message:
        return message
    for item in getattr(args, "overrides", None) or getattr(args, "grid", None) or ():
        key = item.split("=", 1)[0].strip()
        if f": {key}: " in message:
            return message.replace(f": {key}: ", f" (--set {key}): {key}: ", 1)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    args = argparse.Namespace()
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.simplefilter("default", TpusimWarning)
            warnings.showwarning = _show_warning
            return args.handler(args)
    except ConfigError as exc:
        print(f"tpusim: error: {_name_the_set_flag(str(exc), args)}", file=sys.stderr)
        return EXIT_USAGE
    except TpusimError as exc:
        print(f"tpusim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tpusim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED  # the process entry (tpusim.__main__) exits at once after this
    except BrokenPipeError:
        # The reader of stdout went away (`tpusim check m.onnx | head`): nothing more to say to it.
        sys.stdout = None
        return 0


if __name__ == "__main__":
    sys.exit(main())
