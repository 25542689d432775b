"""Few-shot vision on real RGB photographs: the shared CIFAR-10 subset as a user's own `folder` data set,
trained briefly in process through train() (the Ray path gives bitwise the same parameters: test_local),
meta-tested, and adapted to through the learner API from image files of another size."""

import numpy as np
import pytest
from PIL import Image

from platform.algorithms import build
from platform.config import load_config
from platform.learner import learner_from, load_images
from platform.metatest import meta_test
from platform.splits import folder_classes
from platform.train import train

PRESET = "configs/cifar10-protonet.yaml"
TASKS = 100
BRIEF = ["model.width=16", "optim.meta_batch=4", "optim.chunk=2", "optim.iterations=100", "eval.every=0"]


@pytest.fixture(scope="module")
def protonet(cifar10_source, tmp_path_factory):
    """(config, initial params, trained params): the preset, narrower and trained for 100 iterations (~7 s)."""
    where = tmp_path_factory.mktemp("cifar10-protonet")
    overrides = [f"task.data={cifar10_source}", f"checkpoint.dir={where}", "tracking.mlflow=false"]
    config = load_config(PRESET, [*BRIEF, *overrides, "resources.execution=local", "resources.workers=1"])
    _, _, initial = build(config)
    return config, initial, train(config)["params"]


def test_the_folder_split_of_ten_classes_is_6_2_2():
    sizes = {split: len(folder_classes(10, split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 6, "val": 2, "test": 2}


def test_training_on_photographs_beats_chance_and_the_untrained_embedding(protonet):
    """2-way 5-shot on the held-out classes (automobile, deer): chance is 1/2, and random conv features
    already separate these two by colour (75%), so training must also beat the untrained network."""
    config, initial, trained = protonet
    before = meta_test(config, initial, "test", TASKS, 0)
    after = meta_test(config, trained, "test", TASKS, 0)
    assert after["accuracy"] - after["accuracy_ci95"] > 0.5, after
    assert after["accuracy"] - after["accuracy_ci95"] > before["accuracy"] + before["accuracy_ci95"], (before, after)


def test_adapting_to_photographs_of_another_size(protonet, cifar10_source, tmp_path):
    """The learner API on 64x64 PNGs (photographs of the held-out classes, enlarged): converted to the
    run's 32x32 RGB as the training data was, then labelled by the user's names better than chance."""
    config, _, trained = protonet
    files = {}
    for name in ("automobile", "deer"):
        (tmp_path / name).mkdir()
        for i, source in enumerate(sorted((cifar10_source / name).iterdir())[:20]):
            with Image.open(source) as photo:
                photo.resize((64, 64), Image.Resampling.BICUBIC).save(tmp_path / name / f"{i}.png")
        files[name] = sorted((tmp_path / name).iterdir())
    learner = learner_from(config, trained)
    assert load_images(files["deer"][:2], learner.image_format).shape == (2, 3, 32, 32)
    support = [f for name in files for f in files[name][:5]]
    queries = [f for name in files for f in files[name][5:]]
    truth = [name for name in files for _ in files[name][5:]]
    predictions = learner.adapt(support, ["automobile"] * 5 + ["deer"] * 5).predict(queries)
    assert predictions.classes == ("automobile", "deer") and predictions.probabilities.shape == (30, 2)
    assert np.mean(np.array(predictions.labels) == np.array(truth)) > 0.7
