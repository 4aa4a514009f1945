"""Training: pmap over 1 vs 8 devices, one step against PyTorch, learning, resume after SIGKILL."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO_ROOT, checkpoint_path, cli_env, kill_at_first_checkpoint, small_config

from cheapnet_jax import CheapNet, synthetic
from cheapnet_jax.checkpoints import load_orbax_checkpoint
from cheapnet_jax.data import shard_batch
from cheapnet_jax.errors import TrainingDivergedError
from cheapnet_jax.losses import LOSSES, bce_with_logits
from cheapnet_jax.torch_import import state_dict_to_variables
from cheapnet_jax.training import (
    AXIS,
    TrainConfig,
    TrainState,
    initial_state,
    make_optimizer,
    optimizer_arguments,
    parallel_train_step,
    replicated_sharding,
    train_and_evaluate,
    training_optimizer,
)


def assert_trees_close(ours, theirs, atol: float = 1e-9, label: str = "") -> None:
    flat_ours = jax.tree_util.tree_leaves_with_path(ours)
    for (path, a), b in zip(flat_ours, jax.tree.leaves(theirs), strict=True):
        where = label + jax.tree_util.keystr(path)
        np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=where)


def random_batch(batch: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 1))
    masks = rng.random((batch, size, size, 1)) < 0.1
    return x, masks


def test_one_and_eight_devices_take_the_same_step(tmp_path):
    """The training's own step (its optimizer and loss, the state replicated as training
    places it) in float64 on a global batch of 8 random 32x32 images, over 1 and over 8
    devices. The shapes and the layers (``lax``, as on accelerators) of test_multidevice's
    float64 TINY_RUN, so that the 8-device program is the one its 8-device runs compile."""
    assert jax.device_count() >= 8, "conftest sets 8 host devices"
    with jax.enable_x64(True):
        config = small_config(tmp_path, dtype="float64", batch_size=8, impl="lax")
        model = CheapNet(config.features, impl=config.impl, bn_axis_name=AXIS)
        steps_per_epoch = 2
        state = initial_state(config, model, make_optimizer(config, steps_per_epoch))
        x, masks = random_batch(8, 32)
        results = []
        for count in (1, 8):
            devices = jax.devices()[:count]
            step = parallel_train_step(
                model,
                training_optimizer(config),
                devices,
                LOSSES[config.loss],
                optimizer_arguments(config, steps_per_epoch),
            )
            replicated = jax.device_put(state, replicated_sharding(devices))
            results.append(step(replicated, shard_batch(x, count), shard_batch(masks, count)))
        (one, one_out), (eight, eight_out) = results
        np.testing.assert_allclose(one_out["loss"], eight_out["loss"], rtol=0, atol=1e-9)
        assert_trees_close(one.params, eight.params)
        assert_trees_close(one.batch_stats, eight.batch_stats)
        assert not np.allclose(jax.tree.leaves(one.params)[0], jax.tree.leaves(state.params)[0])
        # Cross-replica BatchNorm: the 8-device statistics are those of the whole batch, not of
        # one device's single image, so they differ from a per-device BatchNorm.
        local = CheapNet(config.features, impl=config.impl)
        apply = jax.jit(functools.partial(local.apply, train=True, mutable=["batch_stats"]))
        _, per_device = apply({"params": state.params, "batch_stats": state.batch_stats}, x[:1])
        first = jax.tree.leaves(per_device["batch_stats"])[0]
        assert not np.allclose(first, jax.tree.leaves(eight.batch_stats)[0])


def batch_gradients(model_features: int, variables, x, masks):
    """d loss / d params of one train-mode step, computed directly (no pmap, no optimizer)."""
    model = CheapNet(model_features)

    def loss_fn(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return bce_with_logits(logits, masks)

    # Jitted: eagerly, the backward pass of the fused layers is hundreds of one-op programs,
    # each compiled on its own (15 s against one 7 s compilation, measured).
    return jax.jit(jax.grad(loss_fn))(variables["params"])


@pytest.mark.parametrize("source", ["random", "authors"])
def test_one_step_matches_pytorch(source):
    """One train-mode step (BatchNorm statistics, BCE, Adam lr 0.01) in float64 from a
    random-weight model (always) and from the authors' G=2 checkpoint (where ../shared is).
    Both G=2: the second reads the first's compiled programs from the compilation cache
    (other widths' gradients are checked against the lax reference in test_model). A batch of
    8 32x32 images and milestone 1: the float64 one-device step of the population tests' solo
    runs, compiled once for all of them."""
    torch = pytest.importorskip("torch")
    from torch_reference import load_reference, random_reference

    if source == "random":
        reference = random_reference(2, seed=5, dtype=torch.float64).train()
    else:
        reference = load_reference(checkpoint_path(2), torch.float64).train()
    features = reference.encoder1[0].out_channels
    x, masks = random_batch(8, 32, seed=3)
    with jax.enable_x64(True):
        variables = state_dict_to_variables(reference.state_dict(), dtype=np.float64)
        jax_grads = batch_gradients(features, variables, x, masks)
        model = CheapNet(features, bn_axis_name=AXIS)
        # The training's own optimizer: its learning rate an argument of the compiled step.
        config = TrainConfig(features=features, lr=0.01, milestones=(1,), dtype="float64")
        state = TrainState(
            step=jnp.array(0, jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=make_optimizer(config, 1).init(variables["params"]),
        )
        step = parallel_train_step(
            model,
            training_optimizer(config),
            jax.devices()[:1],
            optimizer_args=optimizer_arguments(config, 1),
        )
        new_state, out = step(state, x[None], masks[None])

        torch_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
        probabilities = torch.sigmoid(reference(torch.from_numpy(x).permute(0, 3, 1, 2)))
        target = torch.from_numpy(masks.astype(np.float64)).permute(0, 3, 1, 2)
        loss = torch.nn.functional.binary_cross_entropy(probabilities, target)
        torch_optimizer.zero_grad()
        loss.backward()
        grads = {name: p.grad for name, p in reference.named_parameters()}
        buffers = {name: b for name, b in reference.named_buffers()}
        torch_grads = state_dict_to_variables({**grads, **buffers}, dtype=np.float64)["params"]
        torch_optimizer.step()
        after = state_dict_to_variables(reference.state_dict(), dtype=np.float64)

        np.testing.assert_allclose(float(out["loss"]), loss.item(), rtol=0, atol=1e-9)
        assert_trees_close(jax_grads, torch_grads)
        assert_trees_close(new_state.batch_stats, after["batch_stats"])
        # Where the true gradient is zero (every conv bias: a train-mode BatchNorm follows and
        # subtracts the batch mean; a channel that feeds nothing), both sides hold rounding
        # noise, which Adam's first step (about lr * g / (|g| + eps)) turns into arbitrary moves
        # below lr. Those entries must be noise (< 1e-12) and move by < lr; the rest agree to
        # 1e-9.
        leaves = zip(
            jax.tree.leaves(new_state.params),
            jax.tree.leaves(after["params"]),
            jax.tree.leaves(variables["params"]),
            jax.tree.leaves(jax_grads),
            jax.tree.leaves(torch_grads),
            strict=True,
        )
        compared = 0
        for ours, theirs, before, grad, torch_grad in leaves:
            noise = np.maximum(np.abs(grad), np.abs(np.asarray(torch_grad))) < 1e-12
            np.testing.assert_allclose(ours[~noise], theirs[~noise], rtol=0, atol=1e-9)
            assert np.all(np.abs(np.asarray(ours - before)[noise]) <= 0.01 + 1e-12)
            compared += int((~noise).sum())
        assert compared >= 0.9 * sum(np.size(leaf) for leaf in jax.tree.leaves(after["params"]))


def test_the_schedule_as_step_arguments_is_pytorchs_adam_with_multisteplr():
    """The learning rate and the steps per epoch as arguments of a compiled update, as the
    training step takes them: 6 steps, 2 per epoch, across milestones at epochs 1 and 2, against
    torch.optim.Adam with MultiStepLR stepped once per epoch (float64)."""
    torch = pytest.importorskip("torch")
    config = TrainConfig(lr=0.05, gamma=0.1, milestones=(1, 2), dtype="float64")
    steps_per_epoch, steps = 2, 6
    rng = np.random.default_rng(0)
    start, target = rng.standard_normal(5), rng.standard_normal(5)
    weights = np.arange(1.0, 6.0)

    with jax.enable_x64(True):

        @jax.jit
        def update(args, params, opt_state):
            optimizer = training_optimizer(config)(*args)
            grads = jax.grad(lambda p: jnp.sum(weights * (p - target) ** 2))(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params = jnp.asarray(start)
        opt_state = make_optimizer(config, steps_per_epoch).init(params)
        args = optimizer_arguments(config, steps_per_epoch)
        ours = []
        for _ in range(steps):
            params, opt_state = update(args, params, opt_state)
            ours.append(np.asarray(params))

    p = torch.tensor(start, requires_grad=True)
    optimizer = torch.optim.Adam([p], lr=0.05)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1, 2], gamma=0.1)
    theirs = []
    for step in range(steps):
        optimizer.zero_grad()
        (torch.from_numpy(weights) * (p - torch.from_numpy(target)) ** 2).sum().backward()
        optimizer.step()
        theirs.append(p.detach().numpy().copy())
        if (step + 1) % steps_per_epoch == 0:
            schedule.step()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    # The reference itself crossed the milestones: Adam's largest move in each epoch is about
    # that epoch's learning rate (0.05, 0.005, 0.0005).
    moves = np.abs(np.diff([start, *theirs], axis=0)).max(axis=1)
    np.testing.assert_allclose(moves, np.repeat([0.05, 0.005, 0.0005], 2), rtol=0.01)


def test_runs_differing_in_learning_rate_or_epoch_length_compile_one_program(tmp_path):
    """The learning rate and the steps per epoch are arguments of the training step's program,
    not constants in it: two runs that differ only in them lower to the same program (one
    compilation, read back from the cache by the second); the schedule's milestones still
    make another."""
    model = CheapNet(2, bn_axis_name=AXIS)
    x, masks = random_batch(4, 16)
    x, masks = x[None].astype(np.float32), masks[None]  # [devices, b, H, W, 1], as trained

    def program(config, steps_per_epoch):
        step = parallel_train_step(
            model,
            training_optimizer(config),
            jax.devices()[:1],
            optimizer_args=optimizer_arguments(config, steps_per_epoch),
        )
        state = initial_state(config, model, make_optimizer(config, steps_per_epoch))
        return step.func.lower(*step.args, state, x, masks).as_text()

    base = small_config(tmp_path)
    assert program(base, 2) == program(small_config(tmp_path, lr=0.5), 3)
    assert program(base, 2) != program(small_config(tmp_path, milestones=(1, 2)), 2)


def test_training_writes_logs_checkpoints_and_plot(tmp_path):
    """Two devices in float64 with the layers of accelerators: the training step of the
    two-device population test's solo run of the default loss (test_population), compiled once
    for both."""
    with jax.enable_x64(True):
        config = small_config(tmp_path, devices=2, dtype="float64", impl="lax")
        figures = train_and_evaluate(config)
    assert figures["epoch"] == 1 and figures["step"] == 4
    assert figures["lr"] == pytest.approx(0.001)  # x0.1 after the milestone at epoch 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert any((tmp_path / "tensorboard").iterdir())
    assert json.loads((tmp_path / "config.json").read_text())["devices"] == 2
    model, _, meta = load_orbax_checkpoint(tmp_path)
    assert model.features == 2 and meta["normalization"]["std"] > 0
    # validation counts cover all 6 images (a padded last batch), each pixel once
    assert sum(rows[-1]["validation"]["confusion"].values()) == 6 * 32 * 32


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    train_and_evaluate(small_config(tmp_path, epochs=1))
    # A learning rate that overflows float32 (the schedule's value is inf): the first update
    # makes the parameters non-finite, the next loss is NaN.
    with pytest.raises(TrainingDivergedError, match="at epoch 2, step 3"):
        train_and_evaluate(small_config(tmp_path, epochs=3, lr=1e39), allow_changes=True)
    _, variables, meta = load_orbax_checkpoint(tmp_path)
    assert meta["epoch"] == 0
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))


def test_the_last_update_of_an_epoch_is_checked_before_it_is_saved(tmp_path):
    """One step per epoch: its loss is finite (computed before the update), the update is not.
    Checking only losses would save the non-finite parameters as the latest and the best."""
    config = small_config(tmp_path, epochs=1, lr=1e39, synthetic_train=4, batch_size=4)
    with pytest.raises(TrainingDivergedError, match="parameters became NaN/inf at epoch 1, step 1"):
        train_and_evaluate(config)
    assert not any((tmp_path / "checkpoints" / "latest").iterdir())
    assert not any((tmp_path / "checkpoints" / "best").iterdir())


def run_train(workdir, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        "--workdir",
        str(workdir),
        "--no-progress",
        "--variant",
        "S",
        "--epochs",
        "5",
        "--image-size",
        "128",
        "--synthetic-train",
        "48",
        "--synthetic-validation",
        "4",
        "--batch-size",
        "4",
        "--milestones",
        "3",
        *extra,
    ]
    return subprocess.Popen(
        command, env=cli_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )


def final_params(workdir):
    return jax.tree.leaves(load_orbax_checkpoint(workdir)[1])


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    uninterrupted = run_train(tmp_path / "a")
    assert uninterrupted.wait(timeout=600) == 0
    killed = run_train(tmp_path / "b")
    latest = tmp_path / "b" / "checkpoints" / "latest"
    kill_at_first_checkpoint(killed, latest)
    resumed = run_train(tmp_path / "b")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and "resumed from" in output
    for a, b in zip(final_params(tmp_path / "a"), final_params(tmp_path / "b"), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cheapnet_s_learns_the_synthetic_defects(tmp_path):
    """About 35 s of CPU on the ten texture families: validation defect IoU goes from 0.14 after
    the first epoch to 0.40 after 40 (0.50 with seed 1; marking every pixel scores 0.03). The
    learning rate drops at epochs 25 and 35 so that the last epoch is not a noisy sample of a
    fluctuating curve; the floors leave room for platform differences."""
    config = small_config(
        tmp_path,
        epochs=40,
        milestones=(25, 35),
        image_size=128,
        synthetic_train=64,
        synthetic_validation=32,
    )
    figures = train_and_evaluate(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]["validation"]["iou_defect"]
    last = figures["validation"]["iou_defect"]
    _, validation_masks = synthetic.make_split("validation", 32, 128, config.seed)
    assert validation_masks.mean() < 0.05  # the IoU of marking every pixel defective
    assert last >= 0.3
    assert last >= first + 0.15


def test_cli_reports_a_bad_setting_in_one_line(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--devices", "3", "--batch-size", "4"]
    command += ["--workdir", str(tmp_path), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.returncode == 1
    assert "error: --batch-size 4 must be a multiple of the 3 devices" in result.stderr
    assert "Traceback" not in result.stderr
