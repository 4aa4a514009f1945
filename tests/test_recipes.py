"""The training recipe's parts: augmentation on the device (against numpy's dihedral transforms
and the photometric formulas, with and without jit, each device its own draws), the losses
(against PyTorch and numpy), defect-balanced batches, early stopping, and a run with every part
on that resumes bit for bit and trains through train.py's flags."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_tool, small_config

from cheapnet_jax import data
from cheapnet_jax.augmentation import augment_batch, augmentation_flags, step_key
from cheapnet_jax.checkpoints import load_orbax_checkpoint
from cheapnet_jax.losses import focal, loss_named, soft_dice, weighted_bce
from cheapnet_jax.training import EarlyStopping, train_and_evaluate, with_recipe

MEAN, STD = 0.4, 0.25


def batch(seed=0, shape=(6, 32, 32, 1)):
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    return x, x > 0.8  # a mask that is a function of the pixels


def dihedral(image: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and rotations of an ``[H, W, C]`` image (numpy)."""
    turns = [np.rot90(image, k) for k in range(4)]
    return turns + [np.fliplr(t) for t in turns]


@pytest.mark.parametrize("jitted", [False, True])
def test_geometric_augmentation_moves_the_mask_with_the_image(jitted):
    x, masks = batch()
    flags = jnp.asarray(augmentation_flags(["flip", "rot90"]))
    run = jax.jit(augment_batch, static_argnums=6) if jitted else augment_batch
    xa, ma = run(step_key(3, 7, None), x, masks, flags, MEAN, STD, 0)
    xa, ma = np.asarray(xa), np.asarray(ma)
    np.testing.assert_array_equal(ma, xa > 0.8)
    seen = set()
    for original, augmented in zip(np.asarray(x), xa, strict=True):
        matches = [i for i, t in enumerate(dihedral(original)) if np.array_equal(t, augmented)]
        assert matches, "not a flip or rotation of its image"
        seen.add(matches[0])
    assert len(seen) > 1  # the images drew different transforms
    # the same key draws the same; jit or not, the same
    again = augment_batch(step_key(3, 7, None), x, masks, flags, MEAN, STD, 0)
    np.testing.assert_array_equal(np.asarray(again[0]), xa)


def test_no_operation_leaves_the_batch_bit_for_bit_and_crops_cut_both():
    x, masks = batch()
    none = jnp.asarray(augmentation_flags([]))
    xa, ma = augment_batch(step_key(0, 0, None), x, masks, none, MEAN, STD, 0)
    np.testing.assert_array_equal(np.asarray(xa), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(ma), np.asarray(masks))
    xc, mc = augment_batch(step_key(0, 0, None), x, masks, none, MEAN, STD, 16)
    assert xc.shape == (6, 16, 16, 1)
    np.testing.assert_array_equal(np.asarray(mc), np.asarray(xc) > 0.8)
    for original, crop in zip(np.asarray(x), np.asarray(xc), strict=True):
        windows = np.lib.stride_tricks.sliding_window_view(original[..., 0], (16, 16))
        assert (windows == crop[..., 0]).all(axis=(2, 3)).any(), "not a 16x16 window"


@pytest.mark.parametrize(
    ("operation", "relation", "low", "high"),
    [
        ("brightness", lambda u, a: a - u, -0.1, 0.1),
        ("contrast", lambda u, a: (a - u.mean()) / (u - u.mean()), 0.8, 1.25),
        ("gamma", lambda u, a: np.log(a) / np.log(u), 0.8, 1.25),
    ],
)
def test_photometric_operations_follow_their_formula(operation, relation, low, high):
    """In pixel/255 units each image's change is one parameter (numpy's formula), drawn within
    its range; pixels that the result would clip are left out."""
    values = jax.random.uniform(jax.random.key(1), (4, 32, 32, 1), jnp.float32, 0.2, 0.8)
    x = (values - MEAN) / STD
    flags = jnp.asarray(augmentation_flags([operation]))
    xa, _ = augment_batch(step_key(5, 1, None), x, x > 0, flags, MEAN, STD, 0)
    parameters = []
    for u, a in zip(np.asarray(values, np.float64), np.asarray(xa) * STD + MEAN, strict=True):
        inside = (a > 1e-3) & (a < 1 - 1e-3) & (np.abs(u - u.mean()) > 1e-2)
        ratio = relation(u, a)[inside]
        assert np.ptp(ratio) < 1e-3, f"{operation}: not one parameter per image"
        parameters.append(float(np.median(ratio)))
    assert all(low <= p <= high for p in parameters), parameters
    assert np.ptp(parameters) > 1e-3  # drawn per image


def test_each_device_draws_its_own_augmentation():
    x, masks = batch(shape=(2, 1, 32, 32, 1))  # [devices, b, ...]
    flags = jnp.asarray(augmentation_flags(["flip", "rot90", "brightness"]))

    def on_device(x, masks):
        return augment_batch(step_key(0, 4, "batch"), x, masks, flags, MEAN, STD, 0)

    same_input = jnp.stack([x[0], x[0]])
    xa, _ = jax.pmap(on_device, axis_name="batch", devices=jax.devices()[:2])(
        same_input, jnp.stack([masks[0], masks[0]])
    )
    assert not np.array_equal(np.asarray(xa[0]), np.asarray(xa[1]))


def test_losses_equal_pytorch_and_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 16, 16, 1))
    masks = rng.random((2, 16, 16, 1)) < 0.1
    want = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(7.0))(
        torch.tensor(logits), torch.tensor(masks, dtype=torch.float64)
    )
    with jax.enable_x64(True):
        got = weighted_bce(jnp.asarray(logits), jnp.asarray(masks), 7.0)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-12)
        p = 1 / (1 + np.exp(-logits))
        y = masks.astype(float)
        dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
        np.testing.assert_allclose(float(soft_dice(jnp.asarray(logits), masks)), dice, rtol=1e-12)
        p_true = np.where(masks, p, 1 - p)
        focal_want = np.mean(-((1 - p_true) ** 2) * np.log(p_true))
        np.testing.assert_allclose(float(focal(jnp.asarray(logits), masks)), focal_want, rtol=1e-9)
        summed = loss_named("bce-weighted+dice", pos_weight=7.0)(jnp.asarray(logits), masks)
        np.testing.assert_allclose(float(summed), float(want) + dice, rtol=1e-12)


def test_balanced_batches_hold_their_share_of_defective_images():
    defective = np.array([True] * 3 + [False] * 13)
    order = data.balanced_order(defective, seed=0, epoch=2, batch_size=4, steps=4, fraction=0.5)
    batches = order.reshape(4, 4)
    assert (defective[batches].sum(axis=1) == 2).all()
    assert set(order[defective[order]]) == {0, 1, 2}  # every defective image, cycled
    again = data.balanced_order(defective, seed=0, epoch=2, batch_size=4, steps=4, fraction=0.5)
    np.testing.assert_array_equal(order, again)
    other = data.balanced_order(defective, seed=0, epoch=3, batch_size=4, steps=4, fraction=0.5)
    assert not np.array_equal(order, other)


def test_early_stopping_counts_epochs_without_a_better_defect_iou():
    stopping = EarlyStopping(patience=2)
    stopped_at = None
    for epoch, iou in enumerate([0.1, 0.3, 0.25, 0.3, 0.2, 0.5]):
        stopping.update(epoch, iou)
        if stopping.stopped:
            stopped_at = epoch
            break
    assert stopped_at == 3 and stopping.best_epoch == 1
    resumed = EarlyStopping.resumed(2, {"epoch": 3, "early_stopping": stopping.as_json()})
    assert resumed.stopped and resumed.best == 0.3
    assert not EarlyStopping(patience=0).stopped


def test_a_run_with_every_part_resumes_bit_for_bit(tmp_path):
    """Augmentation, balanced batches, Dice + weighted BCE: two epochs straight against one, then
    a second run resuming it (the draws come from the step in the saved state)."""

    def config(workdir, epochs):
        base = small_config(workdir, epochs=epochs, protocol="dagm", patience=5)
        return with_recipe(
            base, "paper", augment=("flip", "rot90", "contrast"), balance=0.5,
            loss="bce-weighted+dice",
        )  # fmt: skip

    train_and_evaluate(config(tmp_path / "straight", 2))
    train_and_evaluate(config(tmp_path / "resumed", 1))
    train_and_evaluate(config(tmp_path / "resumed", 2))
    straight = jax.tree.leaves(load_orbax_checkpoint(tmp_path / "straight")[1])
    resumed = jax.tree.leaves(load_orbax_checkpoint(tmp_path / "resumed")[1])
    for a, b in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["early_stopping"]["stopped"] is False


def test_train_py_takes_the_recipe_flags_and_stops_early(tmp_path):
    done = run_tool(
        "train.py", "--data", "synthetic", "--image-size", "32", "--synthetic-train", "8",
        "--synthetic-validation", "4", "--batch-size", "4", "--epochs", "30", "--lr", "1e-6",
        "--protocol", "dagm", "--augment", "flip,gamma", "--balance", "0.5",
        "--loss", "focal+dice", "--patience", "2", "--workdir", str(tmp_path), "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "stopped early: the validation defect IoU has not improved for 2 epochs" in done.stdout
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["augment"] == ["flip", "gamma"] and config["loss"] == "focal+dice"
    assert config["recipe"] == "paper" and config["balance"] == 0.5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) < 30 and rows[-1]["epoch"] - rows[-1]["early_stopping"]["best_epoch"] == 2
    bad = run_tool("train.py", "--loss", "bce+dice", "--workdir", str(tmp_path / "x"))
    assert bad.returncode == 2 and "unknown term 'bce'" in bad.stderr
