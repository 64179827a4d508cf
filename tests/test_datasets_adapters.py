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
    with pytest.raises(ValueError, match="cannot read .*broken.png"):
        from_folder(tmp_path)
