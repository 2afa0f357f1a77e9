"""The ``sharelora`` command: make a share plan, count parameters, show a saved plan.

::

    sharelora plan --config recipes/smollm2_sharelora.yml          # calibrate only (no training), write the plan
    sharelora plan --matrix outputs/smollm2_sharelora/sharelora_plan.json --threshold 0.8,0.85,0.9   # sweep
    sharelora plan --matrix similarity.csv --strategy optimal --contiguous --json
    sharelora plan --matrix outputs/smollm2_sharelora/sharelora_plan.json --threshold 0.85,0.9 --stability
    sharelora params --model-config configs/llama-7b.json --lora-r 8 \\
        --share-sets '[[16,17],[18,19],[20,21,22],[23,24,25,26,27],[28,29,30]]' --rank 9
    sharelora show outputs/smollm2_sharelora/sharelora_plan.json

Parameter counts come from the real PEFT model built on the ``meta`` device (no weights are allocated, so a
7B architecture takes seconds): LoRA is injected, the share sets are tied with the plugin's own
:func:`~sharelora_plugin.tying.tie_lora_modules`, and the distinct LoRA tensors inside the decoder layers are
counted, exactly what the plugin records in ``sharelora_plan.json``.

A problem with the user's input (a bad matrix, overlapping sets, a missing file, an invalid YAML value) is
printed as ``sharelora: error: <message>`` and the exit status is 2, like argparse's own usage errors.
Heavy libraries (torch, transformers, PEFT, Axolotl) are imported only by the commands that need them, so
``plan --matrix`` without ``--model-config``/``--output-dir`` runs on numpy and scipy alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import yaml
from pydantic import ValidationError

from sharelora_plugin.params import (
    DEFAULT_TARGET_MODULES,
    count_lora_parameters,
    load_model_config,
    parse_target_modules,
)
from sharelora_plugin.plan_command import run_plan
from sharelora_plugin.planning import METRICS, STRATEGIES, PlanError, SharePlan, validate_share_sets
from sharelora_plugin.planning.rules import DEFAULT_RANK as DEFAULT_LORA_R
from sharelora_plugin.planning.rules import DEFAULT_RESAMPLES, DEFAULT_SEED
from sharelora_plugin.reports import PROG, params_line, print_json, show_text

EXIT_USAGE = 2


# --------------------------------------------------------------------------------------------------------------------
# Argument parsing


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(
            f"expected a number or a comma list of numbers (e.g. 0.85 or 0.8,0.85,0.9); got {text!r}"
        )
    return values


def _share_sets(text: str) -> list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"expected JSON like '[[16,17],[18,19,20]]'; got {text!r} ({err.msg})"
        ) from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list of lists of layer indices; got {text!r}")
    return value


def _argument(convert, accept, expected: str):
    """An argparse ``type``: ``convert`` the text, then ``accept`` the value, else "expected <expected>"."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return value

    return parse


_positive_int = _argument(int, lambda value: value >= 1, "a positive integer")
_number = _argument(float, math.isfinite, "a finite number")


def _add_rank_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--rank-expansion",
        action="store_true",
        help="ShareLoRA rank r' = floor(L / (L - sum|S_i| + |S|) * r) (paper's rank expansion)",
    )
    group.add_argument(
        "--rank", type=_positive_int, help="explicit ShareLoRA rank (the paper's runs used 9 with lora_r 8)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``sharelora`` argument parser (subcommands ``plan``, ``params``, ``show``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ShareLoRA: plan which decoder layers share LoRA modules, count parameters, show plans.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{plan,params,show}")

    plan = commands.add_parser(
        "plan",
        help="make a share plan from an Axolotl YAML (calibration only, no training) or a similarity matrix",
        description="Make a share plan. --config calibrates the YAML's base model (no training) and writes "
        "sharelora_plan.json and the heatmap to --output-dir or the YAML's output_dir; --matrix plans from an "
        "existing sharelora_plan.json or an L x L CSV without loading any model.",
    )
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="Axolotl YAML with a sharelora: block (loads the base model)")
    source.add_argument(
        "--matrix", help="sharelora_plan.json (its similarity) or an L x L CSV of similarities"
    )
    plan.add_argument(
        "--threshold",
        type=_thresholds,
        help="ε, or a comma list for a sweep table (default: the YAML's / the plan file's / 0.85)",
    )
    plan.add_argument("--strategy", choices=STRATEGIES, help="how share sets are chosen (default greedy)")
    plan.add_argument(
        "--contiguous", action="store_true", help="optimal only: sets are runs of adjacent layers"
    )
    plan.add_argument("--share-sets", type=_share_sets, help="strategy manual: JSON list of sets")
    plan.add_argument("--target-fraction", type=_number, help="choose ε so ShareLoRA keeps <= this fraction")
    plan.add_argument("--metric", choices=METRICS, help="similarity the threshold applies to")
    plan.add_argument("--seed", type=int, help=f"strategy random: seed (default {DEFAULT_SEED})")
    _add_rank_options(plan)
    plan.add_argument(
        "--lora-r", type=_positive_int, help="--matrix: base LoRA rank (default: the plan's or 8)"
    )
    plan.add_argument("--model-config", help="--matrix: architecture config for real parameter counts")
    plan.add_argument(
        "--target-modules",
        help=f"--matrix with --model-config: LoRA targets (default {DEFAULT_TARGET_MODULES})",
    )
    plan.add_argument(
        "--stability",
        action="store_true",
        help="--matrix: bootstrap each plan over the per-sample calibration file (sharelora_calibration.npz "
        "beside the plan file, or --calibration) and print how often each set comes back; no model is loaded",
    )
    plan.add_argument("--calibration", help="--matrix: the per-sample .npz (default: beside --matrix)")
    plan.add_argument(
        "--confidence",
        type=_number,
        help="robust planning: a pair is similar only when its lower bootstrap bound at this confidence clears ε",
    )
    plan.add_argument(
        "--resamples", type=int, help=f"bootstrap resamples (default {DEFAULT_RESAMPLES}, or the plan file's)"
    )
    plan.add_argument(
        "--bootstrap-seed",
        type=int,
        help="bootstrap seed (default: the plan file's, else the calibration seed)",
    )
    plan.add_argument("--output-dir", help="write sharelora_plan.json and the heatmap here")
    plan.add_argument("--json", action="store_true", help="print the plan (a list for a sweep) as JSON")
    plan.set_defaults(handler=run_plan)

    params = commands.add_parser(
        "params",
        help="count LoRA vs ShareLoRA parameters of an architecture (meta device, no weights)",
        description="Count trainable LoRA parameters of plain LoRA and of ShareLoRA with the given share sets. "
        "The model is built on the meta device, so a 7B architecture takes seconds.",
    )
    params.add_argument("--model-config", required=True, help="config JSON (see configs/) or a model folder")
    params.add_argument("--lora-r", type=_positive_int, default=DEFAULT_LORA_R, help="LoRA rank (default 8)")
    params.add_argument(
        "--target-modules",
        default=DEFAULT_TARGET_MODULES,
        help="comma list, or all-linear (default %(default)s)",
    )
    params.add_argument("--share-sets", type=_share_sets, default=[], help="JSON list of share sets")
    params.add_argument("--layers-path", help="dotted path of the decoder layer list, if ambiguous")
    _add_rank_options(params)
    params.add_argument("--json", action="store_true", help="print the counts as JSON")
    params.set_defaults(handler=_cmd_params)

    show = commands.add_parser(
        "show", help="print a saved plan's summary", description="Summarise a plan file."
    )
    show.add_argument("plan_file", metavar="PLAN_JSON", help="a sharelora_plan.json")
    show.add_argument("--json", action="store_true", help="print the plan as JSON")
    show.set_defaults(handler=_cmd_show)
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Commands


def _cmd_params(args: argparse.Namespace) -> int:
    count = count_lora_parameters(
        load_model_config(args.model_config),
        parse_target_modules(args.target_modules),
        lora_r=args.lora_r,
        share_sets=args.share_sets,
        rank=args.rank,
        rank_expansion=args.rank_expansion,
        layers_path=args.layers_path,
    )
    if args.json:
        print_json(count.to_dict())
        return 0
    sets = validate_share_sets(args.share_sets, count.num_layers)
    print(f"model config: {args.model_config} ({count.architecture}, {count.num_layers} decoder layers)")
    print(f"target modules: {', '.join(count.target_modules)}")
    print(f"share sets: {json.dumps(sets) if sets else 'none'}")
    print(params_line(count))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    plan = SharePlan.load(args.plan_file)
    if args.json:
        print_json(plan.to_dict())
    else:
        print(show_text(plan))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def _error_message(err: BaseException) -> str:
    if isinstance(err, ValidationError):
        parts = []
        for problem in err.errors():
            where = ".".join(str(item) for item in problem.get("loc", ()))
            message = str(problem.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{where}: {message}" if where else message)
        return "; ".join(parts)
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"file not found: {err.filename}"
    return str(err)


USER_ERRORS = (PlanError, ValidationError, ValueError, FileNotFoundError, OSError, yaml.YAMLError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sharelora`` command; returns the exit status (0, or 2 for a usage or input error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        print(f"{PROG}: error: {_error_message(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
