"""Image folders are checked whole before training: every file decodes, channels and sizes agree.

Each folder is made of tiny real PNGs (``write_image_folder`` of test_data_models: 2 classes x 5
images per split, 20 in all); a damaged or odd file is never the first one, which was all that was
read before.
"""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_data_models import write_image_folder

from s2ap_lightning.cli import main
from s2ap_lightning.data import RobustDataModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def grey_folder(root):
    write_image_folder(root, classes=2, per_class=5, size=25, grey=True, wide=0, ext="png")
    return sorted((root / "train" / "n00000000").iterdir())


def save(path, shape):
    from PIL import Image

    Image.fromarray(np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)).save(path)


def folder_warnings(record):
    return [str(w.message) for w in record if str(w.message).startswith("image folder")]


def test_clean_folder_passes_without_a_word(tmp_path):
    grey_folder(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dm = RobustDataModule("imagefolder", data_dir=str(tmp_path), batch_size=4, val_fraction=0.25)
        dm.setup()
    assert folder_warnings(record) == []
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (2, 1, 25)
    assert dm.test_set[0][0].shape == (1, 25, 25)


def test_mixed_channels_take_the_majority_and_say_so(tmp_path):
    files = grey_folder(tmp_path)
    for path in (files[0], files[3], tmp_path / "val" / "n00000001" / "2.png"):  # RGB first, as before
        save(path, (25, 25, 3))
    with pytest.warns(UserWarning) as record:
        dm = RobustDataModule("imagefolder", data_dir=str(tmp_path), batch_size=4, val_fraction=0.25)
    (message,) = folder_warnings(record)
    assert (
        "3 of 20 images are RGB, 17 greyscale (L): using 1 channel, the majority's "
        "(set data.channels to choose); the others are converted, e.g. " + str(files[0])
    ) in message
    assert dm.in_channels == 1
    dm.setup()
    assert dm.train_set.dataset[0][0].shape == (1, 25, 25), "the RGB image is converted to grey"
    # Channels set: the choice is the user's, nothing to report.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        chosen = RobustDataModule("imagefolder", data_dir=str(tmp_path), channels=3)
    assert chosen.in_channels == 3 and folder_warnings(record) == []


def test_mixed_sizes_take_the_most_common_and_list_the_counts(tmp_path):
    files = grey_folder(tmp_path)
    for path in (files[0], files[1], tmp_path / "val" / "n00000000" / "4.png"):  # 40x40 first, as before
        save(path, (40, 40))
    save(files[2], (30, 36))  # 36 wide, 30 high
    with pytest.warns(UserWarning) as record:
        dm = RobustDataModule("imagefolder", data_dir=str(tmp_path), batch_size=4, val_fraction=0.25)
    (message,) = folder_warnings(record)
    assert (
        "images differ in size (20 images: 16 are 25x25, 3 are 40x40, 1 are 36x30): using side 25 of the "
        "most common size, 25x25; the others are resized to it on their shorter side and centre-cropped "
        "(set data.crop_size to choose)"
    ) in message
    assert dm.image_size == 25
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dm.setup()
    assert folder_warnings(record) == [], "the chosen side upsamples no image of the most common size"
    assert dm.train_set.dataset[0][0].shape == (1, 25, 25), "a 40x40 image is resized to the chosen side"
    # A crop larger than the most common size still names the upsampling, counted.
    big = RobustDataModule("imagefolder", data_dir=str(tmp_path), crop_size=50, augmentation="none")
    with pytest.warns(UserWarning, match=r"16 of 20 images \(the most common size\) are 25 px .* 4.0x"):
        big.setup()


def test_truncated_png_in_train_is_refused_at_construction(tmp_path):
    files = grey_folder(tmp_path)
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as err:
        RobustDataModule("imagefolder", data_dir=str(tmp_path))
    message = str(err.value)
    assert f"cannot read image {files[3]}: image file is truncated" in message
    assert "1 of 20 image files under" in message and "fix or remove it before training" in message
    assert "\n" not in message


def test_text_named_png_in_val_is_refused_before_fit_writes_anything(tmp_path, capsys):
    data = tmp_path / "data"
    grey_folder(data)
    bad = [data / "val" / "n00000001" / "3.png", data / "train" / "n00000001" / "1.png"]
    for path in bad:
        path.write_text("not an image\n")
    with pytest.raises(ValueError) as err:
        RobustDataModule("imagefolder", data_dir=str(data))
    message = str(err.value)
    assert f"cannot read image {bad[1]}: cannot identify image file" in message  # train/ is read first
    assert f"2 of 20 image files under {data} cannot be decoded" in message
    assert f"also {bad[0]}: fix or remove them" in message and "\n" not in message
    # Through s2ap fit: one line on stderr, no run folder, before any epoch.
    bad[1].unlink()
    run = tmp_path / "run"
    args = ["fit", "--config", str(CONFIGS / "stages" / "pretrain.yaml"), "--data.dataset", "imagefolder",
            "--data.data_dir", str(data), "--checkpoint.dirpath", str(run), "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(tmp_path / "root")]  # fmt: skip
    assert main(args) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and f"cannot read image {bad[0]}" in err_lines[0]
    assert "1 of 19 image files" in err_lines[0]
    assert not run.exists() and not (tmp_path / "root").exists()


def test_empty_class_folder_is_named(tmp_path):
    grey_folder(tmp_path)
    for path in (tmp_path / "val" / "n00000001").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"1 class folder\(s\) hold no image files .*val/n00000001"):
        RobustDataModule("imagefolder", data_dir=str(tmp_path))


def test_the_tools_subset_is_class_stratified_and_seeded():
    import torch
    from torch.utils.data import TensorDataset

    from s2ap_lightning.data.subsets import DataSubset

    # A split sorted by class: "the first 8" would be one class only.
    data = TensorDataset(torch.arange(40).float().view(40, 1), torch.arange(4).repeat_interleave(10))
    x, y = DataSubset(images=8, seed=1).tensors(data)
    assert torch.bincount(y).tolist() == [2, 2, 2, 2]
    assert torch.equal(DataSubset(images=8, seed=1).tensors(data)[0], x)
    assert not torch.equal(DataSubset(images=8, seed=2).tensors(data)[0], x)
    assert len(DataSubset(images=0).tensors(data)[0]) == 40


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_imagenet_layout_is_decoded_whole_and_keeps_its_conventions(tmp_path):
    """ImageNet's folders are checked like any other; grey JPEGs among colour ones stay 3 channels."""
    write_image_folder(tmp_path, classes=2, per_class=5, size=40, wide=8, ext="JPEG")
    grey = tmp_path / "train" / "n00000001" / "2.JPEG"
    save(grey, (40, 48))  # ImageNet holds greyscale and CMYK JPEGs; its convention is RGB for all
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dm = RobustDataModule("imagenet", data_dir=str(tmp_path), batch_size=4, val_fraction=0.25)
    assert folder_warnings(record) == []
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (2, 3, 224)
    bad = tmp_path / "val" / "n00000001" / "3.JPEG"
    truncate(bad)
    with pytest.raises(ValueError, match=rf"cannot read image {bad}: .*1 of 20 image files under {tmp_path}"):
        RobustDataModule("imagenet", data_dir=str(tmp_path))


def test_a_scan_is_kept_until_the_folder_changes(tmp_path, monkeypatch):
    import s2ap_lightning.data.datasets as datasets

    monkeypatch.setenv("S2AP_CACHE_DIR", str(tmp_path / "cache"))
    files = grey_folder(tmp_path / "data")
    RobustDataModule("imagefolder", data_dir=str(tmp_path / "data"))
    (kept,) = (tmp_path / "cache" / "folder_scans").iterdir()
    # A copy that keeps file times (a job's local copy made with rsync -a) is the same folder.
    shutil.copytree(tmp_path / "data", tmp_path / "copy")

    def no_decoding(path):
        raise AssertionError(f"{path} decoded again")

    with monkeypatch.context() as m:
        m.setattr(datasets, "_read_image", no_decoding)
        for folder in ("data", "copy"):
            datasets._SCANS.clear()
            dm = RobustDataModule("imagefolder", data_dir=str(tmp_path / folder))  # from the kept scan
            assert (dm.num_classes, dm.in_channels, dm.image_size) == (2, 1, 25)
    # Any change to a file (here its size) makes the folder a new one: decoded again, damage found.
    truncate(files[2])
    datasets._SCANS.clear()
    with pytest.raises(ValueError, match=rf"cannot read image {files[2]}"):
        RobustDataModule("imagefolder", data_dir=str(tmp_path / "data"))
    assert [p.name for p in kept.parent.iterdir()] == [kept.name], "a failed scan is not kept"
    # A dangling link among the files is named like any unreadable file.
    files[2].unlink()
    files[2].symlink_to(tmp_path / "gone.png")
    with pytest.raises(ValueError, match=rf"cannot read image {files[2]}: .*No such file"):
        RobustDataModule("imagefolder", data_dir=str(tmp_path / "data"))
    # A cache that cannot be written (here: a file where its folder should be) costs time, not the run.
    files[2].unlink()
    monkeypatch.setenv("S2AP_CACHE_DIR", str(kept))
    with pytest.warns(UserWarning, match=r"its scan cannot be kept in .*the next command decodes every file"):
        assert RobustDataModule("imagefolder", data_dir=str(tmp_path / "data")).in_channels == 1


def test_check_images_false_decodes_nothing(tmp_path, monkeypatch):
    import s2ap_lightning.data.datasets as datasets

    grey_folder(tmp_path)
    monkeypatch.setattr(datasets, "_read_image", lambda path: pytest.fail(f"{path} decoded"))
    dm = RobustDataModule("imagenet", data_dir=str(tmp_path), check_images=False, crop_size=16)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (2, 3, 16)
    with pytest.raises(
        ValueError, match=r"check_images=false .* data.channels and data.crop_size must be set"
    ):
        RobustDataModule("imagefolder", data_dir=str(tmp_path), check_images=False, channels=1)
    dm = RobustDataModule(
        "imagefolder", data_dir=str(tmp_path), check_images=False, channels=1, crop_size=25, val_fraction=0.25
    )
    dm.setup()
    assert dm.test_set[0][0].shape == (1, 25, 25)


def test_a_large_folder_is_decoded_in_parallel_with_the_same_result(tmp_path, monkeypatch):
    import concurrent.futures

    import s2ap_lightning.data.datasets as datasets

    files = grey_folder(tmp_path)
    save(files[1], (30, 30, 3))
    files[3].write_text("not an image\n")
    splits = (tmp_path / "train", tmp_path / "val")
    monkeypatch.setenv("S2AP_CACHE_DIR", str(tmp_path / "no-cache"))
    monkeypatch.setattr(datasets, "_PARALLEL_FROM", 1)
    monkeypatch.setattr(datasets, "_CHUNK_MIN", 3)  # 7 chunks of the 20 files: their order matters
    pools = []

    class CountedPool(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", CountedPool)
    with pytest.raises(ValueError) as serial:
        datasets._scan_image_folder(tmp_path, splits, workers=0)
    assert pools == []
    with pytest.raises(ValueError) as parallel:
        datasets._scan_image_folder(tmp_path, splits, workers=2)
    assert pools == [(2,)]
    assert str(parallel.value) == str(serial.value) and str(files[3]) in str(serial.value)
    files[3].unlink()
    one, two = (datasets._scan_image_folder(tmp_path, splits, workers=w) for w in (0, 2))
    assert one == two and one.sizes == {(25, 25): 18, (30, 30): 1} and one.modes == {"L": 18, "RGB": 1}
