"""Population training (`cheapnet_jax.population`, ``train.py --population``): every member
equal to its solo run, members that differ in data size, divergence, kill and resume, and the
members' folders read by the other tools."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, cli_env, kill_at_first_checkpoint, run_tool, small_config
from PIL import Image

from cheapnet_jax.augmentation import augmentation_flags
from cheapnet_jax.checkpoints import load_orbax_checkpoint
from cheapnet_jax.errors import SettingsError
from cheapnet_jax.losses import LOSSES
from cheapnet_jax.model import CheapNet
from cheapnet_jax.population import (
    SharedSettings,
    make_population_step,
    members_per_chunk,
    parse_axis,
    population_grid,
    population_members,
    stack_members,
    train_population,
)
from cheapnet_jax.synthetic import write_dagm_folder
from cheapnet_jax.training import (
    AXIS,
    augmenter,
    initial_state,
    make_optimizer,
    optimizer_arguments,
    parallel_train_step,
    replicated_sharding,
    train_and_evaluate,
    training_optimizer,
)


def test_axes_parse_ranges_lists_and_classes():
    assert parse_axis("seed=0..3") == ("seed", (0, 1, 2, 3))
    assert parse_axis("seed=0..1,5") == ("seed", (0, 1, 5))
    assert parse_axis("lr=0.01,1e-3") == ("lr", (0.01, 0.001))
    assert parse_axis("classes=9..10") == ("classes", ((9,), (10,)))
    assert parse_axis("loss=bce-sigmoid") == ("loss", ("bce-sigmoid",))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed", "expected KEY=VALUES"),
        ("width=2,4", "members may differ in seed, lr, loss, classes, data, recipe, augment"),
        ("seed=3..1", "empty range '3..1'"),
        ("seed=a", "invalid literal"),
        ("lr=0.01,-1", "finite numbers > 0"),
        ("lr=nan", "finite numbers > 0"),
        ("classes=0,11", "DAGM classes are 1..10"),
        ("loss=mse", "loss 'mse': unknown term 'mse'"),
        ("loss=dice+dice", "loss 'dice+dice': a repeated term"),
        ("augment=flip+spin", "unknown augmentation 'spin'"),
        ("balance=0.5,1", "balance shares must be in [0, 1)"),
        ("recipe=fancy", "unknown recipe 'fancy'"),
        ("seed=1,1", "a value is repeated"),
    ],
)
def test_bad_axes_say_what_was_wrong(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_axis(text)


def test_the_grid_is_every_combination_with_folder_names(tmp_path):
    grid = population_grid([parse_axis("lr=0.01,0.003,0.001"), parse_axis("seed=0,1")])
    assert len(grid) == 6 and grid[1] == {"lr": 0.01, "seed": 1}
    members = population_members(small_config(tmp_path), grid)
    assert members[1].name == "lr-0.01_seed-1"
    assert members[1].config.workdir == str(tmp_path / "members" / "lr-0.01_seed-1")
    assert (members[5].config.lr, members[5].config.seed) == (0.001, 1)
    with pytest.raises(SettingsError, match="names seed twice"):
        population_grid([parse_axis("seed=0"), parse_axis("seed=1")])
    with pytest.raises(SettingsError, match="has no DAGM classes"):
        population_members(small_config(tmp_path), population_grid([parse_axis("classes=1,2")]))
    same_name = population_grid([parse_axis(f"data={tmp_path}/a/x,{tmp_path}/b/x")])
    with pytest.raises(SettingsError, match="both be named 'data-x'"):
        population_members(small_config(tmp_path), same_name)


def test_members_per_chunk_is_the_largest_divisor_within_the_budget():
    assert members_per_chunk(8, 32_768, None) == 8  # accelerators: one vmap
    assert members_per_chunk(8, 32_768, 1 << 17) == 4  # 64x64, batch 8
    assert members_per_chunk(8, 524_288, 1 << 17) == 1  # 256x256: one member at a time
    assert members_per_chunk(6, 30_000, 100_000) == 3
    assert members_per_chunk(7, 30_000, 100_000) == 1  # 7 is prime
    assert members_per_chunk(1, 10**9, 1) == 1


def float64_config(workdir, **overrides):
    """small_config in float64 with batches of 8 (16 training images: 2 steps per epoch): the
    solo runs' training step is then the one-device float64 step of test_training's PyTorch
    test, compiled once for all of them."""
    return small_config(workdir, dtype="float64", batch_size=8, synthetic_train=16, **overrides)


def test_chunked_population_steps_equal_each_members_solo_step(tmp_path):
    """One vmap over all members, chunks of 2 members one after another, or one member at a
    time: each member's new state equals its solo training step (float64; 1e-9 as in
    `assert_equal_to_solo`: vmapped, the conv biases before a BatchNorm keep rounding noise).
    One test for the three forms, so that the solo steps are computed once. The members, the
    shapes and the placement are those of test_members_equal_their_solo_runs_on_one_device's
    run (float64_config, seeds 0-1 x lr 0.01, 0.002), so that the vmap form and the solo steps
    are the programs that test compiles: whichever runs second reads them from the cache (one
    solo program for both learning rates: they are arguments of the compiled step)."""
    with jax.enable_x64(True):
        base = float64_config(tmp_path)
        model = CheapNet(base.features, bn_axis_name=AXIS)
        devices = jax.devices()[:1]
        replicated = replicated_sharding(devices)
        steps_per_epoch = base.synthetic_train // base.batch_size
        members = [(0, 0.01), (0, 0.002), (1, 0.01), (1, 0.002)]
        # members 0 and 2 augment (their own draws: their seeds), 1 and 3 do not
        configs = [
            dataclasses.replace(
                base, seed=seed, lr=lr, augment=("flip", "rot90", "gamma") if lr == 0.01 else ()
            )
            for seed, lr in members
        ]
        mean, std = 0.4, 0.25
        states = [initial_state(c, model, make_optimizer(c, steps_per_epoch)) for c in configs]
        rng = np.random.default_rng(0)
        shape = (1, len(members), base.batch_size, base.image_size, base.image_size, 1)
        x = rng.standard_normal(shape)
        masks = rng.random(shape) < 0.1
        wanted = []
        for i, config in enumerate(configs):
            solo_step = parallel_train_step(
                model,
                training_optimizer(config),
                devices,
                LOSSES[base.loss],
                optimizer_arguments(config, steps_per_epoch),
                augmenter(config, mean, std),
            )
            wanted.append(solo_step(jax.device_put(states[i], replicated), x[:, i], masks[:, i])[0])
        settings = (
            np.array([config.lr for config in configs]),
            np.full(len(members), steps_per_epoch, np.int32),
            np.zeros(len(members), np.int32),
            np.ones(len(members), bool),
            np.array([config.seed for config in configs], np.int32),
            np.stack([augmentation_flags(config.augment) for config in configs]),
            np.full(len(members), mean),
            np.full(len(members), std),
        )
        shared = SharedSettings(
            base.gamma, base.milestones, (base.loss,), base.pos_weight, augmenting=True, crop_size=0
        )
        stacked = jax.device_put(stack_members(states), replicated)
        member_pixels = base.batch_size * base.image_size**2
        for form, chunk_pixels in {"vmap": None, "2": 2 * member_pixels, "1": 1}.items():
            step = jax.pmap(
                make_population_step(model, shared, chunk_pixels),
                axis_name=AXIS,
                in_axes=(None, 0, 0) + (None,) * 8,
                out_axes=(None, None),
                devices=devices,
            )
            stepped, _ = step(stacked, x, masks, *settings)
            for i, want in enumerate(wanted):
                got = jax.tree.map(lambda leaf, i=i: leaf[i], stepped)
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                    np.testing.assert_allclose(
                        np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-9,
                        err_msg=f"member {i}, chunks of {form}",
                    )  # fmt: skip


def assert_equal_to_solo(member_workdir, solo_workdir) -> None:
    """float64: every parameter and statistic to 1e-9 relative. The conv biases feeding a
    BatchNorm have gradients of pure rounding noise (about 1e-17, BatchNorm cancels them) and
    stay near 1e-12; the absolute 1e-9 covers them."""
    _, ours, ours_meta = load_orbax_checkpoint(member_workdir)
    _, theirs, theirs_meta = load_orbax_checkpoint(solo_workdir)
    assert ours_meta["step"] == theirs_meta["step"] and ours_meta["epoch"] == theirs_meta["epoch"]
    assert ours_meta["config"] == {**theirs_meta["config"], "workdir": str(member_workdir)}
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert a.dtype == b.dtype == np.float64
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-9)


def test_members_equal_their_solo_runs_on_one_device(tmp_path):
    """Seeds (initialisation, data order, synthetic data) and learning rates, 2 epochs across
    a learning-rate milestone."""
    with jax.enable_x64(True):
        base = float64_config(tmp_path / "population")
        grid = population_grid([parse_axis("seed=0,1"), parse_axis("lr=0.01,0.002")])
        rows = train_population(base, grid)
        assert [row["status"] for row in rows] == ["finished"] * 4
        for member in population_members(base, grid):
            solo = float64_config(tmp_path / member.name, **member.settings)
            train_and_evaluate(solo)
            assert_equal_to_solo(tmp_path / "population" / "members" / member.name, solo.workdir)


def test_members_of_other_classes_and_losses_equal_their_solo_runs_on_two_devices(tmp_path):
    """Class 1 has 10 defective images (8 train: 2 steps of 4), class 2 has 15 (12: 3 steps):
    class 1's members sit out every third step. Two losses, one compiled step. Two of the four
    members (one of each class and each loss) are trained solo: each other pairing is one more
    compiled solo program (the learning-rate schedule counts steps per epoch), and every
    member's class shows in its step count."""
    root = tmp_path / "dagm"
    write_dagm_folder(root / "Class1" / "Train", count=10, size=32, seed=1, class_id=1)
    write_dagm_folder(root / "Class2" / "Train", count=15, size=32, seed=2, class_id=2)
    with jax.enable_x64(True):
        # Two devices: the layers of accelerators, as test_multidevice's FLOAT64_RUN.
        two_devices = dict(dtype="float64", devices=2, data=str(root), impl="lax")
        base = small_config(tmp_path / "population", **two_devices)
        grid = population_grid(
            [parse_axis("classes=1,2"), parse_axis("loss=bce-logits,bce-sigmoid")]
        )
        train_population(base, grid)
        members = population_members(base, grid)
        assert [m.name for m in members[::3]] == [
            "classes-1_loss-bce-logits",
            "classes-2_loss-bce-sigmoid",
        ]
        for member in members[::3]:
            solo = small_config(tmp_path / member.name, **two_devices, **member.settings)
            train_and_evaluate(solo)
            assert_equal_to_solo(tmp_path / "population" / "members" / member.name, solo.workdir)
        steps = {
            m.name: load_orbax_checkpoint(m.config.workdir)[2]["step"]
            for m in population_members(base, grid)
        }
        # The members left out above: their class shows in the step counts, their loss in
        # weights that are not bit-identical to their classmate's (same seed, same data, a
        # deterministic CPU: the same loss would give the same bits; the two losses agree to
        # rounding, which differs).
        for same_class in (members[:2], members[2:]):
            weights = [
                jax.tree.leaves(load_orbax_checkpoint(m.config.workdir)[1]) for m in same_class
            ]
            assert any(not np.array_equal(a, b) for a, b in zip(*weights, strict=True))
        assert steps == {
            "classes-1_loss-bce-logits": 4,
            "classes-1_loss-bce-sigmoid": 4,
            "classes-2_loss-bce-logits": 6,
            "classes-2_loss-bce-sigmoid": 6,
        }


def test_a_diverging_member_stops_and_the_others_go_on(tmp_path, capsys):
    base = small_config(tmp_path, epochs=2)
    # A learning rate that overflows float32: the first update is not finite.
    grid = population_grid([parse_axis("lr=0.01,1e39")])
    rows = train_population(base, grid)
    assert [(row["member"], row["status"]) for row in rows] == [
        ("lr-0.01", "finished"),
        ("lr-1e+39", "diverged"),
    ]
    assert "member lr-1e+39 stopped: parameters became NaN/inf at epoch 1, step 1" in (
        capsys.readouterr().err
    )
    saved = json.loads((tmp_path / "population.json").read_text())["members"]
    assert saved[1]["status"] == "diverged" and "epoch 1, step 1" in saved[1]["message"]
    assert not any((tmp_path / "members" / "lr-1e+39" / "checkpoints" / "latest").iterdir())
    _, variables, meta = load_orbax_checkpoint(tmp_path / "members" / "lr-0.01")
    assert meta["epoch"] == 1 and all(np.isfinite(v).all() for v in jax.tree.leaves(variables))


POPULATION_RUN = [
    "--variant", "S", "--epochs", "4", "--image-size", "64", "--synthetic-train", "16",
    "--synthetic-validation", "4", "--batch-size", "4", "--milestones", "3", "--no-progress",
    "--population", "seed=0..3",
]  # fmt: skip


def start_population(workdir, *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--workdir", str(workdir)]
    return subprocess.Popen(
        [*command, *POPULATION_RUN, *extra],
        env=cli_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def latest_step(workdir):
    """The step folder of a run's latest checkpoint (a workdir alone reads as its best)."""
    latest = workdir / "checkpoints" / "latest"
    return max((p for p in latest.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def test_a_killed_population_resumes_every_member_bit_identically(tmp_path):
    """Killed as soon as the first member's first checkpoint is written (so that members stand
    at different epochs), then resumed; then refused with another population; then a member's
    folder evaluated by evaluate.py as any run."""
    uninterrupted = start_population(tmp_path / "a")
    out, err = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, err
    killed = start_population(tmp_path / "b")
    latest = tmp_path / "b" / "members" / "seed-0" / "checkpoints" / "latest"
    kill_at_first_checkpoint(killed, latest)
    resumed = start_population(tmp_path / "b")
    output, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resumed from" in output
    for seed in range(4):
        a = load_orbax_checkpoint(latest_step(tmp_path / "a" / "members" / f"seed-{seed}"))
        b = load_orbax_checkpoint(latest_step(tmp_path / "b" / "members" / f"seed-{seed}"))
        assert a[2]["epoch"] == b[2]["epoch"] == 3
        for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = list(csv.DictReader((tmp_path / "b" / "population.csv").open()))
    assert [row["member"] for row in rows] == [f"seed-{s}" for s in range(4)]
    assert {row["status"] for row in rows} == {"finished"}
    best = max(
        (
            json.loads(line)
            for line in (tmp_path / "b" / "members" / "seed-2" / "metrics.jsonl").open()
        ),
        key=lambda r: r["validation"]["miou"],
    )
    assert float(rows[2]["miou"]) == pytest.approx(best["validation"]["miou"])
    assert "seed-0" in out and "best_epoch" in out  # the summary table

    other = start_population(tmp_path / "b", "--population", "seed=0..4")
    _, err = other.communicate(timeout=600)
    assert other.returncode == 1
    assert err.strip().splitlines() == [
        f"error: {tmp_path / 'b'} holds another population (new members: seed-4): "
        "use another --workdir"
    ]

    evaluated = run_tool(
        "evaluate.py",
        "--checkpoint", str(tmp_path / "b" / "members" / "seed-2"),
        "--data", "synthetic", "--image-size", "64", "--no-progress",
        "--json", str(tmp_path / "seed-2.json"),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    figures = json.loads((tmp_path / "seed-2.json").read_text())
    member_meta = load_orbax_checkpoint(tmp_path / "b" / "members" / "seed-2")[2]
    assert figures["checkpoint"].startswith(str(tmp_path / "b" / "members" / "seed-2"))
    assert figures["normalization"] == member_meta["normalization"]  # the member's own
    assert 0 <= figures["miou"] <= 1


def test_predict_routes_each_folder_to_its_member(population_run, tmp_path):
    """``predict.py --route FOLDER=NAME``: one run inspects two products, each file by its
    folder's member, as that member's own run folder answers it; the records and the CSV name
    the member. ``--model NAME`` inspects with one member; a population without either is
    refused in one line."""
    from cheapnet_jax.inspection import Inspector
    from cheapnet_jax.prediction import read_records

    folders = {}
    for name, seed in (("seed-0", 4), ("seed-1", 5)):
        folders[name] = write_dagm_folder(tmp_path / name, count=3, size=32, seed=seed)
    out = tmp_path / "out"
    routes = [f"--route={folders[n]}={n}" for n in folders]
    run = run_tool(
        "predict.py", "--checkpoint", str(population_run), *routes, "--out", str(out),
        "--no-progress", "--no-overlays",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    records = read_records(out)
    assert sorted(r["model"] for r in records) == ["seed-0"] * 3 + ["seed-1"] * 3
    for name, folder in folders.items():
        alone = Inspector.load(population_run / "members" / name)
        for record in (r for r in records if r["model"] == name):
            assert Path(record["file"]).parent == folder
            image = np.asarray(Image.open(record["file"]))
            expected = alone.inspect([image])[0]
            assert record["defects"] == [d.as_dict() for d in expected.defects]
    assert (out / "defects.csv").read_text().startswith("file,model,verdict,")

    one = run_tool(
        "predict.py", "--checkpoint", str(population_run), "--model", "seed-1",
        str(folders["seed-0"]), "--out", str(tmp_path / "one"), "--no-progress", "--no-overlays",
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    alone = Inspector.load(population_run / "members" / "seed-1")
    for record in read_records(tmp_path / "one"):
        expected = alone.inspect([np.asarray(Image.open(record["file"]))])[0]
        assert record["defects"] == [d.as_dict() for d in expected.defects]
        assert "model" not in record
    refused = run_tool(
        "predict.py", "--checkpoint", str(population_run), str(folders["seed-0"]),
        "--out", str(tmp_path / "none"),
    )  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "a population (seed-0, seed-1): inspect with one member (--model NAME)" in (
        refused.stderr
    )


def test_evaluate_a_population_is_the_paper_s_per_class_table(population_run, tmp_path):
    """``evaluate.py`` of a population workdir: a row per member equal to evaluating that
    member's folder alone (on its own held-out split), and their mean, printed and as JSON
    and CSV; ``--calibrate`` calibrates each member and stores it with that member."""
    population = tmp_path / "population"
    shutil.copytree(population_run, population)
    out = tmp_path / "members"
    run = run_tool(
        "evaluate.py", "--checkpoint", str(population), "--data", "validation",
        "--json", str(out / "table.json"), "--csv", str(out / "table.csv"), "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    table = json.loads((out / "table.json").read_text())
    assert list(table["members"]) == ["seed-0", "seed-1"]
    for name in ("seed-0", "seed-1"):
        alone = run_tool(
            "evaluate.py", "--checkpoint", str(population / "members" / name), "--data",
            "validation", "--json", str(tmp_path / f"{name}.json"), "--no-progress",
        )  # fmt: skip
        assert alone.returncode == 0, alone.stderr
        expected = json.loads((tmp_path / f"{name}.json").read_text())
        assert table["members"][name]["confusion"] == expected["confusion"]
        assert table["members"][name]["miou"] == expected["miou"]
    mious = [table["members"][n]["miou"] for n in ("seed-0", "seed-1")]
    assert table["mean"]["miou"] == pytest.approx(sum(mious) / 2)
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [row["member"] for row in rows] == ["seed-0", "seed-1", "mean"]
    assert float(rows[2]["miou"]) == pytest.approx(table["mean"]["miou"])
    assert "member  images  mIoU" in run.stdout and "\nmean " in run.stdout

    # (synthetic validation images with good ones: the members' held-out splits have none)
    calibrated = run_tool(
        "evaluate.py", "--checkpoint", str(population), "--data", "synthetic", "--calibrate",
        "--no-progress",
    )  # fmt: skip
    assert calibrated.returncode == 0, calibrated.stderr
    for name in ("seed-0", "seed-1"):
        assert (population / "members" / name / "calibration.json").is_file()


def test_exporting_a_population_asks_for_one_member(population_run, tmp_path):
    out = tmp_path / "pipeline.stablehlo"
    refused = run_tool(
        "-m cheapnet_jax.cli.export", "--checkpoint", str(population_run), "--format",
        "stablehlo", "--pipeline", "--image-size", "32", "--out", str(out),
    )  # fmt: skip
    assert refused.returncode == 1 and not out.exists(), refused.stderr
    assert refused.stderr.strip() == (
        f"error: --checkpoint {population_run}: a population (seed-0, seed-1): export one "
        "member's folder (members/NAME)"
    )
