r"""The synthetic domain-adaptation table: does the method adapt?

Trains and evaluates, on the embedded synthetic two-domain dataset, the small-scale
analogue of the paper's main table: target-supervised (oracle), source-only, UDA
(pseudo labels, ClassMix and contrastive, no weak label), the method with image, point
and coarse labels, and the ablation coarse without the contrastive losses. Stage-2
runs start from the same seed's source-only checkpoint, as in the paper's recipe.

    python -m wsda_jax.tools.experiments.synthetic_table --seeds=3 --outdir=runs/synthetic_table

Writes `OUTDIR/table.md` (target-val mIoU of student and teacher, mean and standard
deviation over seeds, per-class IoU in an appendix), `OUTDIR/chart.png` and
`OUTDIR/results.json`. Each finished run's small result is also copied to
`--results_dir` (committed under docs/results/, so a finished run survives a new
machine); a run whose result is in either place is skipped, and an interrupted run
resumes from its latest checkpoint, so the command can simply be started again.
`--smoke` runs the few-step `tiny` configs (CI). `--report_only` trains nothing: it
writes the table and chart of the runs already finished (a partial table while runs
are still going, e.g. `--report_only --results_dir=docs/results/synthetic`).

Variant groups (`--variants`): the table (oracle ... coarse_no_contrast), the
cumulative component ablation of coarse labels (ablation_uda -> ablation_weak_ce ->
coarse_no_contrast -> ablation_intra -> coarse), and the long schedule (coarse_long,
coarse_long_no_contrast: 2,400 stage-2 steps, contrastive terms from step 160 = 1/15),
and coarse_every_class (synthesised coarse labels that keep thin classes, to compare
with point labels). The tries after the long schedule: coarse_long_ramp (contrastive
weights ramped up over 800 steps) and coarse_long_warm (from source_only_warm, a stage 1
that also trains the projection head on the source intra-domain contrastive loss).
Group `beyond` (`--variants=beyond`): the method as it is now (beyond_coarse,
beyond_point) and with the options beyond the reference, rare class sampling (_rcs),
masked image consistency (_mic), both (_all), and without the learning-rate warm-up
(_no_warmup), for coarse and point labels (docs/beyond_reference.md).
Group `daformer` (`--variants=daformer`): DAFormer's one-stage recipe on a small MiT +
DAFormer head (`configs/synthetic_*.py:daformer`, no stage 1), with the method's losses
(daformer_coarse, daformer_point), without the contrastive ones (_no_contrast) and with
masked image consistency (_mic), beside the ResNet-18 method rows beyond_coarse and
beyond_point (docs/daformer.md), and the two networks' bounds: oracle and source_only
(ResNet-18), mit_oracle and mit_source_only (the small MiT, `:mit`). The table also
gives the rarest classes' IoU.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from wsda_jax import classes, cli_errors  # noqa: E402

NO_CONTRAST = {"loss.use_contrast": False}
NO_IMAGE_LEVEL = {"loss.im_u": 0.0, "loss.im_proto": 0.0}
# The reference switches the contrastive terms on at 1/15 of its steps (10k of 150k).
LONG = {"num_steps": 2400, "loss.contrast_start": 160}
# Variant -> (config module, stage-2 overrides). Order is the table's row order.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "oracle": ("configs.synthetic_oracle", {}),
    "source_only": ("configs.synthetic_source_only", {}),
    "uda": ("configs.synthetic_uda", {}),
    "image": ("configs.synthetic_image", {}),
    "point": ("configs.synthetic_point", {}),
    "coarse": ("configs.synthetic_coarse", {}),
    "coarse_no_contrast": ("configs.synthetic_coarse", NO_CONTRAST),
    # Cumulative ablation (coarse labels), each row adds one component to the one above:
    # ClassMix + pseudo labels; + weak-label CE; + image-level losses (=
    # coarse_no_contrast); + intra-domain contrastive; + inter-domain (= coarse).
    "ablation_uda": ("configs.synthetic_uda", NO_CONTRAST),
    "ablation_weak_ce": ("configs.synthetic_coarse", {**NO_CONTRAST, **NO_IMAGE_LEVEL}),
    "ablation_intra": ("configs.synthetic_coarse", {"loss.inter": 0.0}),
    # Coarse labels that keep every class of the image (thin classes too), vs. point.
    "coarse_every_class": ("configs.synthetic_coarse", {"data.synthetic.coarse": "every_class"}),
    "coarse_long": ("configs.synthetic_coarse", LONG),
    "coarse_long_no_contrast": ("configs.synthetic_coarse", {**LONG, **NO_CONTRAST}),
    # The next try if the long schedule does not close the gap: the contrastive weights
    # ramp up over the first third of the schedule instead of switching on at once.
    "coarse_long_ramp": ("configs.synthetic_coarse", {**LONG, "loss.contrast_ramp_steps": 800}),
    # The other try: a projection head warmed up in stage 1 (intra_src on the source).
    "source_only_warm": ("configs.synthetic_source_only", {"loss.source_only_contrast": True}),
    "coarse_long_warm": ("configs.synthetic_coarse", LONG),
}
# Options beyond the reference (docs/beyond_reference.md), each alone and together, for
# coarse and point labels: rare class sampling, masked image consistency, and the
# learning-rate warm-up measured by removing it (the reference has one).
BEYOND_OPTIONS = {
    "": {},
    "_rcs": {"data.rare_class_sampling.enabled": True},
    "_mic": {"mic.enabled": True},
    "_no_warmup": {"optim.warmup_steps": 0},
    "_all": {"data.rare_class_sampling.enabled": True, "mic.enabled": True},
}
for _label in ("coarse", "point"):
    for _suffix, _overrides in BEYOND_OPTIONS.items():
        VARIANTS[f"beyond_{_label}{_suffix}"] = (f"configs.synthetic_{_label}", _overrides)
# DAFormer's recipe (`:daformer`, one stage from scratch on a small MiT), with the method's
# losses, without the contrastive ones, and with MIC (docs/daformer.md).
DAFORMER_OPTIONS = {"": {}, "_no_contrast": NO_CONTRAST, "_mic": {"mic.enabled": True}}
for _label in ("coarse", "point"):
    for _suffix, _overrides in DAFORMER_OPTIONS.items():
        VARIANTS[f"daformer_{_label}{_suffix}"] = (
            f"configs.synthetic_{_label}:daformer",
            _overrides,
        )
# The bounds of the small MiT at this scale (`:mit`: its network and optimiser, the
# stage's own schedule): supervised on the target's labels, and on the source's only.
VARIANTS["mit_oracle"] = ("configs.synthetic_oracle:mit", {})
VARIANTS["mit_source_only"] = ("configs.synthetic_source_only:mit", {})
TABLE = ("oracle", "source_only", "uda", "image", "point", "coarse", "coarse_no_contrast")
# Names --variants accepts for several variants at once.
GROUPS = {
    "table": TABLE,
    "beyond": tuple(v for v in VARIANTS if v.startswith("beyond_")),
    "daformer": (
        "oracle",
        "mit_oracle",
        "source_only",
        "mit_source_only",
        "beyond_coarse",
        "beyond_point",
        *(v for v in VARIANTS if v.startswith("daformer_")),
    ),
}
STAGE_ONE = ("oracle", "source_only", "source_only_warm", "mit_oracle", "mit_source_only")
# The synthetic source's rarest classes (docs/beyond_reference.md, class_frequencies).
RARE_CLASSES = ("traffic sign", "traffic light", "motorcycle", "bicycle", "pole")
# The stage-1 variant a stage-2 variant starts from, where it is not source_only.
INIT_FROM = {"coarse_long_warm": "source_only_warm"}

_SEEDS = flags.DEFINE_integer("seeds", 3, "Number of seeds (0, 1, ...).")
_OUTDIR = flags.DEFINE_string("outdir", "runs/synthetic_table", "Where runs and the table go.")
_VARIANTS = flags.DEFINE_list(
    "variants", list(TABLE), "Variants or groups (table, beyond, daformer) to run (docstring)."
)
_RESULTS_DIR = flags.DEFINE_string(
    "results_dir", "", "Also keep each finished run's result.json here (e.g. docs/results)."
)
_SMOKE = flags.DEFINE_bool("smoke", False, "Few-step tiny configs (a CI check, not a result).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared-dataset directory (config default).")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Train nothing: table and chart of the finished runs only."
)


def make_config(
    variant: str, seed: int, outdir: str, smoke: bool, data_dir: str | None = None
) -> ml_collections.ConfigDict:
    """The config of one run; stage-2 variants start from that seed's `stage_one_of` run.

    A variant's module may name a config variant after a colon ('...:daformer')."""
    module_name, _, arg = VARIANTS[variant][0].partition(":")
    arg = ",".join(name for name in (arg, "tiny" if smoke else "") if name)
    config = importlib.import_module(module_name).get_config(arg or None)
    config.seed = seed
    if data_dir:
        config.data.data_dir = data_dir
    config.update_from_flattened_dict(VARIANTS[variant][1])
    if needs_stage_one(variant):
        config.init.init_from = run_dir(outdir, stage_one_of(variant), seed)
    return config


def needs_stage_one(variant: str) -> bool:
    """Whether the variant starts from a stage-1 run (not one itself, not one-stage)."""
    return variant not in STAGE_ONE and not VARIANTS[variant][0].endswith(":daformer")


def stage_one_of(variant: str) -> str:
    """The stage-1 variant whose checkpoint a stage-2 variant starts from."""
    return INIT_FROM.get(variant, "source_only")


def run_dir(outdir: str, variant: str, seed: int) -> str:
    return os.path.join(os.path.abspath(outdir), f"{variant}_seed{seed}")


def _kept_result(variant: str, seed: int, results_dir: str) -> str:
    return os.path.join(results_dir, f"{variant}_seed{seed}.json")


def finished_result(
    variant: str, seed: int, outdir: str, results_dir: str = ""
) -> dict[str, Any] | None:
    """The result of a finished run, from its workdir or from `results_dir`; else None."""
    paths = [os.path.join(run_dir(outdir, variant, seed), "result.json")]
    if results_dir:
        paths.append(_kept_result(variant, seed, results_dir))
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return None


def run_variant(
    variant: str,
    seed: int,
    outdir: str,
    smoke: bool,
    data_dir: str | None = None,
    results_dir: str = "",
) -> dict[str, Any]:
    """Trains one run (or resumes it) and returns its final report plus wall time.

    A stage-2 run whose stage-1 checkpoint is gone (its result kept elsewhere, a new
    machine) first retrains that seed's stage-1 run (`stage_one_of`), which is
    deterministic.
    """
    result = finished_result(variant, seed, outdir, results_dir)
    if result is not None:
        return result
    from wsda_jax import train  # Imported late: JAX starts only when a run is needed.

    if needs_stage_one(variant):
        source_dir = run_dir(outdir, stage_one_of(variant), seed)
        if not os.path.exists(os.path.join(source_dir, "result.json")):
            config = make_config(stage_one_of(variant), seed, outdir, smoke, data_dir)
            train.train_and_evaluate(config, source_dir)
    workdir = run_dir(outdir, variant, seed)
    # A resumed run's time counts only its last part: the table leaves it out.
    resumed = any(name.isdigit() for name in _listdir(os.path.join(workdir, "checkpoints")))
    start = time.time()
    report = train.train_and_evaluate(make_config(variant, seed, outdir, smoke, data_dir), workdir)
    result = {"variant": variant, "seed": seed, "seconds": time.time() - start, **report}
    if resumed:
        result["resumed"] = True
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    if results_dir:
        os.makedirs(results_dir, exist_ok=True)
        with open(_kept_result(variant, seed, results_dir), "w") as f:
            json.dump(result, f, indent=2)
    return result


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def _mean_std(values: Sequence[float]) -> str:
    values = np.asarray([v for v in values if v is not None], np.float64) * 100
    if values.size == 0:
        return "n/a"
    if values.size == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def _models(result: dict[str, Any]) -> list[str]:
    return [name for name in ("student", "teacher") if name in result]


def format_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: mIoU (mean ± std over seeds, in %) per variant, then per-class IoU."""
    lines = [
        "| variant | student mIoU | teacher mIoU | per seed (student) | seeds | minutes per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    results = {variant: runs for variant, runs in results.items() if runs}
    for variant, runs in results.items():
        student = _mean_std([r["student"]["miou"] for r in runs])
        teacher = _mean_std([r["teacher"]["miou"] for r in runs if "teacher" in r])
        per_seed = ", ".join(f"{100 * r['student']['miou']:.1f}" for r in runs)
        whole = [r["seconds"] for r in runs if not r.get("resumed")]
        minutes = f"{np.mean(whole) / 60:.1f}" if whole else "n/a"
        if len(whole) < len(runs):
            minutes += f" ({len(runs) - len(whole)} resumed left out)"
        lines.append(
            f"| {variant} | {student} | {teacher} | {per_seed} | {len(runs)} | {minutes} |"
        )
    lines += ["", "Per-class IoU (%, student, mean over seeds):", ""]
    names = list(classes.CLASS_NAMES)
    present = [
        n
        for n in names
        if any(r["student"]["iou"].get(n) is not None for runs in results.values() for r in runs)
    ]
    lines.append("| variant | " + " | ".join(present) + " |")
    lines.append("| --- " * (len(present) + 1) + "|")
    for variant, runs in results.items():
        cells = []
        for name in present:
            values = [
                r["student"]["iou"][name] for r in runs if r["student"]["iou"][name] is not None
            ]
            cells.append(f"{100 * np.mean(values):.1f}" if values else "n/a")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "The rarest source classes, IoU (%, student, mean ± std over seeds):", ""]
    lines.append("| variant | " + " | ".join(RARE_CLASSES) + " | seeds |")
    lines.append("| --- " * (len(RARE_CLASSES) + 2) + "|")
    for variant, runs in results.items():
        cells = [_mean_std([r["student"]["iou"].get(name) for r in runs]) for name in RARE_CLASSES]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines) + "\n"


def plot_chart(results: dict[str, list[dict[str, Any]]], path: str) -> None:
    """Bar chart of student and teacher target mIoU, error bars = std over seeds."""
    variants = [variant for variant, runs in results.items() if runs]
    figure, axis = plt.subplots(figsize=(1.3 * len(variants) + 2, 3.5))
    positions = np.arange(len(variants))
    for offset, model in ((-0.2, "student"), (0.2, "teacher")):
        # Stage-1 runs have no teacher: no bar (NaN) rather than a bar at zero.
        means, stds = [], []
        for variant in variants:
            values = [100 * r[model]["miou"] for r in results[variant] if model in r]
            means.append(np.mean(values) if values else np.nan)
            stds.append(np.std(values, ddof=1) if len(values) > 1 else np.nan)
        axis.bar(positions + offset, means, 0.4, yerr=stds, label=model, capsize=3)
    axis.set_xticks(positions, variants, rotation=20)
    axis.set_ylabel("target val mIoU (%)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def expand_groups(names: Sequence[str]) -> list[str]:
    """`names` with each GROUPS name replaced by its variants, duplicates dropped."""
    expanded = [v for name in names for v in GROUPS.get(name, (name,))]
    return list(dict.fromkeys(expanded))


def run_table(
    variants: Sequence[str],
    seeds: int,
    outdir: str,
    smoke: bool = False,
    data_dir: str | None = None,
    results_dir: str = "",
    report_only: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Runs every (variant, seed) not yet finished; writes table.md, chart.png, results.json.

    With `report_only`, runs nothing and reports the finished runs (missing ones logged).
    """
    variants = expand_groups(variants)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    needed = {stage_one_of(v) for v in variants if needs_stage_one(v)}
    order = [v for v in VARIANTS if v in variants or v in needed]
    if report_only:  # Rows in the order asked for.
        order = list(dict.fromkeys(variants))
    os.makedirs(outdir, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in order}
    for seed in range(seeds):
        for variant in order:
            if report_only:
                result = finished_result(variant, seed, outdir, results_dir)
                if result is None:
                    logging.info("Not finished: %s, seed %d.", variant, seed)
                else:
                    results[variant].append(result)
                continue
            logging.info("Run %s, seed %d.", variant, seed)
            results[variant].append(
                run_variant(variant, seed, outdir, smoke, data_dir, results_dir)
            )
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(outdir, "table.md"), "w") as f:
        f.write(format_table(results))
    plot_chart(results, os.path.join(outdir, "chart.png"))
    return results


def main(argv: Sequence[str]) -> None:
    del argv
    run_table(
        _VARIANTS.value,
        _SEEDS.value,
        _OUTDIR.value,
        smoke=_SMOKE.value,
        data_dir=_DATA_DIR.value,
        results_dir=_RESULTS_DIR.value,
        report_only=_REPORT_ONLY.value,
    )
    with open(os.path.join(_OUTDIR.value, "table.md")) as f:
        print(f.read())


if __name__ == "__main__":
    cli_errors.run_tool(main)
