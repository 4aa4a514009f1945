"""``evaluate.py`` / ``cheapnet-evaluate``: evaluate a checkpoint on a DAGM folder, or time it.

    python evaluate.py --checkpoint ../shared/torch-checkpoints/CheapNet_G32.pkl \
        --data ../shared/dagm-samples/Class6/Train --json out/g32.json

Without --checkpoint, an untrained model of --variant/--features is evaluated (a smoke run of
the whole pipeline). ``--data synthetic`` writes a small DAGM-like synthetic folder and uses it.
Every default comes from `EvaluationRequest`, whose field names are the flags' ``dest``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jax

from cheapnet_jax import cli, layouts, tfds_data
from cheapnet_jax.calibration import CalibrationData, Setting, calibrate, write_calibration
from cheapnet_jax.checkpoints import (
    AUTHORS_NORMALIZATION,
    LoadedModel,
    calibration_path,
    load_checkpoint,
    population_members,
)
from cheapnet_jax.detection import INFERENCE_DTYPES
from cheapnet_jax.errors import SettingsError
from cheapnet_jax.evaluation import EvaluationStopped, default_batch_size, evaluate_folder
from cheapnet_jax.files import write_atomic
from cheapnet_jax.flops import count_params, paper_gflops, xla_gflops
from cheapnet_jax.inspection import Inspector, InspectorOptions, normalization_setting
from cheapnet_jax.model import VARIANTS, CheapNet, init_variables
from cheapnet_jax.synthetic import protocol_defect_free, write_dagm_folder


@dataclass(frozen=True)
class EvaluationRequest:
    """What `evaluate.py` was asked to do (the parsed command line)."""

    checkpoint: str | None = None
    data_source: str = "synthetic"
    defect_classes: tuple[str, ...] = ()  # an annotated layout's defect classes (empty: all)
    json_path: str | None = None
    csv_path: str | None = None  # a population's table of members
    features: int = 2
    # None: the checkpoint's statistics, else the authors' Class 6
    normalization: tuple[float, float] | None = None
    threshold: float = 0.5
    batch_size: int | None = None
    impl: str = "auto"
    image_size: int | None = None  # synthetic data: None = the training size, else 256
    progress: bool = True
    dtype: str = "float32"
    calibrate: bool = False
    target_fpr: float | None = None
    target_tpr: float | None = None


def load_model(request: EvaluationRequest) -> LoadedModel:
    """The request's checkpoint (see `load_checkpoint`), or an untrained model without one."""
    if request.checkpoint is None:
        model = CheapNet(request.features, impl=request.impl)
        variables = init_variables(model, jax.random.key(0))
        return LoadedModel(model, variables, f"untrained CheapNet(G={request.features}), seed 0")
    return load_checkpoint(request.checkpoint, request.impl)


def format_table(figures: Mapping[str, object]) -> str:
    """The figures as an aligned two-column text table."""
    rows = [
        ("params", f"{figures['params']:,}"),
        ("GFLOPs (XLA, per image)", f"{figures['gflops']:.4f}"),
        ("GFLOPs (paper, thop)", f"{figures['gflops_paper']:.4f}"),
        ("images", str(figures["images"])),
        ("mIoU", f"{figures['miou']:.4f}"),
        ("IoU background", f"{figures['iou_background']:.4f}"),
        ("IoU defect", f"{figures['iou_defect']:.4f}"),
        ("mAcc", f"{figures['macc']:.4f}"),
        ("pixel accuracy", f"{figures['pixel_acc']:.4f}"),
        ("mAP (paper protocol)", f"{figures['map_paper']:.4f}"),
        ("AP50 (paper protocol)", f"{figures['ap50_paper']:.4f}"),
        ("mAP (components)", f"{figures['map_component']:.4f}"),
        ("AP50 (components)", f"{figures['ap50_component']:.4f}"),
        ("predicted components", str(figures["predicted_components"])),
    ]
    if "image_level" in figures:
        rows += _image_level_rows(figures["image_level"])
    width = max(len(name) for name, _ in rows)
    table = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    if "image_level_per_class" in figures:
        table += "\n\n" + _per_class_table(figures["image_level_per_class"])
    return table


def _per_class_table(per_class: Mapping[str, Mapping]) -> str:
    """Image-level figures per DAGM class, one row each (as the published DAGM tables)."""

    def figure(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = ["class  defective  good  TPR     FPR     AUROC   AP"]
    for class_id, f in per_class.items():
        rates = [figure(f[k]) for k in ("detection_rate", "false_alarm_rate", "auroc", "ap")]
        lines.append(
            f"{class_id:<5}  {f['defective_images']:<9}  {f['good_images']:<4}  "
            + "  ".join(f"{r:<6}" for r in rates).rstrip()
        )
    return "\n".join(lines)


def _image_level_rows(image_level: Mapping) -> list[tuple[str, str]]:
    def figure(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    verdicts = image_level["verdicts"]
    return [
        (
            "images: defective / good",
            f"{image_level['defective_images']} / {image_level['good_images']}",
        ),
        ("detection rate (TPR)", figure(image_level["detection_rate"])),
        ("false alarm rate (FPR)", figure(image_level["false_alarm_rate"])),
        ("image AUROC (max probability)", figure(image_level["auroc"])),
        ("image AP (max probability)", figure(image_level["ap"])),
        ("verdicts TP / FN / FP / TN", "{tp} / {fn} / {fp} / {tn}".format(**verdicts)),
    ]


# --data synthetic: defective test images, then defect-free ones for the image-level figures
SYNTHETIC_DEFECTIVE, SYNTHETIC_GOOD = 16, 8


def run_evaluation(request: EvaluationRequest) -> int:
    """Evaluate, print the table, write JSON if asked; returns the process exit status. A
    population workdir: each member (`run_population_evaluation`)."""
    if request.calibrate and request.checkpoint is None:
        raise SettingsError("--calibrate needs --checkpoint: the calibration is stored with it")
    if not request.calibrate and (request.target_fpr, request.target_tpr) != (None, None):
        raise SettingsError("--target-fpr and --target-tpr choose a calibration: add --calibrate")
    members = population_members(request.checkpoint) if request.checkpoint else None
    if members is not None:
        return run_population_evaluation(request, members)
    if request.csv_path:
        raise SettingsError("--csv writes a population's table of members: --checkpoint is one")
    return evaluate_checkpoint(request)[0]


MEMBER_COLUMNS = {
    "images": "images",
    "miou": "mIoU",
    "iou_defect": "IoU defect",
    "map_component": "mAP (components)",
    "map_paper": "mAP (paper)",
    "detection_rate": "TPR",
    "false_alarm_rate": "FPR",
    "auroc": "AUROC",
}
"""A population's table: each member's figures (the paper's per-class table), by column."""


def member_row(figures: Mapping) -> dict:
    """A member's row of `MEMBER_COLUMNS` (image-level figures None without good images)."""
    image_level = figures.get("image_level", {})
    return {key: figures.get(key, image_level.get(key)) for key in MEMBER_COLUMNS}


def mean_row(rows: list[dict]) -> dict:
    """The members' mean of each column (over the members that have it)."""
    mean = {}
    for key in MEMBER_COLUMNS:
        values = [row[key] for row in rows if row[key] is not None]
        mean[key] = sum(values) / len(values) if values else None
    return mean


def format_members(rows: dict[str, dict]) -> str:
    """The population's table: a row per member and their mean."""

    def cell(value) -> str:
        if value is None:
            return "n/a"
        return str(value) if isinstance(value, int) else f"{value:.4f}"

    table = [["member", *MEMBER_COLUMNS.values()]]
    table += [[name, *(cell(row[key]) for key in MEMBER_COLUMNS)] for name, row in rows.items()]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in table)  # fmt: skip


def run_population_evaluation(request: EvaluationRequest, members: Mapping[str, Path]) -> int:
    """Each member of a population workdir evaluated (and calibrated, with ``--calibrate``)
    as its own run folder would be (``--data validation``: its own held-out split), then the
    members' table with their mean, printed and written as JSON and CSV if asked."""
    figures, status = {}, 0
    for name, folder in members.items():
        print(f"--- member {name}")
        member = dataclasses.replace(request, checkpoint=str(folder), json_path=None)
        code, figures[name] = evaluate_checkpoint(member)
        status = max(status, code)
    rows = {name: member_row(f) for name, f in figures.items()}
    rows["mean"] = mean_row(list(rows.values()))
    print(f"--- population {request.checkpoint} on {request.data_source}")
    print(format_members(rows))
    if request.json_path:
        document = {"members": figures, "mean": rows["mean"]}
        write_report(request.json_path, json.dumps(document, indent=2) + "\n")
    if request.csv_path:
        table = io.StringIO(newline="")
        writer = csv.writer(table)
        writer.writerow(["member", *MEMBER_COLUMNS])
        for name, row in rows.items():
            writer.writerow([name, *("" if row[k] is None else row[k] for k in MEMBER_COLUMNS)])
        write_report(request.csv_path, table.getvalue())
    return status


def write_report(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole (its folder made), and say so."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    print(f"wrote {path}")


def evaluate_checkpoint(request: EvaluationRequest) -> tuple[int, dict]:
    """One checkpoint's evaluation: its table printed, JSON written if asked, calibrated with
    ``--calibrate``; returns the exit status and the figures."""
    loaded = load_model(request)
    model, variables, source = loaded.model, loaded.variables, loaded.source
    calibration_data = CalibrationData() if request.calibrate else None
    # The figures of a fixed threshold and no minimum area, whatever the calibration.
    inspector = Inspector(
        loaded,
        {
            "threshold": Setting(request.threshold, "given"),
            "min_area": Setting(0, "given"),
            "normalization": normalization_setting(request.normalization, loaded),
        },
        InspectorOptions(
            batch_size=request.batch_size or default_batch_size(model.features),
            dtype=request.dtype,
        ),
    )
    normalization = inspector.normalization
    with tempfile.TemporaryDirectory() as scratch:
        folder = request.data_source
        if folder == "validation":
            folder = run_validation(loaded, Path(scratch))
        elif tfds_data.is_tfds(folder):
            folder = tfds_data.evaluation_split(folder)
        elif folder == "synthetic":
            size = request.image_size or loaded.image_size or 256
            folder = write_dagm_folder(
                Path(scratch) / "synthetic",
                count=SYNTHETIC_DEFECTIVE,
                size=size,
                defect_free=SYNTHETIC_GOOD,
                # calibration chooses on validation data, never on the test images
                split="validation" if request.calibrate else "test",
            )
        stopped = None
        try:
            results = evaluate_folder(
                inspector,
                folder,
                progress=request.progress,
                calibration=calibration_data,
                defect_classes=request.defect_classes,
            )
        except EvaluationStopped as err:
            if err.partial is None:
                raise
            results, stopped = err.partial, str(err)
    height, width = results.pop("image_size")
    figures = {
        "checkpoint": source,
        "data": str(request.data_source),
        "features": model.features,
        "normalization": {"mean": normalization.mean, "std": normalization.std},
        "dtype": request.dtype,
        "params": count_params(variables),
        "gflops": xla_gflops(model, variables, height, width),
        "gflops_paper": paper_gflops(model.features, height, width),
        "image_size": [height, width],
        **results,
    }
    if stopped:
        figures["incomplete"] = stopped
    print(f"CheapNet(G={model.features}) from {source} on {request.data_source}")
    print(format_table(figures))
    if request.json_path:
        write_report(request.json_path, json.dumps(figures, indent=2) + "\n")
    if stopped:
        print(f"error: {stopped}; the figures above cover those images only", file=sys.stderr)
        return 1, figures
    if calibration_data is not None:
        store_calibration(request, calibration_data, source)
    return 0, figures


def run_validation(loaded: LoadedModel, scratch: Path) -> Path | list | tfds_data.RecordSplit:
    """``--data validation``: the validation split the checkpoint's training run held out
    (re-derived from its config: data, classes, protocol, seed); synthetic data is written to
    ``scratch`` as a DAGM folder."""
    config = loaded.training
    if config is None:
        raise SettingsError(
            "--data validation needs a training workdir as --checkpoint (its config.json says "
            "which images the run held out)"
        )
    protocol = config.get("protocol", "paper")
    if tfds_data.is_tfds(config["data"]):
        return tfds_data.training_splits(config["data"], protocol, config["seed"])[1]
    if config["data"] == "synthetic":
        count = config["synthetic_validation"]
        return write_dagm_folder(
            scratch / "validation",
            count=count,
            size=config["image_size"],
            seed=config["seed"],
            defect_free=protocol_defect_free(count, protocol),
            split="validation",
        )
    splits, _ = layouts.training_splits(
        config["data"],
        list(config["classes"]),
        protocol,
        config["seed"],
        tuple(config.get("defect_classes", ())),
    )
    return splits["validation"]


def store_calibration(request: EvaluationRequest, data: CalibrationData, source: str) -> None:
    """Choose the threshold and minimum area, store them with the checkpoint, say so."""
    chosen = calibrate(data, request.target_fpr, request.target_tpr)
    path = calibration_path(request.checkpoint)
    written = write_calibration(path, chosen, checkpoint=source, data=str(request.data_source))
    print(
        f"calibrated ({chosen['objective']}, {chosen['images']['defective']} defective and "
        f"{chosen['images']['good']} good images): threshold {chosen['threshold']}, "
        f"min area {chosen['min_area']} -> detection rate {chosen['tpr']:.4f}, "
        f"false alarm rate {chosen['fpr']:.4f}, F1 {chosen['f1']:.4f}"
    )
    print(f"the curve at min area {chosen['min_area']} (all of it in {path.name}):")
    print("  threshold  TPR     FPR     precision")
    for point in chosen["curve"]:
        if round(point["threshold"] * 100) % 10 == 0 or point["threshold"] == chosen["threshold"]:
            mark = "  <- chosen" if point["threshold"] == chosen["threshold"] else ""
            print(
                f"  {point['threshold']:<9.2f}  {point['tpr']:.4f}  {point['fpr']:.4f}  "
                f"{point['precision']:.4f}{mark}"
            )
    print(f"wrote {', '.join(str(p) for p in written)}; predict.py uses it by default")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "evaluate.py",
        "Evaluate CheapNet on a DAGM folder: params, GFLOPs, mIoU, IoU per class, "
        "mAcc, pixel accuracy, mAP; or time it (--jit-bench).",
    )
    add = parser.add_argument
    add("--checkpoint", help="an authors' .pkl or a training workdir (none: untrained model)")
    add(
        "--data",
        dest="data_source",
        help="a DAGM class folder (Label/Labels.txt), a folder of your own (plain images/ + "
        "masks/, COCO, LabelMe, CVAT masks, MVTec AD, KolektorSDD2), tfds:NAME/CONFIG[:SPLIT] "
        "(a prepared TFDS dataset; split: validation), 'synthetic', or 'validation' (the split "
        "the checkpoint's training run held out)",
    )
    add(
        "--defect-classes",
        type=cli.class_names,
        help="the annotated classes that are defects, e.g. scratch,dent (default: all)",
    )
    add("--json", dest="json_path", help="also write the figures to this JSON file")
    add(
        "--csv",
        dest="csv_path",
        help="a population workdir: also write the members' table to this CSV file",
    )
    width = parser.add_mutually_exclusive_group()
    width.add_argument("--variant", choices=sorted(VARIANTS), help="S, M or L")
    width.add_argument("--features", type=cli.count, help="width G (overrides --variant)")
    add(
        "--normalization",
        type=cli.normalization,
        help="mean,std of pixel/255 (none: the checkpoint's own, else the authors' "
        f"{AUTHORS_NORMALIZATION.mean},{AUTHORS_NORMALIZATION.std})",
    )
    add("--image-size", type=cli.image_size, help="synthetic data: H = W")
    add("--threshold", type=cli.probability, help="a pixel is a defect if its probability > this")
    add("--batch-size", type=cli.count, help="images per forward pass (none: by G)")
    add("--impl", choices=["auto", "lax", "fused"], help="layer implementation")
    add("--dtype", choices=sorted(INFERENCE_DTYPES), help="activations between blocks")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    calibration = parser.add_argument_group(
        "--calibrate: choose the threshold and minimum defect area on validation data"
    )
    calibration.add_argument(
        "--calibrate",
        action="store_true",
        help="choose them on --data (it needs defect-free images) and store them with the "
        "checkpoint for predict.py; synthetic data: the validation split",
    )
    target = calibration.add_mutually_exclusive_group()
    target.add_argument(
        "--target-fpr", type=cli.rate, help="highest detection rate at this false alarm rate"
    )
    target.add_argument(
        "--target-tpr", type=cli.rate, help="lowest false alarm rate at this detection rate"
    )
    bench = parser.add_argument_group("--jit-bench: speed of segmentation and detection")
    bench.add_argument("--jit-bench", action="store_true", help="benchmark instead of evaluate")
    bench.add_argument("--variants", help="e.g. S,M,L (default S,M; L on GPUs)")
    bench.add_argument(
        "--batch-sizes", type=cli.counts, help="e.g. 1,8 (default 1,8; GPU 1,64,256)"
    )
    bench.add_argument("--runs", type=cli.count, default=20, help="timed runs per measurement")
    # features: None until resolved from --variant/--features (see parse_args)
    parser.set_defaults(**{**dataclasses.asdict(EvaluationRequest()), "features": None})
    return parser


def bench_request(args: argparse.Namespace) -> dict:
    """The --jit-bench settings; defaults sized for the backend (CheapNet-L is slow on a CPU)."""
    on_cpu = jax.default_backend() == "cpu"
    if args.features is not None:
        features = [args.features]
    else:
        names = args.variants or ("S,M" if on_cpu else "S,M,L")
        features = [VARIANTS[name.strip()] for name in names.split(",")]
    return {
        "features": features,
        "batch_sizes": list(args.batch_sizes or ((1, 8) if on_cpu else (1, 64, 256))),
        "image_size": args.image_size or 512,
        "runs": args.runs,
        "json_path": args.json_path,
        "dtype": args.dtype,
    }


def parse_args(argv: list[str]) -> EvaluationRequest | dict:
    """The evaluation asked for, or the --jit-bench settings."""
    args = build_parser().parse_args(argv)
    if args.variant is not None:
        args.features = VARIANTS[args.variant]
    if args.jit_bench:
        return bench_request(args)
    if args.features is None:
        args.features = EvaluationRequest.features
    fields = dataclasses.fields(EvaluationRequest)
    return EvaluationRequest(**{f.name: getattr(args, f.name) for f in fields})


def _main(argv: list[str]) -> int:
    request = parse_args(argv)
    if isinstance(request, dict):
        from cheapnet_jax.bench import run_jit_bench

        run_jit_bench(**request)
        return 0
    return run_evaluation(request)


def main(argv: list[str] | None = None) -> int:
    """The command's exit status (see `cheapnet_jax.cli.run`)."""
    return cli.run(_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # python -m cheapnet_jax.cli.evaluate
    sys.exit(main())
