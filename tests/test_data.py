"""Tests of platform.data: Omniglot from every source, the decode cache, the user's image folders."""

import hashlib
import io
import random
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image, ImageDraw
from services import file_server

from platform import data
from platform.images import OMNIGLOT_FORMAT, ImageFormat

REPO = Path(__file__).resolve().parents[1]
# A small Omniglot-layout set: alphabets listed out of order to check the sorting.
SMALL = {"background": {"Beta": 1, "Alpha": 2}, "evaluation": {"Gamma": 2}}
SMALL_NAMES = (
    "background/Alpha/character01",
    "background/Alpha/character02",
    "background/Beta/character01",
    "evaluation/Gamma/character01",
    "evaluation/Gamma/character02",
)


# --- synthetic data -------------------------------------------------------------------------------


def glyph(seed: int | str, size: tuple[int, int] = (105, 105)) -> Image.Image:
    """A 1-bit "character" like Omniglot's: black strokes on white."""
    rng = random.Random(seed)
    img = Image.new("1", size, 1)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        points = [(rng.randrange(size[0]), rng.randrange(size[1])) for _ in range(3)]
        draw.line(points, fill=0, width=6)
    return img


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def omniglot_members(layout=SMALL, per_class: int = 3, salt: int = 0) -> dict[str, bytes]:
    """Member path in the official layout -> PNG bytes."""
    members = {}
    for split, alphabets in layout.items():
        for alphabet, characters in alphabets.items():
            for c in range(1, characters + 1):
                for k in range(1, per_class + 1):
                    name = f"images_{split}/{alphabet}/character{c:02d}/{100 + c:04d}_{k:02d}.png"
                    members[name] = png(glyph(f"{name}/{salt}"))
    return members


def write_zips(root: Path, members: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split in ("background", "evaluation"):
        with zipfile.ZipFile(root / f"images_{split}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for name, content in members.items():
                if name.startswith(f"images_{split}/"):
                    # A fixed timestamp: writestr(name) stamps the current time, so two writes of the same
                    # members a second apart would otherwise differ in bytes (and in cache key).
                    zf.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), content, zipfile.ZIP_DEFLATED)
    return root


def write_extracted(root: Path, members: dict[str, bytes]) -> Path:
    for name, content in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def entries(cache: Path) -> list[str]:
    """Everything in the decoded-image cache except lock files (entries and temp folders)."""
    folder = cache / "images"
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".lock") if folder.exists() else []


def assert_same(a: data.ImageClasses, b: data.ImageClasses) -> None:
    assert a.names == b.names
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.images, b.images)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("METAPLATFORM_CACHE", str(path))
    return path


@pytest.fixture
def small_zips(tmp_path) -> Path:
    return write_zips(tmp_path / "small", omniglot_members())


@pytest.fixture
def http_root(tmp_path):
    """A plain http server on loopback serving `served/`; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    with file_server(served) as base:
        yield served, base


# --- the full set ---------------------------------------------------------------------------------


def test_full_omniglot(omniglot):
    assert len(omniglot) == 1623
    assert omniglot.images.shape == (32460, 28, 28) and omniglot.images.dtype == np.uint8
    assert omniglot.offsets.dtype == np.int64 and omniglot.offsets[0] == 0
    assert set(np.diff(omniglot.offsets)) == {20}
    assert omniglot.class_images(1622).shape == (20, 28, 28)
    splits = [name.split("/")[0] for name in omniglot.names]
    assert splits == ["background"] * 964 + ["evaluation"] * 659
    parts = [name.split("/") for name in omniglot.names]
    assert parts == sorted(parts, key=lambda p: (p[0] != "background", p))
    assert omniglot.names[0] == "background/Alphabet_of_the_Magi/character01"
    assert omniglot.images.mean() < 64  # ink high: strokes are a small part of each image


FIRST_CLASS = "images_background/Alphabet_of_the_Magi/character01/"


def test_first_image_matches_reference_preprocessing(omniglot, omniglot_source):
    with zipfile.ZipFile(Path(omniglot_source) / "images_background.zip") as zf:
        first = min(n for n in zf.namelist() if n.startswith(FIRST_CLASS) and n.endswith(".png"))
        original = Image.open(io.BytesIO(zf.read(first)))
        expected = 255 - np.asarray(original.convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(omniglot.class_images(0)[0], expected)


def test_second_load_hits_cache(omniglot, omniglot_source, omniglot_cache, monkeypatch):
    monkeypatch.setenv("METAPLATFORM_CACHE", str(omniglot_cache))

    def no_decoding(*args):
        raise AssertionError("a cached load decoded images again")

    monkeypatch.setattr(data, "_build_entry", no_decoding)
    again = data.load_omniglot(omniglot_source)
    assert isinstance(again.images, np.memmap)  # mapped from the cache, not read into memory
    assert_same(again, omniglot)
    # The session cache also holds the small folder sets other tests decoded: Omniglot's is the one
    # entry holding all its images.
    arrays = [omniglot_cache / "images" / e / "images.npy" for e in entries(omniglot_cache)]
    [entry] = [a.parent.name for a in arrays if a.is_file() and a.stat().st_size > omniglot.images.nbytes]
    assert sorted(p.name for p in (omniglot_cache / "images" / entry).iterdir()) == ["images.npy", "index.json"]


# --- sources and the cache on small synthetic sets ------------------------------------------------


def test_small_set_layout_and_order(small_zips, cache):
    classes = data.load_omniglot(str(small_zips))
    assert classes.names == SMALL_NAMES
    assert classes.offsets.tolist() == [0, 3, 6, 9, 12, 15]
    members = omniglot_members()
    # Images keep their file order; the first image of "evaluation/Gamma/character02":
    expected = Image.open(io.BytesIO(members["images_evaluation/Gamma/character02/0102_01.png"]))
    expected = 255 - np.asarray(expected.convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(classes.class_images(4)[0], expected)


def test_cache_key_follows_content_not_location(tmp_path, small_zips, cache):
    first = data.load_omniglot(str(small_zips))
    data.load_omniglot(str(write_zips(tmp_path / "copy", omniglot_members())))
    assert len(entries(cache)) == 1  # same content elsewhere: same entry
    changed = data.load_omniglot(str(write_zips(tmp_path / "changed", omniglot_members(salt=1))))
    assert len(entries(cache)) == 2
    assert changed.names == first.names and not np.array_equal(changed.images, first.images)


def test_extracted_folders_equal_zips(tmp_path, small_zips):
    extracted = data.load_omniglot(str(write_extracted(tmp_path / "extracted", omniglot_members())))
    assert_same(extracted, data.load_omniglot(str(small_zips)))


def test_http_source_downloads_once(http_root, small_zips, cache):
    served, base = http_root
    write_zips(served / "omniglot", omniglot_members())
    downloaded = data.load_omniglot(f"{base}/omniglot/")
    assert sorted(p.name.split("-", 1)[1] for p in (cache / "downloads").iterdir() if p.suffix != ".lock") == [
        "images_background.zip",
        "images_evaluation.zip",
    ]
    for zip_path in (served / "omniglot").iterdir():
        zip_path.unlink()
    assert_same(data.load_omniglot(f"{base}/omniglot"), downloaded)  # from the cached download
    assert_same(data.load_omniglot(str(small_zips)), downloaded)
    assert len(entries(cache)) == 1


def test_official_url_is_verified(http_root, cache, monkeypatch):
    served, base = http_root
    write_zips(served, omniglot_members())
    monkeypatch.setattr(data, "OFFICIAL_OMNIGLOT_URL", base)
    actual = hashlib.md5((served / "images_background.zip").read_bytes()).hexdigest()
    with pytest.raises(data.DataError) as e:
        data.load_omniglot(base)
    message = str(e.value)
    assert f"{base}/images_background.zip" in message and data.OFFICIAL_MD5["images_background.zip"] in message
    assert actual in message
    assert [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"] == []  # lock files stay, by design

    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    monkeypatch.setattr(data, "OFFICIAL_MD5", md5)
    assert data.load_omniglot(base).names == SMALL_NAMES


def test_http_errors_name_the_url(http_root, cache):
    _, base = http_root
    with pytest.raises(data.DataError, match=f"{base}/nothing/images_background.zip.*404"):
        data.load_omniglot(f"{base}/nothing")
    assert [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"] == []


def test_s3_source(s3_bucket, small_zips, cache):
    s3 = boto3.client("s3")
    for zip_path in small_zips.iterdir():
        s3.upload_file(str(zip_path), s3_bucket, f"sets/omniglot/{zip_path.name}")
    from_s3 = data.load_omniglot(f"s3://{s3_bucket}/sets/omniglot")
    assert_same(from_s3, data.load_omniglot(str(small_zips)))
    with pytest.raises(data.DataError, match=re.escape(f"s3://{s3_bucket}/nothing/images_background.zip")):
        data.load_omniglot(f"s3://{s3_bucket}/nothing")


def test_s3_source_check_asks_only_for_what_is_not_cached(s3_bucket, small_zips, cache):
    """check_omniglot_source (run by config checks on the driver) HEADs the objects unless already downloaded."""
    s3 = boto3.client("s3")
    source = f"s3://{s3_bucket}/sets/omniglot"
    with pytest.raises(data.DataError, match=re.escape(f"{source}/images_background.zip: no such object")):
        data.check_omniglot_source(source)
    for zip_path in small_zips.iterdir():
        s3.upload_file(str(zip_path), s3_bucket, f"sets/omniglot/{zip_path.name}")
    data.check_omniglot_source(source)
    data.load_omniglot(source)
    for zip_path in small_zips.iterdir():
        s3.delete_object(Bucket=s3_bucket, Key=f"sets/omniglot/{zip_path.name}")
    data.check_omniglot_source(source)  # the downloads are in the cache: what the workers will use


def test_local_source_check(tmp_path, small_zips):
    data.check_omniglot_source(str(small_zips))
    data.check_omniglot_source(str(write_extracted(tmp_path / "extracted", omniglot_members())))
    (small_zips / "images_background.zip").unlink()
    with pytest.raises(data.DataError, match=re.escape(f"{small_zips / 'images_background'}.zip not found")):
        data.check_omniglot_source(str(small_zips))


def test_a_killed_download_leaves_no_temp_file_beyond_the_next_download(tmp_path, cache):
    served = write_zips(tmp_path / "served", omniglot_members())
    stall = threading.Event()

    def half_then_the_rest_after_stall(write, body: bytes, closing: threading.Event) -> None:
        write(body[: len(body) // 2])
        stall.wait(30)
        write(body[len(body) // 2 :])

    with file_server(served, half_then_the_rest_after_stall) as base:
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", f"import platform.data as d; d.load_omniglot({base!r})"], cwd=REPO
            )
            downloads = cache / "downloads"
            deadline = time.monotonic() + 30
            while not [p for p in downloads.glob(".*.tmp") if p.stat().st_size] and time.monotonic() < deadline:
                time.sleep(0.02)
            child.kill()  # SIGKILL mid-download: no handler runs, the temp file stays
            child.wait(timeout=10)
            [temp] = downloads.glob(".*.tmp")
            stall.set()
            assert data.load_omniglot(base).names == SMALL_NAMES
            assert not temp.exists() and list(downloads.glob(".*.tmp")) == []
            assert sorted(p.name.split("-", 1)[1] for p in downloads.iterdir() if p.suffix == ".zip") == [
                "images_background.zip",
                "images_evaluation.zip",
            ]
        finally:
            stall.set()  # else its sender waits out its 30 s


def test_a_full_disk_during_a_download_is_reported_as_the_disk(http_root, cache):
    """The kernel refuses the write (RLIMIT_FSIZE stands in for a full disk: the same OSError path as ENOSPC)."""
    served, base = http_root
    write_zips(served, omniglot_members())
    script = f"""if True:
        import resource, signal
        import platform.data as d
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
        try:
            d.load_omniglot({base!r})
        except d.DataError as e:
            print(e)
    """
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert (
        message.startswith(f"cannot write the download cache in {cache / 'downloads'}")
        and "METAPLATFORM_CACHE" in message
    )
    assert "check the URL" not in message
    assert [p.name for p in (cache / "downloads").iterdir() if p.suffix != ".lock"] == []


def test_default_source_and_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("METAPLATFORM_OMNIGLOT", raising=False)
    monkeypatch.delenv("METAPLATFORM_CACHE")
    assert data.default_omniglot_source() == data.OFFICIAL_OMNIGLOT_URL
    assert data.cache_dir() == Path.home() / ".cache" / "metaplatform"
    monkeypatch.setenv("METAPLATFORM_OMNIGLOT", "s3://bucket/omniglot")
    monkeypatch.setenv("METAPLATFORM_CACHE", str(tmp_path))
    assert data.default_omniglot_source() == "s3://bucket/omniglot"
    assert data.cache_dir() == tmp_path


# --- broken sources leave no partial cache --------------------------------------------------------


def test_truncated_zip(small_zips, cache):
    zip_path = small_zips / "images_evaluation.zip"
    zip_path.write_bytes(zip_path.read_bytes()[: zip_path.stat().st_size // 2])
    with pytest.raises(data.DataError, match=re.escape(f"{zip_path}: not a readable zip file")):
        data.load_omniglot(str(small_zips))
    assert entries(cache) == []


def test_corrupt_png_in_zip(tmp_path, cache):
    member = "images_background/Alpha/character01/0101_02.png"
    root = write_zips(tmp_path / "bad", {**omniglot_members(), member: b"\x89PNG not really"})
    with pytest.raises(data.DataError, match=re.escape(f"{root / 'images_background.zip'}: member {member}")):
        data.load_omniglot(str(root))
    assert entries(cache) == []


def test_missing_sources(tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(data.DataError, match=re.escape(f"{absent}: Omniglot source folder not found")):
        data.load_omniglot(str(absent))
    root = write_zips(tmp_path / "half", omniglot_members())
    (root / "images_evaluation.zip").unlink()
    with pytest.raises(data.DataError, match=re.escape(f"{root / 'images_evaluation'}.zip not found")):
        data.load_omniglot(str(root))


def test_zip_without_the_layout(tmp_path):
    flat = {f"images_{split}/x.png": png(glyph(1)) for split in ("background", "evaluation")}
    root = write_zips(tmp_path / "flat", flat)
    with pytest.raises(data.DataError, match="holds no images in the Omniglot layout"):
        data.load_omniglot(str(root))


def test_failed_write_leaves_nothing(small_zips, cache, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.np, "save", disk_full)
    with pytest.raises(data.DataError, match="cannot write the image cache.*METAPLATFORM_CACHE"):
        data.load_omniglot(str(small_zips))
    assert entries(cache) == []


def test_crashed_builder_leftovers_are_removed(small_zips, cache):
    reference = data.load_omniglot(str(small_zips))
    [entry] = entries(cache)
    (cache / "images" / entry).rename(cache / "images" / f".tmp-{entry}-crashed")
    assert_same(data.load_omniglot(str(small_zips)), reference)
    assert entries(cache) == [entry]


def test_concurrent_loads_build_one_entry(tmp_path, cache):
    source = write_zips(tmp_path / "many", omniglot_members(per_class=20))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # Each process counts its builds, says it is ready, waits for "go", then loads.
    script = """if True:
        import os, sys, time, platform.data as d
        builds = []
        build = d._build_entry
        d._build_entry = lambda *args: builds.append(1) or build(*args)
        barrier = sys.argv[2]
        open(os.path.join(barrier, f"ready-{os.getpid()}"), "w").close()
        while not os.path.exists(os.path.join(barrier, "go")):
            time.sleep(0.002)
        c = d.load_omniglot(sys.argv[1])
        print(len(builds), len(c), int(c.images.astype("int64").sum()))
    """
    command = [sys.executable, "-c", script, str(source), str(barrier)]
    procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 30
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    (barrier / "go").touch()
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(int(out[0]) for out in outputs) == [0, 1]  # the second waited on the lock, then re-checked
    assert outputs[0][1:] == outputs[1][1:]
    assert len(entries(cache)) == 1
    loaded = data.load_omniglot(str(source))
    assert outputs[0][1:] == [str(len(loaded)), str(int(loaded.images.astype("int64").sum()))]


# --- the user's own image folders -----------------------------------------------------------------


def test_image_folder(tmp_path):
    root = tmp_path / "mine"
    (root / "zebra").mkdir(parents=True)
    (root / "apple").mkdir()
    (root / ".hidden").mkdir()
    drawing = glyph(7, (60, 40)).convert("L")
    (root / "zebra" / "b.png").write_bytes(png(drawing))
    transparent = Image.new("RGBA", drawing.size, (0, 0, 0, 0))  # black strokes on transparent
    transparent.putalpha(Image.eval(drawing, lambda v: 255 - v))
    (root / "zebra" / "c.png").write_bytes(png(transparent))
    (root / "zebra" / "a.jpg").write_bytes(png(Image.new("RGB", (80, 50), "white"), "JPEG"))
    (root / "zebra" / "notes.txt").write_text("not an image")
    (root / "zebra" / ".DS_Store").write_bytes(b"junk")
    (root / "apple" / "x.bmp").write_bytes(png(glyph(3).convert("L"), "BMP"))
    (root / "README.txt").write_text("ignored")

    classes = data.load_image_folder(root)
    assert classes.names == ("apple", "zebra")
    assert classes.offsets.tolist() == [0, 1, 4]
    assert classes.images.shape == (4, 28, 28) and classes.images.dtype == np.uint8
    blank, b, c = classes.class_images(1)
    assert blank.max() < 8  # white paper: no ink
    expected = 255 - np.asarray(drawing.resize((28, 28), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(b, expected)
    np.testing.assert_array_equal(c, expected)  # transparency counts as white paper
    assert b.mean() < 128


def test_image_folder_in_rgb_at_another_size(tmp_path, cache):
    """RGB photographs stay in colour (channels first, not inverted), transparency on white, resized to the
    format's size. Each format is a cache entry of its own, and 28x28 grayscale keeps the key caches were
    built under before RGB existed."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    translucent = Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA")
    (root / "a" / "p.png").write_bytes(png(photo))
    (root / "a" / "q.png").write_bytes(png(translucent))
    rgb = data.load_image_folder(root, ImageFormat(32, 3))
    assert rgb.images.shape == (2, 3, 32, 32) and rgb.images.dtype == np.uint8
    on_white = Image.alpha_composite(Image.new("RGBA", (20, 20), "white"), translucent).convert("RGB")
    for image, original in zip(rgb.images, (photo, on_white)):
        expected = np.asarray(original.resize((32, 32), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
        np.testing.assert_array_equal(image, expected)
    assert data.load_image_folder(root).images.shape == (2, 28, 28)
    assert len(entries(cache)) == 2
    assert OMNIGLOT_FORMAT.preprocessing == "v1 grayscale, LANCZOS 28x28, inverted"


def test_image_folder_errors(tmp_path, cache):
    with pytest.raises(data.DataError, match=re.escape(f"{tmp_path / 'absent'}: image folder not found")):
        data.load_image_folder(tmp_path / "absent")
    root = tmp_path / "mine"
    root.mkdir()
    with pytest.raises(data.DataError, match="holds no class folders"):
        data.load_image_folder(root)
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(data.DataError, match=re.escape(f"{root / 'empty'}: class folder holds no images")):
        data.load_image_folder(root)
    (root / "empty" / "a.png").write_bytes(png(glyph(1)))
    (root / "empty" / "b.png").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match=re.escape(f"{root / 'empty' / 'b.png'}: cannot read the image")):
        data.load_image_folder(root)
    assert entries(cache) == []
