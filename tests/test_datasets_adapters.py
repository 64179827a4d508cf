"""Dataset adapters: xr.Dataset, torch Dataset/DataLoader and ImageFolder trees read alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import xaiwidgets as xw
from xaiwidgets.datasets.adapters import as_dataset, from_folder, image_source


@pytest.fixture(scope="module")
def shapes():
    return xw.datasets.shapes(n=6, size=32, seed=3)


def test_xarray_source_reads_images_labels_and_gaze(shapes):
    src = image_source(shapes)
    assert len(src) == 6 and src.classes == list(shapes.attrs["classes"])
    assert src.gaze == ("gfdm", "fixations")
    np.testing.assert_array_equal(src.images([4, 1]).numpy(), shapes.image.values[[4, 1]])
    np.testing.assert_array_equal(src.labels, shapes.label.values)
    sub = src.subset([5, 2])
    assert sub["index"].values.tolist() == [5, 2]  # dataset indices are kept
    np.testing.assert_array_equal(sub.gfdm.values, shapes.gfdm.values[[5, 2]])
    batches = list(src.batches(4))
    assert [b[0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]


def test_torch_dataset_and_loader_match_the_tensors():
    images = torch.rand(7, 3, 8, 8)
    labels = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    pairs = TensorDataset(images, labels)
    for data in (pairs, DataLoader(pairs, batch_size=3, shuffle=True)):
        src = image_source(data, classes=["a", "b", "c"])
        assert src.labels.tolist() == labels.tolist()  # index order, even when shuffled
        torch.testing.assert_close(src.images([6, 0, 3]), images[[6, 0, 3]])
        assert src.gaze == ()
    ds = as_dataset(pairs, classes=["a", "b", "c"])
    assert ds.image.dims == ("image", "channel", "y", "x")
    assert ds.attrs["classes"] == ["a", "b", "c"]
    np.testing.assert_array_equal(ds.label.values, labels.numpy())


def test_uint8_pictures_become_unit_floats():
    class Pictures(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return np.full((5, 6, 3), 51 * (i + 1), np.uint8), i  # (H, W, C) uint8

    src = image_source(Pictures())
    out = src.images([0, 1])
    assert out.shape == (2, 3, 5, 6)
    np.testing.assert_allclose(out[:, 0, 0, 0].numpy(), [0.2, 0.4], atol=1e-6)


def test_iterable_loader_is_read_once():
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(5):
                yield torch.full((3, 4, 4), float(i)), i % 2

    src = image_source(DataLoader(Stream(), batch_size=2))
    assert len(src) == 5 and src.labels.tolist() == [0, 1, 0, 1, 0]
    assert src.images([3])[0, 0, 0, 0].item() == 3.0


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="needs an `image` variable"):
        image_source(xr.Dataset({"picture": (("n", "y"), np.zeros((2, 2)))}))
    with pytest.raises(ValueError, match="one integer class index"):
        image_source(xr.Dataset({"image": (("image", "channel", "y", "x"), np.zeros((2, 3, 4, 4))),
                                 "label": ("image", [0.5, 1.5])}))
    with pytest.raises(TypeError, match="cannot read images from a int"):
        image_source(3)
    ragged = [(torch.zeros(3, 4, 4), 0), (torch.zeros(3, 5, 5), 1)]
    with pytest.raises(ValueError, match="share one size"):
        image_source(ragged).images([0, 1])
    src = image_source(TensorDataset(torch.rand(3, 3, 4, 4), torch.tensor([0, 5, 1])))
    with pytest.raises(ValueError, match="labels out of range: image 1 has label 5"):
        src.check_labels(4)
    src.check_labels(6)  # in range: no error
    with pytest.raises(IndexError, match="out of range"):
        src.images([3])


def _write(path, color, size=(20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_from_folder_reads_an_imagefolder_tree(tmp_path):
    _write(tmp_path / "dog" / "a.png", (255, 0, 0))
    _write(tmp_path / "cat" / "b.jpg", (0, 0, 255), size=(40, 20))
    _write(tmp_path / "cat" / "nested" / "c.png", (0, 255, 0))
    (tmp_path / "cat" / "notes.txt").write_text("not a picture")
    ds = from_folder(tmp_path, size=16)
    assert ds.attrs["classes"] == ["cat", "dog"]  # sorted folder names, as ImageFolder
    assert ds.label.values.tolist() == [0, 0, 1]
    assert sorted(ds.file.values.tolist()) == ["cat/b.jpg", "cat/nested/c.png", "dog/a.png"]
    assert ds.image.shape == (3, 3, 16, 16) and ds.image.dtype == np.float32
    dog = ds.image.values[2]
    np.testing.assert_allclose(dog.mean(axis=(1, 2)), [1.0, 0.0, 0.0], atol=1e-6)
    # classes in the model's order, and an extra class without pictures
    ds2 = from_folder(tmp_path, size=8, classes=["dog", "bird", "cat"])
    assert ds2.label.values.tolist() == [0, 2, 2]
    # the same data as torchvision's ImageFolder gives (its labels, its file order)
    from torchvision.datasets import ImageFolder

    ref = ImageFolder(tmp_path)
    assert [c for _, c in ref.samples] == ds.label.values.tolist()
    assert xw.datasets.from_folder is from_folder


def test_from_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        from_folder(tmp_path / "missing")
    _write(tmp_path / "loose.png", (0, 0, 0))
    with pytest.raises(ValueError, match="1 pictures lie directly in it"):
        from_folder(tmp_path)
    _write(tmp_path / "cat" / "x.png", (0, 0, 0))
    with pytest.raises(ValueError, match=r"folders \['cat'\] are not among"):
        from_folder(tmp_path, classes=["dog"])
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cat/broken.png is not a picture we can read"):
        from_folder(tmp_path, on_error="raise")
    with pytest.raises(ValueError, match="on_error='ignore'"):
        from_folder(tmp_path, on_error="ignore")
    (tmp_path / "cat" / "x.png").unlink()
    with pytest.warns(UserWarning, match="skipped 1 of 1"), \
            pytest.raises(ValueError, match="none of the pictures"):
        from_folder(tmp_path)


def test_from_folder_skips_broken_pictures_and_reads_real_ones(tmp_path):
    """A folder as students fill it: a truncated JPEG, a text file named .jpg, a 16-bit
    PNG and a portrait phone JPEG (EXIF orientation 6)."""
    import io

    good = io.BytesIO()
    Image.new("RGB", (64, 48), (0, 200, 0)).save(good, "jpeg", quality=95)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat" / "good.jpg").write_bytes(good.getvalue())
    (tmp_path / "cat" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "dog" / "notes.jpg").write_text("not a photo")
    gradient = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (16, 1))
    Image.fromarray(gradient).save(tmp_path / "dog" / "scan.png")
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16, 0] = 255                         # red left half as stored ...
    exif = Image.Exif()
    exif[0x0112] = 6                                # ... is the top once upright
    Image.fromarray(stored).save(tmp_path / "dog" / "portrait.jpg", quality=95, exif=exif)
    with pytest.warns(UserWarning) as caught:
        ds = from_folder(tmp_path, size=16, crop=False)
    message = str(caught[0].message)
    assert "skipped 2 of 5" in message
    assert "cat/truncated.jpg (the file is damaged or incomplete" in message
    assert "dog/notes.jpg (it is not a PNG, JPEG" in message
    assert sorted(ds.file.values.tolist()) == ["cat/good.jpg", "dog/portrait.jpg",
                                               "dog/scan.png"]
    assert ds.label.values.tolist() == [0, 1, 1]
    scan = ds.image.values[ds.file.values.tolist().index("dog/scan.png")]
    # squashed 32 -> 16 columns: a linear ramp stays the pairs' means (edges aside)
    expected = gradient[0].reshape(16, 2).mean(axis=1) / 65535
    np.testing.assert_allclose(scan[0, 8, 1:-1], expected[1:-1], atol=1e-4)  # not all white
    portrait = ds.image.values[ds.file.values.tolist().index("dog/portrait.jpg")]
    assert portrait[0, :6].mean() > 0.9 and portrait[0, -6:].mean() < 0.1  # red on top


def test_from_folder_has_the_layout_of_shapes(tmp_path):
    """``image`` plays the same role as in shapes(): in xarray a variable named like a
    dimension is a coordinate (non-index), in both."""
    _write(tmp_path / "dog" / "a.png", (255, 0, 0))
    mine, ref = from_folder(tmp_path, size=16), xw.datasets.shapes(n=2, size=16, seed=0)
    for name in ("image", "label"):
        assert mine[name].dims == ref[name].dims and mine[name].dtype == ref[name].dtype
        assert (name in mine.data_vars) == (name in ref.data_vars)
        assert (name in mine.coords) == (name in ref.coords)
    assert mine["image"].shape == (1, 3, 16, 16)
    src = image_source(mine)                        # read alike by the dataset tools
    np.testing.assert_array_equal(src.images([0]).numpy(), mine.image.values)
