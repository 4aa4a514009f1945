"""predict.py end to end: good, corrupt and RGB images; JSON/CSV against scipy's labels of the
network's own mask; overlays; exit status; resume."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import jax
import numpy as np
import pytest
from conftest import checkpoint_path, run_tool, small_config
from PIL import Image
from scipy import ndimage

from cheapnet_jax import load_torch_checkpoint
from cheapnet_jax.checkpoints import load_orbax_checkpoint
from cheapnet_jax.data import CLASS6_MEAN, CLASS6_STD, normalize, pad_to_multiple
from cheapnet_jax.synthetic import write_dagm_folder
from cheapnet_jax.training import train_and_evaluate


@pytest.fixture
def inputs(tmp_path, samples_folder):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("1070.PNG", "1084.PNG", "1124.PNG"):
        shutil.copy(samples_folder / name, folder / name)
    (folder / "broken.png").write_bytes((samples_folder / "1112.PNG").read_bytes()[:300])
    crop = np.asarray(Image.open(samples_folder / "1115.PNG"))[:500, :450]  # not a multiple of 16
    Image.fromarray(np.stack([crop] * 3, axis=-1)).save(folder / "colour.png")
    return folder


def run_predict(*args: str) -> subprocess.CompletedProcess:
    return run_tool("predict.py", "--no-progress", *args)


def expected_defects(
    image: np.ndarray,
    model=None,
    variables=None,
    mean: float = CLASS6_MEAN,
    std: float = CLASS6_STD,
) -> list[list[int]]:
    """Boxes and areas by scipy on the mask of the network run directly (padded, cropped);
    the authors' G=2 checkpoint unless a model is given."""
    if model is None:
        model, variables = load_torch_checkpoint(checkpoint_path(2))
    x = normalize(pad_to_multiple(image)[None], mean, std)
    probabilities = np.asarray(jax.nn.sigmoid(jax.jit(model.apply)(variables, x)))[0, ..., 0]
    mask = probabilities[: image.shape[0], : image.shape[1]] > 0.5
    labels, count = ndimage.label(mask, np.ones((3, 3)))
    areas = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, count + 1))
    return [
        [cols.start, rows.start, cols.stop - 1, rows.stop - 1, int(area)]
        for (rows, cols), area in zip(ndimage.find_objects(labels), areas, strict=True)
    ]


def test_predict_folder_end_to_end(inputs, tmp_path):
    out = tmp_path / "out"
    result = run_predict(
        "--checkpoint",
        str(checkpoint_path(2)),
        str(inputs),
        "--out",
        str(out),
        "--decode-threads",
        "3",
    )
    assert result.returncode == 1, result.stderr  # one file failed
    assert "broken.png: cannot decode image" in result.stderr
    records = {file_name(r["file"]): r for r in json.loads((out / "defects.json").read_text())}
    assert set(records) == {"1070.PNG", "1084.PNG", "1124.PNG", "broken.png", "colour.png"}
    assert "error" in records["broken.png"]
    assert records["colour.png"]["warning"].startswith("converted from mode 'RGB'")
    assert (records["colour.png"]["width"], records["colour.png"]["height"]) == (450, 500)
    for name in ("1070.PNG", "1084.PNG", "colour.png"):
        image = np.asarray(Image.open(inputs / name).convert("L"))
        found = [[*d["box"], d["area"]] for d in records[name]["defects"]]
        assert found == expected_defects(image), name
        assert records[name]["verdict"] == ("NG" if found else "OK")
        assert (out / records[name]["overlay"]).is_file()
    with (out / "defects.csv").open() as file:
        rows = list(csv.DictReader(file))
    defect_rows = sum(max(len(r.get("defects", [])), 1) for r in records.values())
    assert len(rows) == defect_rows


def file_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def test_resume_skips_finished_images(inputs, tmp_path):
    out = tmp_path / "out"
    checkpoint = str(checkpoint_path(2))
    first = run_predict("--checkpoint", checkpoint, str(inputs), "--out", str(out), "--no-overlays")
    assert first.returncode == 1
    lines = (out / "defects.jsonl").read_text().splitlines()
    # a run killed halfway: two records kept, the third cut in the middle of its line
    (out / "defects.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    (inputs / "broken.png").unlink()
    again = run_predict(
        "--checkpoint", checkpoint, str(inputs), "--out", str(out), "--no-overlays", "--resume"
    )
    assert again.returncode == 0, again.stderr
    kept = {json.loads(line)["file"] for line in lines[:2]} - {str(inputs / "broken.png")}
    assert f"{len(kept)} skipped" in again.stdout
    records = json.loads((out / "defects.json").read_text())
    files = {r["file"] for r in records if "error" not in r}
    assert files == {str(p) for p in inputs.iterdir()}


def test_thread_and_batch_counts_must_be_positive(tmp_path):
    result = run_predict(
        "--checkpoint", "x.pkl", str(tmp_path), "--out", str(tmp_path), "--decode-threads", "0"
    )
    assert (
        result.returncode == 2 and "argument --decode-threads: '0': must be >= 1" in result.stderr
    )


def test_predict_with_an_orbax_checkpoint_uses_its_normalisation(tmp_path):
    """Needs nothing from ../shared: a model trained here for two epochs on synthetic data."""
    workdir = tmp_path / "run"
    train_and_evaluate(small_config(workdir))
    model, variables, meta = load_orbax_checkpoint(workdir)
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    assert abs(mean - CLASS6_MEAN) > 0.01  # so that using the wrong statistics could show
    images = write_dagm_folder(tmp_path / "images", count=3, size=32, seed=4, defect_free=1)
    out = tmp_path / "out"
    result = run_predict("--checkpoint", str(workdir), str(images), "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = json.loads((out / "defects.json").read_text())
    assert len(records) == 4
    with_other_statistics = []
    for record in records:
        image = np.asarray(Image.open(record["file"]))
        found = [[*d["box"], d["area"]] for d in record["defects"]]
        assert found == expected_defects(image, model, variables, mean, std), record["file"]
        with_other_statistics.append(found != expected_defects(image, model, variables))
    assert any(with_other_statistics)  # the authors' statistics would have given other defects


def test_a_checkpoint_that_is_not_there_is_one_line(tmp_path):
    result = run_predict(
        "--checkpoint", str(tmp_path / "nothing.pkl"), str(tmp_path), "--out", str(tmp_path / "out")
    )
    assert result.returncode == 1 and "error: " in result.stderr and "nothing.pkl" in result.stderr
    assert "Traceback" not in result.stderr


def test_bfloat16_predictions_of_the_real_samples(tmp_path, samples_folder):
    """``--dtype bfloat16``: every image gets a record; the G=32 checkpoint's largest defect
    per image agrees with float32's (box within 4 pixels, area within 5%)."""
    from cheapnet_jax.cli.predict import main as predict_main

    images = [str(samples_folder / name) for name in ("1070.PNG", "1084.PNG", "1124.PNG")]
    largest = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        args = ["--checkpoint", str(checkpoint_path(32)), "--out", str(out), "--no-progress"]
        assert predict_main([*images, *args, "--no-overlays", "--dtype", dtype]) == 0
        records = json.loads((out / "defects.json").read_text())
        assert len(records) == 3
        largest[dtype] = [max(r["defects"], key=lambda d: d["area"]) for r in records]
    for low, full in zip(largest["bfloat16"], largest["float32"], strict=True):
        assert np.abs(np.subtract(low["box"], full["box"])).max() <= 4
        assert low["area"] == pytest.approx(full["area"], rel=0.05)


def test_tiled_prediction_equals_whole_image_prediction(inputs, tmp_path):
    """--tile 128 (every image, overlays kept) and --tile-above (images over the limit, no
    overlay): the defects scipy finds on the whole image's mask, with lax layers (bit for bit,
    tests/test_tiling.py); the 500x450 image has partial tiles at its right and bottom."""
    checkpoint = str(checkpoint_path(2))
    model, variables = load_torch_checkpoint(checkpoint_path(2), impl="lax")
    (inputs / "broken.png").unlink()
    explicit = run_predict(
        "--checkpoint", checkpoint, str(inputs), "--out", str(tmp_path / "a"), "--impl", "lax",
        "--tile", "128",
    )  # fmt: skip
    auto = run_predict(
        "--checkpoint", checkpoint, str(inputs), "--out", str(tmp_path / "b"), "--impl", "lax",
        "--tile-above", "250000", "--no-overlays",
    )  # fmt: skip
    assert explicit.returncode == 0, explicit.stderr
    assert auto.returncode == 0, auto.stderr
    tiled = {file_name(r["file"]): r for r in json.loads((tmp_path / "a/defects.json").read_text())}
    limit = {file_name(r["file"]): r for r in json.loads((tmp_path / "b/defects.json").read_text())}
    for name in ("1070.PNG", "1084.PNG", "1124.PNG", "colour.png"):
        image = np.asarray(Image.open(inputs / name).convert("L"))
        expected = expected_defects(image, model, variables)
        assert [[*d["box"], d["area"]] for d in tiled[name]["defects"]] == expected, name
        assert tiled[name]["tiles"] == 16  # 4 x 4 tiles of 128 (512x464 once padded)
        assert (tmp_path / "a" / tiled[name]["overlay"]).is_file()
        assert [[*d["box"], d["area"]] for d in limit[name]["defects"]] == expected, name
    assert any(tiled[name]["defects"] for name in tiled)
    assert limit["1070.PNG"]["tiles"] == 1  # 512x512 > 250,000 pixels: one tile of 1024
    assert "tiles" not in limit["colour.png"]  # 500x450 = 225,000 pixels: whole


def test_labels_on_the_host_write_what_the_one_program_writes(tmp_path):
    """predict.py's default on the CPU for small models (the network alone, the labels made on
    the host while the next batch's network runs) against the one program: the same records,
    line for line and in order (an unreadable file between batches, two sizes, a batch padded
    up to its compiled size), and the same overlays, byte for byte."""
    pytest.importorskip("cv2", reason="labels on the host need OpenCV")
    pytest.importorskip("torch", reason="writing a .pkl checkpoint needs torch")
    from cheapnet_jax.inspection import Inspector
    from cheapnet_jax.model import CheapNet, init_variables
    from cheapnet_jax.prediction import PredictOptions, predict_files
    from cheapnet_jax.torch_import import save_torch_checkpoint

    checkpoint = tmp_path / "random.pkl"
    save_torch_checkpoint(init_variables(CheapNet(2), jax.random.key(0)), checkpoint)
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for index, shape in enumerate([(40, 57)] * 3 + [(32, 32)] * 2):
        pixels = ndimage.gaussian_filter(rng.random(shape) * 255, 1.5).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    (folder / "2b-broken.png").write_bytes(b"not an image")
    paths = sorted(folder.iterdir())
    written = {}
    for on_host in (True, False):
        out = tmp_path / f"out-{on_host}"
        inspector = Inspector.load(checkpoint, threshold=0.6, batch_size=2, labels_on_host=on_host)
        counts = predict_files(inspector, paths, out, PredictOptions(progress=False))
        assert counts == {"images": 5, "failed": 1, "skipped": 0}
        overlays = {p.name: p.read_bytes() for p in (out / "overlays").iterdir()}
        written[on_host] = ((out / "defects.jsonl").read_text().splitlines(), overlays)
    lines, overlays = written[True]
    assert lines == written[False][0] and overlays == written[False][1]
    records = [json.loads(line) for line in lines]
    assert sorted(file_name(r["file"]) for r in records) == [p.name for p in paths]
    assert sum(len(r.get("defects", [])) for r in records) > 5 and len(overlays) == 5
