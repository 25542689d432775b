"""The task-seed contract of platform.tasks: a task is a pure function of (config, split, seed)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from platform import splits, tasks
from platform.config import TaskConfig
from platform.splits import TASK_SPLITS
from platform.streams import Stream, permutation

REPO = Path(__file__).resolve().parents[1]
SINUSOID = TaskConfig(kind="sinusoid", shots=10, query=15)
OMNIGLOT = TaskConfig(kind="omniglot", ways=5, shots=1, query=3)  # data: $METAPLATFORM_OMNIGLOT


def task_hash(task: tasks.Task) -> str:
    h = hashlib.sha256()
    for t in tensors(task):
        h.update(f"{t.dtype}{tuple(t.shape)}".encode() + t.contiguous().numpy().tobytes())
    return h.hexdigest()


def tensors(task: tasks.Task) -> tuple[torch.Tensor, ...]:
    return task.support_x, task.support_y, task.query_x, task.query_y


def assert_same_task(a: tasks.Task, b: tasks.Task) -> None:
    assert a.seed == b.seed
    for x, y in zip(tensors(a), tensors(b)):
        assert x.dtype == y.dtype and torch.equal(x, y)


def assert_different_tasks(a: tasks.Task, b: tasks.Task) -> None:
    assert not torch.equal(a.support_x, b.support_x) and not torch.equal(a.query_x, b.query_x)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def omniglot_env(omniglot, omniglot_source, omniglot_cache, monkeypatch) -> dict:
    """Environment under which task_sampler finds Omniglot (through $METAPLATFORM_OMNIGLOT) in the warm cache."""
    env = {"METAPLATFORM_OMNIGLOT": omniglot_source, "METAPLATFORM_CACHE": str(omniglot_cache)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def image_folder(root: Path, counts: dict[str, int]) -> Path:
    """root/<class>/<i>.png: `counts[class]` small gray images per class, each different."""
    for c, (name, count) in enumerate(sorted(counts.items())):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.full((12, 10), (37 * c + 11 * i) % 256, dtype=np.uint8)
            pixels[i % 12, :] = 255 - pixels[0, 0]
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


# --- sinusoid -------------------------------------------------------------------------------------


def test_sinusoid_same_seed_same_task():
    a, b = tasks.task_sampler(SINUSOID, "train"), tasks.task_sampler(SINUSOID, "train")
    assert_same_task(a.sample(7), a.sample(7))
    assert_same_task(a.sample(7), b.sample(7))  # a separately built sampler
    a.sample(8)  # sampling another task in between changes nothing: no hidden state
    assert_same_task(a.sample(7), b.sample(7))
    assert task_hash(a.sample(2**62 + 5)) == task_hash(b.sample(2**62 + 5))


def test_sinusoid_different_seeds_and_splits_differ():
    train = tasks.task_sampler(SINUSOID, "train")
    assert_different_tasks(train.sample(0), train.sample(1))
    samples = [tasks.task_sampler(SINUSOID, split).sample(3) for split in TASK_SPLITS]
    for i in range(3):
        for j in range(i + 1, 3):
            assert_different_tasks(samples[i], samples[j])
    assert len({task_hash(train.sample(s)) for s in range(50)}) == 50


def test_sinusoid_shapes_and_ranges():
    sampler = tasks.task_sampler(SINUSOID, "val")
    amplitudes, phases = [], []
    for seed in range(40):
        t = sampler.sample(seed)
        assert t.support_x.shape == t.support_y.shape == (10, 1)
        assert t.query_x.shape == t.query_y.shape == (15, 1)
        assert all(x.dtype == torch.float32 for x in tensors(t))
        x, y = torch.cat([t.support_x, t.query_x]).double(), torch.cat([t.support_y, t.query_y]).double()
        assert x.abs().max() <= 5 and y.abs().max() <= 5
        # y = A sin(x - phi) = (A cos phi) sin x - (A sin phi) cos x: support and query share A and phi.
        basis = torch.cat([torch.sin(x), torch.cos(x)], dim=1)
        coef = torch.linalg.lstsq(basis, y).solution.squeeze(1)
        assert (basis @ coef - y.squeeze(1)).abs().max() < 1e-5
        a, b = coef.tolist()
        amplitudes.append(float(np.hypot(a, b)))
        phases.append(float(np.arctan2(-b, a)))
    assert 0.1 - 1e-5 <= min(amplitudes) and max(amplitudes) <= 5 + 1e-5
    assert -1e-5 <= min(phases) and max(phases) <= np.pi + 1e-5
    assert max(amplitudes) - min(amplitudes) > 2 and max(phases) - min(phases) > 1.5  # the ranges are used


def test_sampler_rejects_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        tasks.task_sampler(SINUSOID, "validation")


# --- the project's own random streams (streams.py) -----------------------------------------------


def test_stream_words_are_sha256_in_counter_mode():
    """The stream is defined by SHA-256 alone (no NumPy generator), so no library upgrade changes a task."""
    words = Stream("task", "train", 7).words(6)
    blocks = [hashlib.sha256(f"task:train:7:{b}".encode()).digest() for b in (0, 1)]
    expected = [int.from_bytes(block[i : i + 8], "little") for block in blocks for i in range(0, 32, 8)][:6]
    assert words == expected
    stream = Stream("task", "train", 7)
    assert stream.words(1) + stream.words(4) + stream.words(1) == expected  # any cut, the same stream
    cut = Stream("task", "train", 7)
    assert cut.words(1) == expected[:1] and cut.fractions(5).tolist() == [(w >> 11) * 2.0**-53 for w in expected[1:]]
    assert Stream("task", "val", 7).words(1)[0] != words[0] and Stream("iteration", "train", 7).words(1)[0] != words[0]


def test_stream_bounded_integers_and_fractions():
    bounds = [1, 2, 3, 5, 20, 4112, 2**31 + 7, 2**63] * 50
    got = Stream("check", 1).below(bounds)
    assert all(0 <= v < b for v, b in zip(got, bounds)) and got[: len(bounds) // 50].count(0) < 3
    assert len({v for v, b in zip(got, bounds) if b == 4112}) > 40  # spread, not stuck
    f = Stream("check", 2).fractions(1000)
    assert f.dtype == np.float64 and f.min() >= 0 and f.max() < 1 and abs(f.mean() - 0.5) < 0.03


def test_stream_choice_is_distinct_and_uniform():
    counts = np.zeros(6, dtype=np.int64)
    for seed in range(3000):
        picked = Stream("task", "train", seed).choice(6, 3)
        assert len(set(picked.tolist())) == 3 and picked.min() >= 0 and picked.max() < 6
        counts[picked] += 1
    # 9000 picks of 6 items: 1500 each, standard deviation ~35; 6 sigma
    assert np.abs(counts - 1500).max() < 210, counts
    assert sorted(Stream("x").choice(20, 20).tolist()) == list(range(20))
    assert sorted(permutation(50, "k").tolist()) == list(range(50))
    with pytest.raises(ValueError, match="distinct"):
        Stream("x").choice(3, 4)


def test_tasks_and_seeds_are_pinned_across_library_versions():
    """Values the owned streams gave when they were introduced; a change here changes every run's tasks."""
    assert tasks.iteration_seeds(0, 0, 3) == [4697316251317870223, 5709541645184528364, 2316495257557676127]
    t = tasks.task_sampler(TaskConfig(kind="sinusoid", shots=2, query=1), "train").sample(0)
    assert t.support_x.flatten().tolist() == [4.862092018127441, 0.21111273765563965]
    assert t.query_x.flatten().tolist() == [-0.3289549946784973]
    assert Stream("task", "train", 0).choice(4112, 5).tolist() == [3600, 3261, 4055, 2144, 1922]  # Omniglot's classes


# --- task seeds -----------------------------------------------------------------------------------


def test_iteration_seeds():
    first = tasks.iteration_seeds(0, 0, 25)
    assert first == tasks.iteration_seeds(0, 0, 25) and len(first) == 25
    assert all(isinstance(s, int) and 0 <= s < 2**63 - 1 for s in first)
    assert len(set(first)) == 25
    assert tasks.iteration_seeds(0, 0, 10) == first[:10]  # a prefix does not depend on the count
    later = [tasks.iteration_seeds(0, it, 25) for it in range(1, 20)]
    assert all(set(s).isdisjoint(first) for s in later)
    assert set(tasks.iteration_seeds(1, 0, 25)).isdisjoint(first)  # another run seed
    assert tasks.evaluation_seeds(5) == [0, 1, 2, 3, 4]


# --- Omniglot -------------------------------------------------------------------------------------


def test_omniglot_standard_split_characters(omniglot):
    parts = {split: splits.omniglot_characters("standard", split) for split in TASK_SPLITS}
    assert {k: len(v) for k, v in parts.items()} == {"train": 1028, "val": 172, "test": 423}
    for split, chars in parts.items():
        assert len(set(chars.tolist())) == len(chars)
        assert splits.split_sizes(TaskConfig(kind="omniglot", split="standard"))[split] == 4 * len(chars)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(omniglot))) == list(range(1623))
    # Both the background and the evaluation alphabets are in meta-test (the split is a permutation of all).
    test_names = {omniglot.names[c].split("/")[0] for c in parts["test"]}
    assert test_names == {"background", "evaluation"}


# SHA-256 of the splits (json, sorted keys) as np.random.default_rng(0).permutation made them under NumPy 2.4,
# the code that measured docs/results.md; computed from that code before the splits were shipped as data.
PUBLISHED_OMNIGLOT_SPLITS = "cb93d7b5786cab936ee40f4d5a7d4665519594deceaa85437b59d3e8d5bb846a"


def test_omniglot_splits_are_the_shipped_ones_of_the_published_results():
    shipped = json.loads(splits.OMNIGLOT_SPLITS_FILE.read_text())
    canonical = {scheme: shipped[scheme] for scheme in ("standard", "background")}
    assert hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest() == PUBLISHED_OMNIGLOT_SPLITS
    for scheme in ("standard", "background"):
        for split in TASK_SPLITS:
            assert splits.omniglot_characters(scheme, split).tolist() == shipped[scheme][split]


def test_folder_split_is_an_owned_sha256_permutation():
    """Sorted by SHA-256 of ("folder-split", index), cut 15% test, 15% val, the rest train: documented, stable."""
    count = 40
    order = sorted(range(count), key=lambda i: hashlib.sha256(f"folder-split:{i}".encode()).digest())
    expected = {"test": sorted(order[:6]), "val": sorted(order[6:12]), "train": sorted(order[12:])}
    assert {split: splits.folder_classes(count, split).tolist() for split in TASK_SPLITS} == expected


def test_omniglot_background_split_characters(omniglot):
    parts = {split: splits.omniglot_characters("background", split) for split in TASK_SPLITS}
    evaluation = [c for c, name in enumerate(omniglot.names) if name.startswith("evaluation/")]
    assert parts["test"].tolist() == evaluation and len(evaluation) == 659
    background = sorted(parts["train"].tolist() + parts["val"].tolist())
    assert background == [c for c, name in enumerate(omniglot.names) if name.startswith("background/")]
    assert len(parts["val"]) == 100 and set(parts["train"].tolist()).isdisjoint(parts["val"].tolist())
    config = TaskConfig(kind="omniglot", split="background")
    assert [splits.split_sizes(config)[s] for s in TASK_SPLITS] == [864 * 4, 100 * 4, 659 * 4]
    assert splits.images_per_class(config) == 20


@pytest.mark.parametrize(("ways", "shots", "query"), [(5, 1, 3), (20, 5, 15)])
def test_omniglot_task_shapes_and_labels(omniglot_env, ways, shots, query):
    config = TaskConfig(kind="omniglot", ways=ways, shots=shots, query=query)
    sampler = tasks.task_sampler(config, "train")
    assert sampler.num_classes == 1028 * 4
    for seed in (0, 1):
        t = sampler.sample(seed)
        assert t.support_x.shape == (ways * shots, 1, 28, 28) and t.query_x.shape == (ways * query, 1, 28, 28)
        assert t.support_x.dtype == t.query_x.dtype == torch.float32
        assert t.support_y.dtype == t.query_y.dtype == torch.int64
        assert t.support_y.shape == (ways * shots,) and t.query_y.shape == (ways * query,)
        assert torch.bincount(t.support_y, minlength=ways).tolist() == [shots] * ways
        assert torch.bincount(t.query_y, minlength=ways).tolist() == [query] * ways
        for x in (t.support_x, t.query_x):
            assert x.min() >= 0 and x.max() <= 1 and x.max() == 1  # ink high, some full ink


def test_omniglot_task_images_come_from_one_rotated_character_of_the_split(omniglot_env, omniglot):
    """Each label's images are distinct images of one (character, rotation) of the split; all rotations occur."""
    split = "test"
    where = {}  # image bytes -> {(character, rotation, image index)} over the split's characters only
    for c in splits.omniglot_characters("standard", split):
        for i, image in enumerate(omniglot.class_images(c)):
            for r in range(4):
                where.setdefault(np.rot90(image, k=r).tobytes(), set()).add((int(c), r, i))
    sampler = tasks.task_sampler(TaskConfig(kind="omniglot", ways=5, shots=2, query=3), split)
    rotations = set()
    for seed in range(8):
        t = sampler.sample(seed)
        picked = []
        for label in range(5):
            x = torch.cat([t.support_x[t.support_y == label], t.query_x[t.query_y == label]])
            found = [where.get(img.tobytes(), set()) for img in (x.squeeze(1) * 255).round().to(torch.uint8).numpy()]
            classes = [{(c, r) for c, r, _ in f} for f in found]
            common = classes[0].intersection(*classes[1:])
            assert len(common) == 1, f"seed {seed}, label {label}: not one (character, rotation) of the {split} split"
            [(c, r)] = common
            assert len({i for f in found for cc, rr, i in f if (cc, rr) == (c, r)}) == 5  # without replacement
            picked.append((c, r))
            rotations.add(r)
        assert len(set(picked)) == 5
    assert rotations == {0, 1, 2, 3}


def test_omniglot_seed_contract(omniglot_env):
    a, b = tasks.task_sampler(OMNIGLOT, "train"), tasks.task_sampler(OMNIGLOT, "train")
    assert_same_task(a.sample(11), a.sample(11))
    assert_same_task(a.sample(11), b.sample(11))
    assert_different_tasks(a.sample(11), a.sample(12))
    samples = [tasks.task_sampler(OMNIGLOT, split).sample(11) for split in TASK_SPLITS]
    for i in range(3):
        for j in range(i + 1, 3):
            assert_different_tasks(samples[i], samples[j])
    seeds = tasks.iteration_seeds(0, 3, 4)
    assert len({task_hash(a.sample(s)) for s in seeds}) == 4


def test_same_task_in_a_separate_process(omniglot_env):
    """A worker on another machine rebuilds the same task from the seed alone."""
    seeds = [0, 99, 2**62 + 1]
    script = """if True:
        import hashlib, sys
        from platform import tasks
        from platform.config import TaskConfig

        def task_hash(task):
            h = hashlib.sha256()
            for t in (task.support_x, task.support_y, task.query_x, task.query_y):
                h.update(f"{t.dtype}{tuple(t.shape)}".encode() + t.contiguous().numpy().tobytes())
            return h.hexdigest()

        for kind, split in (("sinusoid", "train"), ("sinusoid", "test"), ("omniglot", "train"), ("omniglot", "val")):
            config = TaskConfig(kind=kind, ways=5, shots=1, query=3) if kind == "omniglot" else TaskConfig(kind=kind)
            sampler = tasks.task_sampler(config, split)
            for seed in map(int, sys.argv[1:]):
                print(task_hash(sampler.sample(seed)))
    """
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, seeds)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = []
    for config, split in ((SINUSOID, "train"), (SINUSOID, "test"), (OMNIGLOT, "train"), (OMNIGLOT, "val")):
        config = TaskConfig(kind="sinusoid") if config.kind == "sinusoid" else config
        sampler = tasks.task_sampler(config, split)
        expected += [task_hash(sampler.sample(s)) for s in seeds]
    assert result.stdout.split() == expected


# --- the user's image folders ---------------------------------------------------------------------


def test_folder_classes_and_images_per_class(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPLATFORM_CACHE", str(tmp_path / "cache"))
    counts = {f"class{c:02d}": 4 + c % 3 for c in range(10)}  # 4, 5 or 6 images each
    root = image_folder(tmp_path / "mine", counts)
    config = TaskConfig(kind="folder", data=str(root), ways=2, shots=1, query=2)
    sizes = {split: splits.split_sizes(config)[split] for split in TASK_SPLITS}
    assert sizes == {"train": 6, "val": 2, "test": 2}
    assert splits.images_per_class(config) == 4

    chosen = {}
    for split in TASK_SPLITS:
        sampler = tasks.task_sampler(config, split)
        assert sampler.num_classes == sizes[split]
        chosen[split] = set(sampler.classes.tolist())
        t = sampler.sample(0)
        assert t.support_x.shape == (2, 1, 28, 28) and t.query_x.shape == (4, 1, 28, 28)
        assert_same_task(t, tasks.task_sampler(config, split).sample(0))
    assert set().union(*chosen.values()) == set(range(10))
    assert sum(len(c) for c in chosen.values()) == 10


def test_folder_ignores_hidden_folders_and_other_files(tmp_path, monkeypatch):
    """What split_sizes/images_per_class count (to check a config) is what the sampler loads."""
    monkeypatch.setenv("METAPLATFORM_CACHE", str(tmp_path / "cache"))
    root = image_folder(tmp_path / "mine", {f"c{c}": 3 for c in range(7)})
    (root / ".thumbnails").mkdir()  # ignored by load_image_folder
    (root / "c0" / "notes.txt").write_text("not an image")
    (root / "c0" / ".DS_Store").write_bytes(b"junk")
    (root / "README.txt").write_text("ignored")
    config = TaskConfig(kind="folder", data=str(root))
    assert splits.images_per_class(config) == 3
    for split in TASK_SPLITS:
        assert splits.split_sizes(config)[split] == tasks.task_sampler(config, split).num_classes
    assert sum(splits.split_sizes(config).values()) == 7


def rgb_folder(root: Path, classes: int = 10, per_class: int = 5) -> Path:
    """root/<class>/<i>.png: random 20x24 RGB images, so every crop and flip of one is told apart."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_rgb_folder_tasks_are_the_cached_pixels_over_255(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPLATFORM_CACHE", str(tmp_path / "cache"))
    config = TaskConfig(kind="folder", data=str(rgb_folder(tmp_path / "rgb")), ways=2, shots=1, query=3)
    config = config.model_copy(update={"image_size": 16, "channels": 3})
    sampler = tasks.task_sampler(config, "train")
    task = sampler.sample(0)
    assert task.support_x.shape == (2, 3, 16, 16) and task.query_x.shape == (6, 3, 16, 16)
    pixels = np.array(sampler.images.images)  # a writable copy of the memory map
    assert pixels.shape == (50, 3, 16, 16)
    for image in torch.cat([task.support_x, task.query_x]):
        assert any(torch.equal(image, torch.from_numpy(p).float() / 255) for p in pixels)


def crops_and_flips(image: torch.Tensor, padding: int) -> list[tuple[tuple[int, int, bool], torch.Tensor]]:
    """Every augmentation of `image` (C, H, W): ((dy, dx, flipped), the crop of it padded with black)."""
    padded = torch.nn.functional.pad(image, [padding] * 4)
    h, w = image.shape[-2:]
    views = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            views += [((dy, dx, False), crop), ((dy, dx, True), crop.flip(-1))]
    return views


def test_training_augmentation_is_drawn_from_the_task_seed(tmp_path, monkeypatch):
    """task.crop_padding / task.flip: each training image is a random padded crop of itself, flipped or not;
    the task is still a pure function of its seed, with the same classes and images as without
    augmentation; meta-validation and meta-test tasks are never augmented."""
    monkeypatch.setenv("METAPLATFORM_CACHE", str(tmp_path / "cache"))
    root = rgb_folder(tmp_path / "rgb")
    plain = TaskConfig(kind="folder", data=str(root), ways=2, shots=2, query=3, image_size=16, channels=3)
    augmented = plain.model_copy(update={"crop_padding": 2, "flip": True})
    draws = set()
    for seed in range(4):
        ours, original = (tasks.task_sampler(c, "train").sample(seed) for c in (augmented, plain))
        assert_same_task(ours, tasks.task_sampler(augmented, "train").sample(seed))
        assert torch.equal(ours.support_y, original.support_y) and torch.equal(ours.query_y, original.query_y)
        pairs = zip(torch.cat([ours.support_x, ours.query_x]), torch.cat([original.support_x, original.query_x]))
        for image, source in pairs:
            [draw] = [d for d, view in crops_and_flips(source, 2) if torch.equal(view, image)]
            draws.add(draw)
    assert {d[2] for d in draws} == {False, True} and len({d[:2] for d in draws}) > 5
    for split in ("val", "test"):
        assert_same_task(tasks.task_sampler(augmented, split).sample(0), tasks.task_sampler(plain, split).sample(0))


def test_folder_and_sinusoid_errors(tmp_path):
    from platform.data import DataError

    with pytest.raises(DataError, match="needs task.data"):
        splits.split_sizes(TaskConfig(kind="folder"))
    with pytest.raises(DataError, match="no such folder"):
        splits.split_sizes(TaskConfig(kind="folder", data=str(tmp_path / "absent")))
    with pytest.raises(ValueError, match="no classes"):
        splits.split_sizes(SINUSOID)
    assert splits.images_per_class(SINUSOID) is None
