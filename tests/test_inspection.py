"""`cheapnet_jax.Inspector`, the one engine behind predict.py, the service, evaluate.py and the
export: its answers against an independent PyTorch model and scipy's labeling, the same answer
however the images come (a list, an array, files), its settings and their sources, bad input.
predict.py's and the service's equality with it are in test_predict.py and test_serve.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, checkpoint_path, cli_env, run_tool, small_config
from PIL import Image
from scipy import ndimage

from cheapnet_jax import Defect, Inspector, Result
from cheapnet_jax.checkpoints import Normalization, calibration_path
from cheapnet_jax.data import normalize, pad_to_multiple
from cheapnet_jax.errors import UnknownModelError
from cheapnet_jax.prediction import read_records
from cheapnet_jax.synthetic import make_split

torch = pytest.importorskip("torch")
from torch_reference import probabilities_nhwc, random_reference, save_reference  # noqa: E402

NORMALIZATION = (0.4, 0.3)


@pytest.fixture(scope="module")
def reference_pkl(tmp_path_factory):
    """A random-weight CheapNet-4 saved as the authors save theirs, and its PyTorch twin."""
    reference = random_reference(4, seed=3)
    path = tmp_path_factory.mktemp("reference") / "random.pkl"
    save_reference(reference, path)
    return path, reference


def sample_images(shapes=((40, 45), (32, 32), (40, 45), (70, 90))) -> list[np.ndarray]:
    """Synthetic defective images cropped to ``shapes`` (sizes that need padding)."""
    images = make_split("validation", len(shapes), 96, seed=1)[0]
    return [image[:h, :w] for image, (h, w) in zip(images, shapes, strict=True)]


def scipy_defects(probabilities: np.ndarray, threshold: float, min_area: int) -> list[tuple]:
    """``(box, area, mean probability)`` of the 8-connected components of ``probabilities >
    threshold`` in scipy's numbering (raster order of their first pixel), at least
    ``min_area`` pixels."""
    labels, count = ndimage.label(probabilities > threshold, np.ones((3, 3)))
    found = []
    for index, where in enumerate(ndimage.find_objects(labels), 1):
        rows, cols = where
        pixels = labels == index
        if pixels.sum() >= min_area:
            box = (cols.start, rows.start, cols.stop - 1, rows.stop - 1)
            found.append((box, int(pixels.sum()), float(probabilities[pixels].mean())))
    assert len(found) <= count
    return found


def test_inspect_answers_what_pytorch_and_scipy_answer(reference_pkl):
    """Each image's defects are the components (scipy) of the PyTorch model's probabilities
    over the threshold, on the image padded as predict.py pads it and cropped back: a batch of
    two sizes, and an image above ``tile_above`` through the tiler. The kept probability
    maps are PyTorch's; the masks, theirs over the threshold."""
    path, reference = reference_pkl
    threshold, min_area = 0.5, 2
    inspector = Inspector.load(
        path,
        threshold=threshold,
        min_area=min_area,
        normalization=NORMALIZATION,
        batch_size=2,
        tile_above=4000,  # the 70x90 image goes through tiles
    )
    images = sample_images()
    results = inspector.inspect(images, keep_masks=True, keep_probabilities=True)
    assert [r.tiles for r in results] == [None, None, None, 1]
    for image, result in zip(images, results, strict=True):
        padded = pad_to_multiple(image)[None]
        expected = probabilities_nhwc(reference, normalize(padded, *NORMALIZATION))[0]
        expected = expected[: image.shape[0], : image.shape[1]]
        np.testing.assert_allclose(result.probabilities, expected, atol=1e-4)
        certain = np.abs(expected - threshold) > 1e-4
        np.testing.assert_array_equal(result.mask[certain], expected[certain] > threshold)
        want = scipy_defects(result.probabilities, threshold, min_area)
        assert [(d.box, d.area) for d in result.defects] == [(b, a) for b, a, _ in want]
        np.testing.assert_allclose(
            [d.score for d in result.defects], [s for *_, s in want], atol=2e-6
        )
        assert (result.height, result.width) == image.shape
        assert result.verdict == ("NG" if result.defects else "OK")
    assert sum(len(r.defects) for r in results) >= 3  # not a vacuous comparison


def test_one_answer_however_the_images_come(reference_pkl, tmp_path):
    """A list, one [B, H, W] array, one image at a time and files through `inspect_files`
    (decoded ahead, a broken file and a colour file among them) give the same results; a
    broken file is a result with its error, a colour one is converted with a warning; leaving
    the stream early stops its threads."""
    path, _ = reference_pkl
    inspector = Inspector.load(path, normalization=NORMALIZATION, batch_size=2)
    images = sample_images(((48, 40),) * 3 + ((32, 32),) * 2)
    as_list = inspector.inspect(images)
    assert inspector.inspect(np.stack(images[:3])) == as_list[:3]
    assert [inspector.inspect([image])[0] for image in images] == as_list
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(image).save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    colour = np.repeat(images[0][..., None], 3, axis=-1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    files = [*paths[:2], tmp_path / "broken.png", *paths[2:], tmp_path / "colour.png"]
    streamed = list(inspector.inspect_files(files, keep_images=True))
    by_name = {p.name: r for p, r in streamed}
    assert sorted(by_name) == sorted(p.name for p in files)
    for index, image in enumerate(images):
        result = by_name[f"{index}.png"]
        np.testing.assert_array_equal(result.image, image)
        result.image = None
        assert result == as_list[index]
    broken = by_name["broken.png"]
    assert broken.verdict == "ERROR" and "broken.png: cannot decode image" in broken.error
    assert by_name["colour.png"].warning.startswith("converted from mode 'RGB'")
    assert by_name["colour.png"].defects == as_list[0].defects  # a gray image in RGB

    before = {t.name for t in threading.enumerate()}
    stream = inspector.inspect_files(paths * 20)
    next(stream)
    stream.close()  # the consumer leaves: the producer stops, no thread is left behind
    assert not {t.name for t in threading.enumerate()} - before


def test_settings_say_where_they_came_from(reference_pkl, tmp_path):
    """As given, else the checkpoint's calibration (unless calibration=False), else 0.5 and
    0; the normalisation as given, else the authors' for an authors' .pkl. The calibrated
    minimum area drops the smaller defects."""
    checkpoint = tmp_path / "model.pkl"
    shutil.copy(reference_pkl[0], checkpoint)
    plain = Inspector.load(checkpoint)
    assert {name: s.origin for name, s in plain.settings.items()} == {
        "threshold": "default",
        "min_area": "default",
        "normalization": "default",
    }
    assert (plain.threshold, plain.min_area) == (0.5, 0)
    assert plain.normalization == Normalization(0.348, 0.278)
    calibration_path(checkpoint).write_text(json.dumps({"threshold": 0.5, "min_area": 6}))
    calibrated = Inspector.load(checkpoint, normalization=NORMALIZATION)
    assert (calibrated.threshold, calibrated.min_area) == (0.5, 6)
    assert calibrated.settings["threshold"].origin == "calibration"
    assert calibrated.settings["normalization"].origin == "given"
    given = Inspector.load(checkpoint, min_area=0, normalization=NORMALIZATION)
    assert given.settings["min_area"].origin == "given" and given.threshold == 0.5
    ignored = Inspector.load(checkpoint, calibration=False)
    assert ignored.settings["threshold"].origin == "default"

    images = sample_images()
    every = given.inspect(images)
    large = calibrated.inspect(images)
    assert [[d for d in r.defects if d.area >= 6] for r in every] == [r.defects for r in large]
    assert sum(len(r.defects) for r in every) > sum(len(r.defects) for r in large)
    # a call's own settings override the inspector's
    assert given.inspect(images, min_area=6) == large


@pytest.mark.parametrize("features", [2, 32])
def test_predict_py_writes_what_the_inspector_answers_on_the_real_samples(
    features, samples_folder, tmp_path
):
    """The authors' checkpoint with a calibration beside it: predict.py (a new process) with
    the calibration and whole images, and without it in tiles of 256, writes each image's
    verdict and defects as the Python API answers them with the same settings."""
    checkpoint = tmp_path / f"CheapNet_G{features}.pkl"
    shutil.copy(checkpoint_path(features), checkpoint)
    calibration_path(checkpoint).write_text(json.dumps({"threshold": 0.6, "min_area": 5}))
    paths = sorted(samples_folder.glob("*.PNG"))
    images = [np.asarray(Image.open(path)) for path in paths]
    for flags, settings in (([], {}), (["--no-calibration", "--tile", "256"], {"tile": 256})):
        out = tmp_path / f"out-{len(flags)}"
        run = run_tool(
            "predict.py", "--checkpoint", str(checkpoint), str(samples_folder), "--out",
            str(out), "--no-overlays", "--no-progress", *flags,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        calibrated = not flags
        inspector = Inspector.load(checkpoint, calibration=calibrated, **settings)
        assert inspector.min_area == (5 if calibrated else 0)
        records = {Path(r["file"]).name: r for r in read_records(out)}
        for path, result in zip(paths, inspector.inspect(images), strict=True):
            record = records[path.name]
            assert record["verdict"] == result.verdict
            assert record["defects"] == [d.as_dict() for d in result.defects]
            assert record.get("tiles") == result.tiles == (4 if flags else None)
        assert any(r["defects"] for r in records.values())


def test_images_that_are_not_uint8_grayscale_are_refused_naming_the_first(reference_pkl):
    inspector = Inspector.load(reference_pkl[0])
    good = np.zeros((32, 32), np.uint8)
    with pytest.raises(ValueError, match=r"images\[1\]: expected uint8 grayscale \[H, W\], got "):
        inspector.inspect([good, good.astype(np.float32)])
    with pytest.raises(ValueError, match=r"images\[0\]: .* uint8 \[32, 32, 3\]"):
        inspector.inspect([np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"one \[H, W\] array"):
        inspector.inspect(good)
    assert inspector.inspect([]) == []


def test_a_defect_is_written_as_predict_writes_it():
    defect = Defect((1, 2, 3, 4), 5, 0.25)
    assert defect.as_dict() == {"box": [1, 2, 3, 4], "area": 5, "score": 0.25}
    assert Result(8, 8, [defect]).verdict == "NG" and Result(8, 8, []).verdict == "OK"


def readme_python_example() -> str:
    """The README's Python example: its first fenced Python block."""
    readme = (REPO_ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


def test_the_readme_python_example_runs(tmp_path):
    """The README's five lines, as a user runs them after ``make demo``: a trained run in
    ``runs/demo`` and an image ``part.png`` (a colour one) in the working folder, in a new
    process."""
    from cheapnet_jax.training import train_and_evaluate

    train_and_evaluate(small_config(tmp_path / "runs" / "demo"))
    image = make_split("test", 1, 64, seed=2)[0][0]
    Image.fromarray(np.repeat(image[..., None], 3, axis=-1)).save(tmp_path / "part.png")
    result = subprocess.run(
        [sys.executable, "-c", readme_python_example()],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    expected = Inspector.load(tmp_path / "runs" / "demo").inspect([image])[0]
    assert result.stdout.split()[0] == expected.verdict
    assert str([(d.box, d.area, d.score) for d in expected.defects]) in result.stdout


def test_the_engine_is_the_only_place_that_pads_and_batches():
    """No second copy of "checkpoint + images -> defects": predict.py, the service, evaluate.py
    and the export call the engine; none pads images, batches them or makes a detector."""
    package = REPO_ROOT / "cheapnet_jax"
    for module in ("prediction.py", "serve/app.py", "evaluation.py", "export.py"):
        source = (package / module).read_text()
        for twin in ("pad_to_multiple(", "make_detector(", "make_network(", "detect_tiled("):
            assert twin not in source, f"{module} calls {twin}"
        assert "Inspector" in source, module


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Four random models: three of width 2 (other seeds, one with its own normalisation)
    and one of width 4, each calibrated to a threshold inside its probabilities' range (so
    that each finds defects), one with a minimum area."""
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, features, seed, threshold, min_area in (
        ("a", 2, 0, 0.4585, 0),
        ("b", 2, 1, 0.512, 3),
        ("c", 2, 2, 0.4708, 0),
        ("wide", 4, 3, 0.4995, 0),
    ):
        paths[name] = folder / f"{name}.pkl"
        save_reference(random_reference(features, seed=seed), paths[name])
        calibration = {"threshold": threshold, "min_area": min_area}
        calibration_path(paths[name]).write_text(json.dumps(calibration))
    return paths


@pytest.mark.parametrize("labels_on_host", [True, False])
def test_images_for_several_models_are_each_answered_as_their_model_alone(models, labels_on_host):
    """One inspector of four models (two widths): a mixed list of images, each with its
    model, answered exactly as that model's own inspector answers it (defects, scores, masks,
    probabilities), with its own threshold, minimum area and normalisation; the batch of the
    width-2 models is one call."""
    options = dict(batch_size=4, labels_on_host=labels_on_host)
    normalization = {"c": NORMALIZATION}
    solo = {
        name: Inspector.load(path, normalization=normalization.get(name), **options)
        for name, path in models.items()
    }
    together = Inspector.of_models(
        [Inspector.load(p, name=n, normalization=normalization.get(n), **options)
         for n, p in models.items()]
    )  # fmt: skip
    assert list(together.models) == ["a", "b", "c", "wide"]
    images = sample_images(((48, 40),) * 7)
    names = ["a", "b", "wide", "c", "b", "a", "wide"]
    answers = together.inspect(images, model=names, keep_masks=True, keep_probabilities=True)
    for image, name, answer in zip(images, names, answers, strict=True):
        alone = solo[name].inspect([image], keep_masks=True, keep_probabilities=True)[0]
        assert answer.model == name and alone.model == name.join(["", ".pkl"])
        assert answer.defects == alone.defects, name
        assert answer.components_left_out == alone.components_left_out
        np.testing.assert_array_equal(answer.mask, alone.mask)
        np.testing.assert_array_equal(answer.probabilities, alone.probabilities)
    assert len({a.model for a in answers if a.defects}) >= 3  # not a vacuous comparison
    # a call's threshold overrides every model's; an unknown model is named with the others
    override = together.inspect(images[:2], model=["a", "b"], threshold=0.55, min_area=0)
    assert (
        override[1].defects == solo["b"].inspect(images[1:2], threshold=0.55, min_area=0)[0].defects
    )
    with pytest.raises(UnknownModelError, match=r"no model 'x' here; the models: a, b, c, wide"):
        together.inspect(images[:1], model="x")
    with pytest.raises(UnknownModelError, match=r"several models answer here"):
        together.inspect(images[:1])


def test_a_population_workdir_loads_every_member(population_run, tmp_path):
    """``Inspector.load`` of a population workdir: every member, named as in its
    population.json, each answering as its own run folder does; or one member (``model=``);
    files streamed to their members."""
    population = Inspector.load(population_run)
    assert list(population.models) == ["seed-0", "seed-1"]
    one = Inspector.load(population_run, model="seed-1")
    assert one.name == "seed-1" and list(one.models) == ["seed-1"]
    with pytest.raises(UnknownModelError, match=r"no member 'seed-9'; its members: seed-0"):
        Inspector.load(population_run, model="seed-9")
    paths = []
    for index, image in enumerate(sample_images(((32, 32),) * 4)):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(image).save(paths[-1])
    names = ["seed-0", "seed-1", "seed-1", "seed-0"]
    streamed = list(population.inspect_files(paths, model=names, keep_probabilities=True))
    assert [r.model for _, r in streamed] == names
    for (path, result), name in zip(streamed, names, strict=True):
        alone = Inspector.load(population_run / "members" / name)
        expected = alone.inspect([np.asarray(Image.open(path))], keep_probabilities=True)[0]
        assert result.defects == expected.defects
        np.testing.assert_array_equal(result.probabilities, expected.probabilities)
    # the two members answer differently: each image went to its own
    first = [r.probabilities for _, r in streamed]
    assert not np.array_equal(
        first[0],
        population.inspect(
            [np.asarray(Image.open(paths[0]))], model="seed-1", keep_probabilities=True
        )[0].probabilities,
    )
