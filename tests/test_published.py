"""Tests of platform.published on tiny files in the benchmarks' exact published layouts (tests/benchmark_files.py):
what is listed, what is loaded and split, the shipped split lists, and every broken file as one clear DataError."""

import io
import json
import pickle
import re
import subprocess
import sys
import tarfile

import benchmark_files as bf
import boto3
import numpy as np
import pytest
from PIL import Image
from services import file_server

from platform import published, splits, tasks
from platform.config import ConfigError, TaskConfig, load_config
from platform.images import DataError, ImageFormat
from platform.train import train

RGB16 = ImageFormat(16, 3)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPLATFORM_CACHE", str(tmp_path / "cache"))


def split_names(images, split: str) -> list[str]:
    return [images.names[i] for i in published.split_classes(images, split)]


# --- the shipped split lists ------------------------------------------------------------------------


def test_the_shipped_splits_are_the_published_sizes_and_disjoint():
    cifarfs, fc100 = bf.CIFARFS_SPLIT, bf.FC100_SPLIT
    assert [len(cifarfs[s]) for s in bf.SPLITS] == [64, 16, 20]
    assert [len(fc100[s]) for s in bf.SPLITS] == [12, 4, 4]
    for lists, total in ((cifarfs, 100), (fc100, 20)):
        assert len({name for s in bf.SPLITS for name in lists[s]}) == total
    assert {"whale", "poppy", "pickup_truck", "plain"} <= set(cifarfs["test"])  # spot checks against the paper's list
    assert fc100["test"] == ["aquatic_mammals", "insects", "medium_mammals", "people"]


def test_cub_split_is_chen_et_al_rule_over_200_classes():
    split = [published._cub_split(i) for i in range(200)]
    assert [split.count(s) for s in bf.SPLITS] == [100, 50, 50]
    assert split[:8] == ["train", "val", "train", "test", "train", "val", "train", "test"]


# --- each layout ------------------------------------------------------------------------------------


def test_miniimagenet_csv_layout(tmp_path):
    root = bf.miniimagenet_csv(tmp_path / "mini")
    assert published.benchmark_counts("miniimagenet", root) == {s: [4, 4, 4] for s in bf.SPLITS}
    images = published.load_benchmark("miniimagenet", root, RGB16)
    assert images.images.shape == (36, 3, 16, 16)
    assert split_names(images, "val") == [f"val/{w}" for w in bf.wnids("val", 3)]
    first = root / "images" / f"{bf.wnids('train', 3)[0]}00000001.jpg"
    np.testing.assert_array_equal(images.class_images(0)[0], RGB16.decode(first.read_bytes, str(first)))


def test_miniimagenet_pickles_keep_the_pixels_at_84(tmp_path):
    root = bf.miniimagenet_pickles(tmp_path / "mini")
    assert published.benchmark_counts("miniimagenet", root)["test"] == [4, 4, 4]
    images = published.load_benchmark("miniimagenet", root, ImageFormat(84, 3))
    with open(root / "mini-imagenet-cache-test.pkl", "rb") as f:
        cache = pickle.load(f)
    wnid = sorted(cache["class_dict"])[1]
    c = images.names.index(f"test/{wnid}")
    expected = cache["image_data"][cache["class_dict"][wnid]].transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(images.class_images(c), expected)


def test_tieredimagenet_folders(tmp_path):
    root = bf.tieredimagenet(tmp_path / "tiered")
    config = TaskConfig(kind="tieredimagenet", data=str(root), ways=3, shots=1, query=2, image_size=16)
    assert splits.split_sizes(config) == {"train": 3, "val": 3, "test": 3} and splits.images_per_class(config) == 3
    sampler = tasks.task_sampler(config, "test")
    assert [sampler.images.names[c] for c in sampler.classes] == [f"test/{w}" for w in bf.wnids("test", 3)]
    assert sampler.sample(0).query_x.shape == (6, 3, 16, 16)


@pytest.mark.parametrize("kind, sizes", [("cifarfs", [64, 16, 20]), ("fc100", [60, 20, 20])])
def test_cifar100_splits(tmp_path, kind, sizes):
    root = bf.cifar100(tmp_path / "cifar", per_class=(2, 1))
    counts = published.benchmark_counts(kind, root)
    assert [len(counts[s]) for s in bf.SPLITS] == sizes and {n for s in bf.SPLITS for n in counts[s]} == {3}
    images = published.load_benchmark(kind, root, ImageFormat(32, 3))
    if kind == "cifarfs":
        assert sorted(n.split("/")[1] for n in split_names(images, "test")) == sorted(bf.CIFARFS_SPLIT["test"])
    with open(root / "cifar-100-python" / "train", "rb") as f:
        train_rows = pickle.load(f, encoding="bytes")[b"data"]
    fine_names = sorted(n for s in bf.SPLITS for n in bf.CIFARFS_SPLIT[s])
    c = images.names.index(next(n for n in images.names if n.endswith("/apple")))
    apple = fine_names.index("apple")  # its train rows are 2 * apple and 2 * apple + 1, then its test row
    np.testing.assert_array_equal(images.class_images(c)[1], train_rows[2 * apple + 1].reshape(3, 32, 32))


def test_fc100_classes_are_the_fine_classes_of_its_superclasses(tmp_path):
    root = bf.cifar100(tmp_path / "cifar")
    images = published.load_benchmark("fc100", root, ImageFormat(32, 3))
    coarse_names = sorted(n for s in bf.SPLITS for n in bf.FC100_SPLIT[s])
    fine_names = sorted(n for s in bf.SPLITS for n in bf.CIFARFS_SPLIT[s])
    test_superclasses = {coarse_names.index(n) for n in bf.FC100_SPLIT["test"]}  # fine class i is in i % 20
    expected = sorted(f"test/{fine_names[i]}" for i in range(100) if i % 20 in test_superclasses)
    assert sorted(split_names(images, "test")) == expected


def test_cub_tree(tmp_path):
    root = bf.cub(tmp_path / "cub")
    assert published.benchmark_counts("cub", root) == {"train": [3] * 4, "val": [3] * 2, "test": [3] * 2}
    images = published.load_benchmark("cub", root / "CUB_200_2011", RGB16)  # the folder itself works too
    assert split_names(images, "test") == ["test/004.Bird_D", "test/008.Bird_H"]


def test_a_benchmark_defaults_to_its_own_size_in_rgb():
    assert (TaskConfig(kind="miniimagenet").image_size, TaskConfig(kind="miniimagenet").channels) == (84, 3)
    assert TaskConfig(kind="fc100").image_size == 32 and TaskConfig(kind="cub", image_size=64).image_size == 64
    assert TaskConfig(kind="folder").image_format == ImageFormat(28, 1)  # the other kinds as they were


# --- broken files -----------------------------------------------------------------------------------


def corrupt_jpeg(root):
    victim = sorted((root / "images").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:40])
    return victim


def truncated(path):
    path.write_bytes(path.read_bytes()[:100])
    return path


def evil_pickle(path):
    class Shell:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(path.parent / "pwned")],))

    path.write_bytes(pickle.dumps({"image_data": Shell(), "class_dict": {}}))
    return path


BROKEN = {
    "missing csv": ("miniimagenet", bf.miniimagenet_csv, lambda r: (r / "val.csv").unlink(), "val.csv: not found"),
    "bad header": ("miniimagenet", bf.miniimagenet_csv, lambda r: (r / "test.csv").write_text("a,b\nx,y\n"), "header"),
    "bad row": (
        "miniimagenet",
        bf.miniimagenet_csv,
        lambda r: (r / "train.csv").write_text("filename,label\nonly-one-field\n"),
        "train.csv: line 2",
    ),
    "unlisted image": (
        "miniimagenet",
        bf.miniimagenet_csv,
        lambda r: min((r / "images").iterdir()).unlink(),
        "not found, but train.csv lists it",
    ),
    "class in two splits": (
        "miniimagenet",
        bf.miniimagenet_csv,
        lambda r: (r / "val.csv").write_text((r / "train.csv").read_text()),
        "in both train and val",
    ),
    "missing pickle": (
        "miniimagenet",
        bf.miniimagenet_pickles,
        lambda r: (r / "mini-imagenet-cache-val.pkl").unlink(),
        "mini-imagenet-cache-val.pkl: not found",
    ),
    "truncated pickle": (
        "miniimagenet",
        bf.miniimagenet_pickles,
        lambda r: truncated(r / "mini-imagenet-cache-test.pkl"),
        "mini-imagenet-cache-test.pkl: not a readable data pickle",
    ),
    "pickle that runs code": (
        "miniimagenet",
        bf.miniimagenet_pickles,
        lambda r: evil_pickle(r / "mini-imagenet-cache-train.pkl"),
        "subprocess.call, which is not plain data",
    ),
    "wrong pickle content": (
        "miniimagenet",
        bf.miniimagenet_pickles,
        lambda r: (r / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps({"image_data": [1], "class_dict": {}})),
        "image_data is list; expected uint8 images",
    ),
    "missing tiered split": (
        "tieredimagenet",
        bf.tieredimagenet,
        lambda r: _rmtree(r / "val"),
        "val: image folder not found",
    ),
    "missing cifar meta": (
        "cifarfs",
        bf.cifar100,
        lambda r: (r / "cifar-100-python" / "meta").unlink(),
        "meta: not found",
    ),
    "meta of another archive": (
        "cifarfs",
        bf.cifar100,
        lambda r: (r / "cifar-100-python" / "meta").write_bytes(
            pickle.dumps({b"fine_label_names": [b"cat"] * 100, b"coarse_label_names": [b"pets"] * 20})
        ),
        "fine_label_names lacks",
    ),
    "cifar rows of another shape": (
        "fc100",
        bf.cifar100,
        lambda r: (r / "cifar-100-python" / "test").write_bytes(
            pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1], b"coarse_labels": [0, 1]})
        ),
        "test: data is uint8 (2, 10)",
    ),
    "missing cub classes.txt": (
        "cub",
        bf.cub,
        lambda r: (r / "CUB_200_2011" / "classes.txt").unlink(),
        "classes.txt: not found",
    ),
    "bad cub line": (
        "cub",
        bf.cub,
        lambda r: (r / "CUB_200_2011" / "images.txt").write_text("not-a-line\n"),
        "images.txt: line 1",
    ),
    "cub image of no class": (
        "cub",
        bf.cub,
        lambda r: (r / "CUB_200_2011" / "images.txt").write_text("1 999.Nobody/x.jpg\n"),
        "expected <class folder of classes.txt>/<image>",
    ),
}


def _rmtree(path):
    import shutil

    shutil.rmtree(path)


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_a_broken_file_is_one_data_error_naming_it(tmp_path, case):
    kind, write, damage, message = BROKEN[case]
    root = write(tmp_path / "data")
    damage(root)
    with pytest.raises(DataError, match=re.escape(message)):
        published.load_benchmark(kind, root, RGB16)
    assert not (root / "pwned").exists()


def test_a_corrupt_image_is_found_when_decoding(tmp_path):
    root = bf.miniimagenet_csv(tmp_path / "mini")
    victim = corrupt_jpeg(root)
    assert published.benchmark_counts("miniimagenet", root)["train"] == [4, 4, 4]  # listing reads no image
    with pytest.raises(DataError, match=f"{victim}: cannot read the image"):
        published.load_benchmark("miniimagenet", root, RGB16)
    assert not [p for p in (tmp_path / "cache" / "images").iterdir() if p.is_dir()]  # no entry, not even a temp one


def test_a_missing_benchmark_is_exit_2_naming_what_it_needs(tmp_path):
    with pytest.raises(ConfigError, match="task.kind 'cub' needs task.data: CUB_200_2011/"):
        load_config(None, ["task.kind=cub", "model.kind=conv4"])
    result = subprocess.run(
        [sys.executable, "-m", "platform.train", "task.kind=cifarfs", "model.kind=conv4", f"task.data={tmp_path}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{tmp_path}/train: not found; task.kind cifarfs needs cifar-100-python/" in result.stderr


# --- from a URL: CIFAR-100's and CUB's archives, miniImageNet's pickles -----------------------------------


@pytest.fixture
def served(tmp_path):
    """(folder, base URL): the loopback file server (tests/services.py) serving the folder."""
    folder = tmp_path / "served" / "data"
    folder.mkdir(parents=True)
    with file_server(tmp_path / "served") as base:
        yield folder, f"{base}/data"


def cifar_archive(tmp_path, folder):
    """`folder`/cifar-100-python.tar.gz made of a stand-in archive, as the official one is laid out."""
    root = bf.cifar100(tmp_path / "cifar-source")
    with tarfile.open(folder / published.CIFAR100_ARCHIVE, "w:gz") as tar:
        tar.add(root / "cifar-100-python", arcname="cifar-100-python")
    return root


def cub_archive(tmp_path, folder):
    """`folder`/CUB_200_2011.tgz made of a stand-in tree, as the official archive is laid out, plus a member
    that is not read and an empty one named to climb out of images/ onto classes.txt (neither is extracted)."""
    root = bf.cub(tmp_path / "cub-source")
    with tarfile.open(folder / published.CUB_ARCHIVE, "w:gz") as tar:
        tar.add(root / "CUB_200_2011", arcname="CUB_200_2011")
        for name in ("CUB_200_2011/attributes/certainties.txt", "CUB_200_2011/images/../classes.txt"):
            tar.addfile(tarfile.TarInfo(name))
    return root


def no_download_but_locks(tmp_path) -> bool:
    downloads = tmp_path / "cache" / "downloads"
    return not downloads.exists() or all(p.suffix == ".lock" for p in downloads.iterdir())


def test_cifar100_archive_from_a_url_is_downloaded_once(tmp_path, served):
    folder, url = served
    local = cifar_archive(tmp_path, folder)
    before = published.benchmark_counts("fc100", url)  # a check fetches nothing: the published counts
    assert [len(before[s]) for s in bf.SPLITS] == [60, 20, 20] and {n for s in bf.SPLITS for n in before[s]} == {600}
    assert no_download_but_locks(tmp_path)
    images = published.load_benchmark("fc100", url, ImageFormat(32, 3))
    assert published.benchmark_counts("fc100", url)["test"] == [2] * 20  # now the downloaded files'
    (folder / published.CIFAR100_ARCHIVE).unlink()  # from the cache from now on
    again = published.load_benchmark("fc100", url, ImageFormat(32, 3))
    np.testing.assert_array_equal(again.images, images.images)
    assert published.load_benchmark("fc100", local, ImageFormat(32, 3)).images.filename == images.images.filename


def test_miniimagenet_pickles_from_a_url_are_downloaded_once(tmp_path, served):
    folder, url = served
    local = bf.miniimagenet_pickles(folder)
    config = TaskConfig(kind="miniimagenet", data=url, ways=5, shots=5, query=15)
    assert splits.split_sizes(config) == {"train": 64, "val": 16, "test": 20}  # published, nothing fetched
    assert splits.images_per_class(config) == 600 and no_download_but_locks(tmp_path)
    images = published.load_benchmark("miniimagenet", url, ImageFormat(84, 3))
    assert published.benchmark_counts("miniimagenet", url) == {s: [4, 4, 4] for s in bf.SPLITS}
    reference = published.load_benchmark("miniimagenet", local, ImageFormat(84, 3))
    assert reference.images.filename == images.images.filename  # one cache entry: keyed by content
    for pickle_file in folder.iterdir():
        pickle_file.unlink()
    np.testing.assert_array_equal(
        published.load_benchmark("miniimagenet", url, ImageFormat(84, 3)).images, images.images
    )


def test_cub_archive_from_a_url_is_downloaded_once(tmp_path, served):
    folder, url = served
    local = cub_archive(tmp_path, folder)
    config = TaskConfig(kind="cub", data=url, ways=5, shots=5, query=15)
    assert splits.split_sizes(config) == {"train": 100, "val": 50, "test": 50}  # Chen et al.'s rule over 200
    assert splits.images_per_class(config) is None and no_download_but_locks(tmp_path)  # CUB's vary: not published
    images = published.load_benchmark("cub", url, RGB16)
    assert split_names(images, "test") == ["test/004.Bird_D", "test/008.Bird_H"]
    assert splits.images_per_class(config) == 3  # now the downloaded archive's
    extracted = next((tmp_path / "cache" / "downloads").glob("*.d"))
    assert sorted(p.name for p in extracted.rglob("*") if p.is_file() and p.suffix == ".txt") == [
        "classes.txt",
        "images.txt",
    ]
    (folder / published.CUB_ARCHIVE).unlink()
    np.testing.assert_array_equal(published.load_benchmark("cub", url, RGB16).images, images.images)
    assert published.load_benchmark("cub", local, RGB16).images.filename == images.images.filename


@pytest.mark.parametrize("archive", [published.CIFAR100_ARCHIVE, published.CUB_ARCHIVE])
def test_the_official_urls_are_verified(tmp_path, served, monkeypatch, archive):
    folder, url = served
    kind = "cifarfs" if archive == published.CIFAR100_ARCHIVE else "cub"
    (cifar_archive if kind == "cifarfs" else cub_archive)(tmp_path, folder)
    official_md5 = published.OFFICIAL[archive][1]
    monkeypatch.setitem(published.OFFICIAL, archive, (url, official_md5))  # the stand-in is not the real archive
    with pytest.raises(DataError, match=re.escape(f"{url}/{archive}: md5 checksum mismatch (expected {official_md5}")):
        published.load_benchmark(kind, url, RGB16)


def test_a_missing_file_at_a_url_is_one_error_naming_it(tmp_path, served):
    folder, url = served
    bf.miniimagenet_pickles(folder)
    (folder / "mini-imagenet-cache-val.pkl").unlink()
    with pytest.raises(
        DataError, match=re.escape(f"{url}/mini-imagenet-cache-val.pkl: download failed (HTTP Error 404")
    ):
        published.load_benchmark("miniimagenet", url, RGB16)
    with pytest.raises(DataError, match=re.escape(f"{url}/{published.CUB_ARCHIVE}: download failed (HTTP Error 404")):
        published.load_benchmark("cub", url, RGB16)
    with pytest.raises(DataError, match="task.kind tieredimagenet reads a local folder"):
        published.benchmark_counts("tieredimagenet", url)


def test_a_corrupt_download_is_one_error_naming_it(tmp_path, served):
    folder, url = served
    truncated(bf.miniimagenet_pickles(folder) / "mini-imagenet-cache-test.pkl")
    with pytest.raises(
        DataError, match=r"-mini-imagenet-cache-test.pkl: not a readable data pickle .*; delete it from"
    ):
        published.load_benchmark("miniimagenet", url, RGB16)
    (folder / published.CUB_ARCHIVE).write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=r"-CUB_200_2011.tgz: not a readable tar.gz .*; delete it from"):
        published.load_benchmark("cub", url, RGB16)
    assert not list((tmp_path / "cache" / "downloads").glob(".*"))  # no half-extracted folder
    with tarfile.open(folder / published.CIFAR100_ARCHIVE, "w:gz") as tar:
        tar.add(bf.tieredimagenet(tmp_path / "other"), arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match="no cifar-100-python/train in it"):
        published.load_benchmark("cifarfs", url, RGB16)


def test_s3_sources_are_checked_then_downloaded_once(tmp_path, s3_bucket):
    s3, base = boto3.client("s3"), f"s3://{s3_bucket}/benchmarks"
    check = ["model.kind=conv4", "task.ways=2", "task.shots=1", "task.query=2", f"task.data={base}"]
    with pytest.raises(ConfigError, match=re.escape(f"{base}/mini-imagenet-cache-train.pkl: no such object")):
        load_config(None, ["task.kind=miniimagenet", *check])  # one HEAD per file, as Omniglot's zips
    local = bf.miniimagenet_pickles(tmp_path / "mini")
    for name in published.MINIIMAGENET_PICKLES:
        s3.upload_file(str(local / name), s3_bucket, f"benchmarks/{name}")
    cub_archive(tmp_path, tmp_path)
    s3.upload_file(str(tmp_path / published.CUB_ARCHIVE), s3_bucket, f"benchmarks/{published.CUB_ARCHIVE}")
    for kind in ("miniimagenet", "cub"):
        load_config(None, [f"task.kind={kind}", *check])
    assert no_download_but_locks(tmp_path)  # a check downloads nothing
    loaded = {kind: published.load_benchmark(kind, base, RGB16) for kind in ("miniimagenet", "cub")}
    for key in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]:
        s3.delete_object(Bucket=s3_bucket, Key=key["Key"])
    for kind, images in loaded.items():
        load_config(None, [f"task.kind={kind}", *check])  # in the cache: no HEAD asked
        np.testing.assert_array_equal(published.load_benchmark(kind, base, RGB16).images, images.images)


# --- the folder kind's new options --------------------------------------------------------------------


def test_folder_class_lists_make_5_way_cifar10_possible(cifar10_source):
    five = "[airplane, automobile, deer, ship, truck]"
    overrides = [
        f"task.data={cifar10_source}",
        "task.ways=5",
        f"task.classes={{train: [bird, cat, dog, frog, horse], val: {five}, test: {five}}}",
    ]
    config = load_config("configs/cifar10-protonet.yaml", overrides)
    assert splits.split_sizes(config.task) == {"train": 5, "val": 5, "test": 5}
    names = sorted(p.name for p in cifar10_source.iterdir())
    train = splits.folder_split(config.task, names, "train")
    assert [names[i] for i in train] == ["bird", "cat", "dog", "frog", "horse"]
    with pytest.raises(ConfigError, match=r"task.classes.val: \['cow'\] not class folders"):
        load_config(
            "configs/cifar10-protonet.yaml", [*overrides[:2], "task.classes={train: [bird], val: [cow], test: [cat]}"]
        )


def test_class_list_rules(cifar10_source):
    data = f"task.data={cifar10_source}"
    with pytest.raises(ConfigError) as refused:
        load_config(
            "configs/cifar10-protonet.yaml", [data, "task.classes={train: [cat, cat, dog], val: [dog], test: []}"]
        )
    assert refused.value.problems == [
        "configs/cifar10-protonet.yaml: task.classes.test: missing or empty; give the class folders of every split",
        "configs/cifar10-protonet.yaml: task.classes.train: ['cat'] listed more than once",
        "configs/cifar10-protonet.yaml: task.classes.val: ['dog'] also in task.classes.train; train shares no class",
    ]
    with pytest.raises(ConfigError, match="task.classes: only for task.kind 'folder'"):
        load_config(None, ["task.kind=cub", "task.classes={train: [a], val: [b], test: [c]}"])


def test_grayscale_without_inversion(tmp_path):
    (tmp_path / "c").mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 30, np.uint8)).save(buf, "PNG")
    read = buf.getvalue
    assert ImageFormat(8, 1).decode(read, "x")[0, 0] == 225  # today's: inverted
    assert ImageFormat(8, 1, invert=False).decode(read, "x")[0, 0] == 30
    assert ImageFormat(8, 1).preprocessing == "v1 grayscale, LANCZOS 8x8, inverted"  # the cache keys of before
    assert TaskConfig(channels=1, invert=False).image_format.invert is False


# --- a preset on stand-in data --------------------------------------------------------------------------


def test_the_cifarfs_preset_trains_on_a_stand_in_archive(tmp_path):
    root = bf.cifar100(tmp_path / "cifar", per_class=(10, 10))
    brief = [
        "model.width=8",
        "optim.iterations=3",
        "optim.meta_batch=2",
        "optim.chunk=1",
        "eval.every=3",
        "eval.tasks=2",
    ]
    where = [f"task.data={root}", f"checkpoint.dir={tmp_path / 'run'}", "tracking.mlflow=false"]
    config = load_config(
        "configs/cifarfs-protonet.yaml", [*brief, *where, "resources.execution=local", "resources.workers=1"]
    )
    state = train(config)
    assert state["iteration"] == 3 and np.isfinite(state["history"][-1]["val"]["accuracy"]), state["history"]
    assert json.loads(json.dumps(state["config"]))["task"]["kind"] == "cifarfs"
