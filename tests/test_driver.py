"""The driver's pieces that need no cluster: the meta-update and the resume guard."""

import numpy as np
import torch

from platform.config import load_config
from platform.engine import GRAD_METRICS, chunked
from platform.train import apply_meta_gradient, make_optimizer, resume_conflicts, set_outer_lr


def rows_for(grads: list[np.ndarray]) -> np.ndarray:
    tail = np.zeros((len(grads), len(GRAD_METRICS)), dtype=np.float32)
    return np.concatenate([np.stack(grads), tail], axis=1)


def setup(*overrides):
    config = load_config(None, ["optim.meta_batch=4", "optim.chunk=2", "resources.workers=1", *overrides])
    params = {"a": torch.nn.Parameter(torch.zeros(2)), "b": torch.nn.Parameter(torch.zeros(1, 1))}
    optimizer, scheduler = make_optimizer(config, list(params.values()))
    return config, params, optimizer, scheduler


def test_sgd_step_uses_the_mean_over_the_meta_batch():
    config, params, optimizer, scheduler = setup("optim.outer_optimizer=sgd", "optim.outer_lr=0.5")
    rows = rows_for([np.array([1, 2, 3], np.float32), np.array([3, 2, 1], np.float32)])  # two chunk sums
    apply_meta_gradient(params, rows, config, optimizer, scheduler)
    assert torch.allclose(params["a"].detach(), -0.5 * torch.tensor([1.0, 1.0]))  # (1+3)/4, (2+2)/4
    assert torch.allclose(params["b"].detach(), -0.5 * torch.tensor([[1.0]]))


def test_gradient_clipping_bounds_the_global_norm():
    config, params, optimizer, scheduler = setup("optim.outer_optimizer=sgd", "optim.outer_lr=1", "optim.grad_clip=1")
    apply_meta_gradient(params, rows_for([np.array([40, 0, 30], np.float32)]), config, optimizer, scheduler)
    step = torch.cat([params["a"].detach().reshape(-1), params["b"].detach().reshape(-1)])
    assert torch.allclose(step.norm(), torch.tensor(1.0)) and torch.allclose(step, -torch.tensor([0.8, 0, 0.6]))


def test_cosine_schedule_decays_to_zero_over_the_run():
    config, params, optimizer, scheduler = setup("optim.schedule=cosine", "optim.iterations=10")
    for _ in range(10):
        apply_meta_gradient(params, rows_for([np.ones(3, np.float32)]), config, optimizer, scheduler)
    assert optimizer.param_groups[0]["lr"] < 1e-9


def test_a_restored_optimizer_follows_a_new_outer_lr():
    """PBT restores a trial with a perturbed lambda: the restored schedule continues from the new one."""
    for schedule in ("constant", "cosine"):
        config, params, optimizer, scheduler = setup(f"optim.schedule={schedule}", "optim.iterations=10")
        for _ in range(4):
            apply_meta_gradient(params, rows_for([np.ones(3, np.float32)]), config, optimizer, scheduler)
        saved = optimizer.state_dict(), scheduler.state_dict()
        new, params2, optimizer2, scheduler2 = setup(
            f"optim.schedule={schedule}", "optim.iterations=10", "optim.outer_lr=0.01"
        )
        optimizer2.load_state_dict(saved[0])
        scheduler2.load_state_dict(saved[1])
        set_outer_lr(optimizer2, scheduler2, new, 4)
        # A run of 10 iterations with lambda 0.01 from the start has, at iteration 4 and 5:
        reference, p3, optimizer3, scheduler3 = setup(
            f"optim.schedule={schedule}", "optim.iterations=10", "optim.outer_lr=0.01"
        )
        for step in (4, 5):
            while scheduler3.last_epoch < step:
                apply_meta_gradient(p3, rows_for([np.ones(3, np.float32)]), reference, optimizer3, scheduler3)
            assert np.isclose(optimizer2.param_groups[0]["lr"], optimizer3.param_groups[0]["lr"], rtol=1e-9), (
                schedule,
                step,
            )
            apply_meta_gradient(params2, rows_for([np.ones(3, np.float32)]), new, optimizer2, scheduler2)


def test_chunks_are_fixed_by_the_config_not_the_workers():
    assert chunked(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_resume_guard_names_changed_settings_and_allows_more_iterations():
    saved = load_config(None, []).model_dump(mode="json")
    assert resume_conflicts(saved, load_config(None, ["optim.iterations=9999", "resources.workers=1"])) == []
    conflicts = resume_conflicts(saved, load_config(None, ["model.width=8", "seed=3"]))
    assert conflicts == [
        "seed = 3: the checkpoint was trained with 0",
        "model.width = 8: the checkpoint was trained with 40",
    ]


def test_eta_counts_hours_past_a_day():
    from platform.train import duration

    assert duration(50 * 3600 + 61) == "50:01:01" and duration(59.6) == "0:01:00"
