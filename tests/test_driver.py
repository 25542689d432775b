"""The driver's pieces that need no cluster: the meta-update, the outer learning rate and the resume guard."""

import math

import numpy as np
import pytest
import torch

from platform.chunks import chunked
from platform.config import load_config
from platform.driver import IterationRecord, apply_meta_gradient, make_optimizer, outer_lr, window_rates
from platform.train import resume_conflicts


def setup(*overrides):
    config = load_config(None, ["optim.meta_batch=4", "optim.chunk=2", "resources.workers=1", *overrides])
    params = {"a": torch.nn.Parameter(torch.zeros(2)), "b": torch.nn.Parameter(torch.zeros(1, 1))}
    return config, params, make_optimizer(config, list(params.values()))


def test_sgd_step_uses_the_mean_over_the_meta_batch():
    config, params, optimizer = setup("optim.outer_optimizer=sgd", "optim.outer_lr=0.5")
    grads = np.array([[1, 2, 3], [3, 2, 1]], np.float32)  # two chunk sums
    apply_meta_gradient(params, grads, optimizer, config, 0)
    assert torch.allclose(params["a"].detach(), -0.5 * torch.tensor([1.0, 1.0]))  # (1+3)/4, (2+2)/4
    assert torch.allclose(params["b"].detach(), -0.5 * torch.tensor([[1.0]]))


def test_the_multi_tensor_optimizers_step_bitwise_as_the_for_loop():
    """make_optimizer's foreach kernels change the speed, never a bit of the parameters."""
    for name, loop in (("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)):
        config, params, optimizer = setup(f"optim.outer_optimizer={name}", "optim.outer_lr=0.01")
        reference = {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
        reference_optimizer = loop(list(reference.values()), lr=0.01, foreach=False)
        rows = torch.Generator().manual_seed(0)
        for iteration in range(50):
            grads = (torch.randn(1, 3, generator=rows) * 10.0 ** (iteration % 7 - 4)).numpy()
            apply_meta_gradient(params, grads, optimizer, config, iteration)
            apply_meta_gradient(reference, grads, reference_optimizer, config, iteration)
        assert all(torch.equal(params[k], reference[k]) for k in params), name
        assert params["a"].abs().min() > 0  # it did step


def test_gradient_clipping_bounds_the_global_norm():
    config, params, optimizer = setup("optim.outer_optimizer=sgd", "optim.outer_lr=1", "optim.grad_clip=1")
    apply_meta_gradient(params, np.array([[40, 0, 30]], np.float32), optimizer, config, 0)
    step = torch.cat([params["a"].detach().reshape(-1), params["b"].detach().reshape(-1)])
    assert torch.allclose(step.norm(), torch.tensor(1.0)) and torch.allclose(step, -torch.tensor([0.8, 0, 0.6]))


def test_cosine_outer_lr_is_torchs_cosine_annealing():
    """The closed form, per iteration, against torch's own (recursive) CosineAnnealingLR."""
    config, _, optimizer = setup("optim.schedule=cosine", "optim.iterations=10", "optim.outer_lr=0.3")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    for iteration in range(10):
        assert math.isclose(outer_lr(config.optim, iteration), optimizer.param_groups[0]["lr"], rel_tol=1e-9)
        optimizer.step()
        scheduler.step()
    assert outer_lr(config.optim, 10) == 0 and outer_lr(config.optim, 12) == 0  # never back up past the end
    constant, _, _ = setup("optim.outer_lr=0.3")
    assert {outer_lr(constant.optim, i) for i in (0, 5, 10**6)} == {0.3}


def test_the_outer_lr_follows_the_config_not_the_restored_optimizer():
    """PBT restores a trial with a perturbed λ, a resumed run may change optim.iterations: the step
    after the restore uses the new config's rate at that iteration."""
    for schedule in ("constant", "cosine"):
        config, params, optimizer = setup(f"optim.schedule={schedule}", "optim.iterations=10")
        for iteration in range(4):
            apply_meta_gradient(params, np.ones((1, 3), np.float32), optimizer, config, iteration)
        saved = optimizer.state_dict()
        new, params2, optimizer2 = setup(f"optim.schedule={schedule}", "optim.iterations=20", "optim.outer_lr=0.01")
        optimizer2.load_state_dict(saved)
        apply_meta_gradient(params2, np.ones((1, 3), np.float32), optimizer2, new, 4)
        assert optimizer2.param_groups[0]["lr"] == outer_lr(new.optim, 4), schedule
        if schedule == "cosine":
            assert outer_lr(new.optim, 4) > outer_lr(config.optim, 4)  # the longer horizon decays later


def test_rates_over_a_window_are_sums_not_means_of_ratios():
    def record(seconds, actor, tasks):
        fields = dict.fromkeys(IterationRecord.__dataclass_fields__, 0)
        return IterationRecord(**(fields | {"seconds": seconds, "actor_compute": actor, "tasks": tasks, "val": None}))

    rate, share = window_rates([record(1.0, 0.5, 10), record(3.0, 3.0, 10)])
    assert rate == 20 / 4 and share == 0.5 / 4


def test_chunks_are_fixed_by_the_config_not_the_workers():
    assert chunked(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_resume_guard_names_changed_settings_and_allows_more_iterations():
    saved = load_config(None, []).model_dump(mode="json")
    assert resume_conflicts(saved, load_config(None, ["optim.iterations=9999"])) == []
    sized = load_config(None, ["optim.chunk=5"]).model_dump(mode="json")
    assert resume_conflicts(sized, load_config(None, ["optim.chunk=5", "resources.workers=1"])) == []
    # With chunk auto the configured workers cut the chunks: changing them would change the bits.
    (conflict,) = resume_conflicts(saved, load_config(None, ["resources.workers=1"]))
    assert conflict.startswith("resources.workers = 1: the checkpoint was trained with 2"), conflict
    conflicts = resume_conflicts(saved, load_config(None, ["model.width=8", "seed=3"]))
    assert conflicts == [
        "seed = 3: the checkpoint was trained with 0",
        "model.width = 8: the checkpoint was trained with 40",
    ]


def test_eta_counts_hours_past_a_day():
    from platform.train import duration

    assert duration(50 * 3600 + 61) == "50:01:01" and duration(59.6) == "0:01:00"


def test_shards_differ_by_at_most_one_chunk_and_the_extra_ones_go_last():
    from platform.chunks import shards

    assert [len(s) for s in shards(list(range(5)), 2)] == [2, 3]  # linspace().round() gave the same, by luck
    for chunks in range(1, 40):
        for actors in range(1, chunks + 1):
            runs = shards(list(range(chunks)), actors)
            lengths = [len(r) for r in runs]
            assert [c for run in runs for c in run] == list(range(chunks)), (
                chunks,
                actors,
            )  # contiguous, in chunk order
            assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths), (chunks, actors)
    # The default run's 7 chunks of 4, 4, 4, 4, 4, 4, 1 tasks: the short chunk joins the longer shard.
    tasks = [sum(len(c) for c in run) for run in shards(chunked(list(range(25)), 4), 2)]
    assert tasks == [12, 13]


def test_auto_chunks_split_the_meta_batch_by_the_configured_workers():
    from platform.chunks import gradient_chunks

    seeds = list(range(25))
    assert [len(c) for c in gradient_chunks(seeds, "auto", 2)] == [13, 12]
    assert [len(c) for c in gradient_chunks(seeds, "auto", 3)] == [9, 8, 8]
    assert [s for chunk in gradient_chunks(seeds, "auto", 3) for s in chunk] == seeds
    assert gradient_chunks(seeds, 4, 3) == chunked(seeds, 4)  # a chunk size in the config is kept


def test_idle_fraction_is_the_actors_wait_for_the_slowest():
    from platform.driver import idle_fraction

    def record(*shard_compute):
        fields = dict.fromkeys(IterationRecord.__dataclass_fields__, 0)
        return IterationRecord(**(fields | {"shard_compute": shard_compute, "val": None}))

    assert idle_fraction([record(2.0, 2.0)]) == 0 and idle_fraction([record(1.5)]) == 0
    assert idle_fraction([record(1.0, 3.0)]) == pytest.approx(1 / 3)  # 2 s of 6 waiting
    assert idle_fraction([record(1.0, 3.0), record(3.0, 3.0)]) == pytest.approx(2 / 12)


def test_a_relative_data_folder_is_made_absolute_unless_a_cluster_is_named(monkeypatch):
    """The actors of a private Ray instance do not run in the driver's folder; a Ray job's do run in
    its working directory, where a relative folder is meant."""
    from pathlib import Path

    from platform.driver import with_absolute_data

    preset = Path(__file__).resolve().parents[1] / "configs" / "cifar10-protonet.yaml"
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    monkeypatch.chdir(shared)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = load_config(preset, ["task.data=cifar10"])
    assert with_absolute_data(config).task.data == str(shared / "cifar10")
    absolute = with_absolute_data(config)
    assert with_absolute_data(absolute) is absolute
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert with_absolute_data(config) is config
