"""Pixel-exact round trips source -> kood dataset -> records, for every SRC form."""

import os

import numpy as np
import pytest

from kood.convert import convert
from kood.errors import ConfigError, DataError
from kood.sources import load_image_file, open_source
from tests import data_helpers as dh


def _roundtrip(source, out, **kw):
    kw.setdefault("show_progress", False)
    return convert(source, str(out), **kw)


def test_cifar10_roundtrip_writes_both_splits(tmp_path):
    d, data = dh.make_cifar10_dir(tmp_path / "c10", num_train=23, num_test=7)
    m = _roundtrip(f"cifar:{d}", tmp_path / "out", num_shards=3)
    assert m.class_names == [f"class{i}" for i in range(10)] and m.num_classes == 10
    assert m.image_shape == [32, 32, 3]
    for split, (x, y) in data.items():
        images, labels, index, _ = dh.read_split(tmp_path / "out", split)
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)
        np.testing.assert_array_equal(index, np.arange(len(x)))
    assert len(m.splits["train"]["shards"]) == 3
    np.testing.assert_allclose(m.mean, data["train"][0].reshape(-1, 3).mean(0), rtol=1e-6)
    np.testing.assert_allclose(m.std, data["train"][0].reshape(-1, 3).std(0), rtol=1e-6)


def test_cifar100_uses_fine_labels_and_split_selects(tmp_path):
    d, data = dh.make_cifar100_dir(tmp_path / "c100", num_train=9, num_test=6)
    m = _roundtrip(f"cifar:{d}", tmp_path / "out", split="test")
    assert list(m.splits) == ["test"] and m.num_classes == 100 and m.class_names[3] == "fine3"
    images, labels, _, _ = dh.read_split(tmp_path / "out", "test")
    np.testing.assert_array_equal(images, data["test"][0])
    np.testing.assert_array_equal(labels, data["test"][1])


def test_labelled_folder_roundtrip(tmp_path):
    d, x, y = dh.make_image_folder(tmp_path / "f", {"cat": 4, "dog": 3})
    m = _roundtrip(f"folder:{d}", tmp_path / "out")
    assert m.class_names == ["cat", "dog"]
    images, labels, _, _ = dh.read_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)


def test_flat_folder_is_unlabelled_outliers(tmp_path):
    d, x, _ = dh.make_image_folder(tmp_path / "f", 5, mode="L")
    m = _roundtrip(f"folder:{d}", tmp_path / "out", kind="outlier", channels=3)
    assert m.num_classes == 0 and m.image_shape == [32, 32, 3] and m.kind == "outlier"
    images, labels, _, _ = dh.read_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(images, np.repeat(x, 3, -1))
    assert (labels == -1).all()


@pytest.mark.parametrize("keys", [("x", "y"), ("images", "labels")])
def test_npz_default_keys(tmp_path, keys):
    path, x, y = dh.make_npz(tmp_path / "a.npz", images_key=keys[0], labels_key=keys[1])
    _roundtrip(f"npz:{path}", tmp_path / "out")
    images, labels, _, _ = dh.read_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)


def test_npz_explicit_keys_grayscale_and_train_test_arrays(tmp_path):
    path, x, y = dh.make_npz(tmp_path / "a.npz", shape=(28, 28), images_key="pix", labels_key="cls")
    m = _roundtrip(f"npz:{path}", tmp_path / "o1", images_key="pix", labels_key="cls")
    assert m.image_shape == [28, 28, 1]
    images, labels, _, _ = dh.read_split(tmp_path / "o1", "train")
    np.testing.assert_array_equal(images[..., 0], x)
    np.testing.assert_array_equal(labels, y)

    xt, xv = dh.random_images(6), dh.random_images(4, seed=1)
    np.savez(tmp_path / "b.npz", x_train=xt, y_train=np.arange(6) % 3, x_test=xv, y_test=np.arange(4) % 3)
    m = _roundtrip(f"npz:{tmp_path / 'b.npz'}", tmp_path / "o2")
    assert sorted(m.splits) == ["test", "train"] and m.num_classes == 3
    np.testing.assert_array_equal(dh.read_split(tmp_path / "o2", "test")[0], xv)


def test_npy_is_memory_mapped_and_roundtrips(tmp_path, monkeypatch):
    path, x = dh.make_npy(tmp_path / "r.npy", n=9)
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        out = real_load(*args, **kwargs)
        calls.append(type(out))
        return out

    monkeypatch.setattr(np, "load", spy)
    open_source(f"npy:{path}")
    assert calls == [np.memmap]  # the 300K RandomImages file must never be loaded whole
    _roundtrip(f"npy:{path}", tmp_path / "out", kind="outlier", num_shards=2)
    images, labels, _, _ = dh.read_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(images, x)
    assert (labels == -1).all()


def test_svhn_mat_maps_10_to_digit_0(tmp_path):
    path, x, digits = dh.make_svhn_mat(tmp_path / "test_32x32.mat", n=13)
    m = _roundtrip(f"mat:{path}", tmp_path / "out")
    assert list(m.splits) == ["test"]  # split inferred from the file name
    images, labels, _, _ = dh.read_split(tmp_path / "out", "test")
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, digits)
    assert 0 in labels


def test_tfds_mock_mnist_roundtrip(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        expected = list(tfds.as_numpy(tfds.builder("mnist").as_dataset(split="test", shuffle_files=False)))
        m = _roundtrip("tfds:mnist:test", tmp_path / "out")
    assert m.image_shape == [28, 28, 1] and m.num_classes == 10 and list(m.splits) == ["test"]
    images, labels, _, _ = dh.read_split(tmp_path / "out", "test")
    np.testing.assert_array_equal(images, np.stack([e["image"] for e in expected]))
    np.testing.assert_array_equal(labels, [e["label"] for e in expected])


def test_unknown_form_and_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="FORM:ARG.*Received: source='zip:/x'"):
        open_source("zip:/x")
    with pytest.raises(ConfigError, match="Received: source='no_colon'"):
        open_source("no_colon")
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match=f"{missing}: source path does not exist"):
        open_source(f"npz:{missing}")


def test_npz_and_npy_swapped_name_the_file_and_the_right_form(tmp_path):
    archive = tmp_path / "a.npz"
    np.savez(archive, x=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=f"{archive}: is a .npz archive, not a .npy array; use --source=npz:"):
        open_source(f"npy:{archive}")
    array, _ = dh.make_npy(tmp_path / "r.npy", n=3)
    with pytest.raises(DataError, match=f"{array}: not a readable .npz archive"):
        open_source(f"npz:{array}")


def test_folder_of_split_folders_gives_one_split_each_with_the_same_classes(tmp_path):
    _, x_train, y_train = dh.make_image_folder(tmp_path / "imgs" / "train", {"cat": 4, "dog": 3})
    _, x_test, y_test = dh.make_image_folder(tmp_path / "imgs" / "test", {"cat": 2, "dog": 1}, seed=7)
    m = _roundtrip(f"folder:{tmp_path / 'imgs'}", tmp_path / "out")
    assert list(m.splits) == ["train", "test"] and m.class_names == ["cat", "dog"]
    assert m.count("train") == 7 and m.count("test") == 3
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        images, labels, _, _ = dh.read_split(tmp_path / "out", split)
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)  # dog is 1 in both splits
    assert list(_roundtrip(f"folder:{tmp_path / 'imgs'}", tmp_path / "t", split="test").splits) == ["test"]


def test_split_folders_with_different_classes_are_an_error(tmp_path):
    dh.make_image_folder(tmp_path / "imgs" / "train", {"cat": 2, "dog": 2})
    dh.make_image_folder(tmp_path / "imgs" / "test", {"cat": 1, "cow": 1})
    with pytest.raises(DataError, match=r"imgs/test: class folders \['cat', 'cow'\] differ .*"
                                        r"missing: \['dog'\], extra: \['cow'\]"):
        open_source(f"folder:{tmp_path / 'imgs'}")


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    d, _, _ = dh.make_image_folder(tmp_path / "f", {"a": 2})
    (tmp_path / "f" / "b").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'f' / 'b'}: class folder has no images.*remove it"):
        open_source(f"folder:{d}")


def test_16_bit_gray_keeps_the_high_byte_and_32_bit_or_float_is_refused(tmp_path):
    from PIL import Image

    gray16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    tiff16 = Image.frombytes("I;16B", (32, 32), gray16.astype(">u2").tobytes())
    tiff16.save(tmp_path / "g16b.tif")
    for name in ("g16.png", "g16b.tif"):
        np.testing.assert_array_equal(load_image_file(str(tmp_path / name))[..., 0], gray16 >> 8)
    Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)).save(tmp_path / "f.tif")
    Image.fromarray(np.arange(16, dtype=np.int32).reshape(4, 4) * 100000).save(tmp_path / "i.tif")
    for name, mode in (("f.tif", "F"), ("i.tif", "I")):
        with pytest.raises(DataError, match=f"{tmp_path / name}: image mode '{mode}' .*no fixed range"):
            load_image_file(str(tmp_path / name))


def test_gray_with_alpha_stays_one_channel_and_alpha_is_dropped(tmp_path):
    from PIL import Image

    la = dh.random_images(1, 8, 8, 2)[0]
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image_file(str(tmp_path / "la.png")), la[..., :1])
    rgba = dh.random_images(1, 8, 8, 4)[0]
    rgba[0, 0, 3] = 0  # fully transparent: keeps its stored colour
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image_file(str(tmp_path / "rgba.png")), rgba[..., :3])


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    stored = dh.random_images(1, 20, 40)[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "cam.jpg", quality=100, exif=exif.tobytes())
    with Image.open(tmp_path / "cam.jpg") as im:
        decoded = np.asarray(im.convert("RGB"))  # as stored, not rotated
    out = load_image_file(str(tmp_path / "cam.jpg"))
    assert out.shape == (40, 20, 3)
    np.testing.assert_array_equal(out, np.rot90(decoded, k=-1))


@pytest.mark.parametrize("labels, match", [
    (np.array([0, 1, np.nan, 1]), r"a.npz:train: labels \('y'\) must be integers. Received: dtype=float64"),
    (np.array(["cat", "dog", "cat", "dog"]), r"a.npz:train: labels \('y'\) must be integers. Received: dtype=<U3"),
    (np.array([0, "dog", 1, None], dtype=object), r"a.npz: array 'y' is not a plain numeric array"),
], ids=["nan", "strings", "objects"])
def test_nan_string_or_object_labels_are_a_data_error_naming_the_file_and_key(tmp_path, labels, match):
    np.savez(tmp_path / "a.npz", x=dh.random_images(4, 8, 8), y=labels)
    with pytest.raises(DataError, match=match):
        open_source(f"npz:{tmp_path / 'a.npz'}")


@pytest.mark.parametrize("y_train, y_test, missing", [
    ([1, 2, 3, 3], [1, 2], r"1 of the class ids 0..3 have no images in any split \(e.g. \[0\]\)"),
    ([0, 1, 2, 2_000_000], [0, 1], r"1999997 of the class ids 0..2000000 .*\(e.g. \[3, 4, 5, 6, 7\]\)"),
], ids=["labels_1_to_K", "sparse_ids"])
def test_class_ids_without_images_are_an_error_naming_them_and_the_fix(tmp_path, y_train, y_test, missing):
    np.savez(tmp_path / "a.npz", x_train=dh.random_images(4, 8, 8), y_train=np.array(y_train),
             x_test=dh.random_images(2, 8, 8), y_test=np.array(y_test))
    with pytest.raises(DataError, match=f"a.npz: labels go up to .* but {missing}.*np.unique"):
        open_source(f"npz:{tmp_path / 'a.npz'}")


def test_a_class_present_in_one_split_only_is_fine(tmp_path):
    np.savez(tmp_path / "a.npz", x_train=dh.random_images(3, 8, 8), y_train=np.array([0, 1, 1]),
             x_test=dh.random_images(2, 8, 8), y_test=np.array([2, 2]))
    assert open_source(f"npz:{tmp_path / 'a.npz'}").class_names == ["0", "1", "2"]


def test_hidden_files_such_as_apple_double_are_skipped(tmp_path):
    d, x, y = dh.make_image_folder(tmp_path / "f", {"cat": 2, "dog": 1})
    (tmp_path / "f" / "cat" / "._img0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    (tmp_path / "f" / ".hidden.png").write_bytes(b"not an image")
    m = convert(f"folder:{d}", str(tmp_path / "out"), show_progress=False)
    assert m.class_names == ["cat", "dog"]
    images, labels, _, _ = dh.read_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)


def test_a_folder_inside_a_class_folder_is_an_error_naming_it(tmp_path):
    d, _, _ = dh.make_image_folder(tmp_path / "f", {"cat": 2, "dog": 1})
    dh.make_image_folder(tmp_path / "f" / "cat" / "2019", 1)
    with pytest.raises(DataError, match=f"{tmp_path / 'f' / 'cat' / '2019'}: a folder inside the class folder "
                                        f"{tmp_path / 'f' / 'cat'}; nested folders are not read"):
        open_source(f"folder:{d}")


def test_non_images_and_broken_links_are_skipped_with_one_note_and_jfif_is_read(tmp_path, capsys):
    from PIL import Image

    d, x, y = dh.make_image_folder(tmp_path / "f", {"cat": 2, "dog": 1})
    jfif = dh.random_images(1, seed=5)[0]
    Image.fromarray(jfif).save(tmp_path / "f" / "dog" / "photo.jfif", format="JPEG", quality=100)
    with Image.open(tmp_path / "f" / "dog" / "photo.jfif") as im:
        jfif = np.asarray(im)  # as decoded (JPEG is lossy)
    (tmp_path / "f" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "f" / "dog" / "gone.png").symlink_to(tmp_path / "missing.png")
    for junk in (".DS_Store", "Thumbs.db", "desktop.ini"):  # operating system files: no note
        (tmp_path / "f" / "cat" / junk).write_bytes(b"junk")
    m = convert(f"folder:{d}", str(tmp_path / "out"), show_progress=False)
    assert m.count("train") == 4
    images, labels, _, _ = dh.read_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(images, np.concatenate([x, jfif[None]]))
    np.testing.assert_array_equal(labels, [*y, 1])
    err = capsys.readouterr().err
    assert err.count("note: ") == 1
    assert (f"note: {d}: skipped 2 file(s) that are not images" in err and "Thumbs" not in err
            and f"e.g. {tmp_path / 'f' / 'cat' / 'notes.txt'}, {tmp_path / 'f' / 'dog' / 'gone.png'})" in err)


def test_a_stray_folder_next_to_split_folders_is_the_one_the_error_names(tmp_path):
    dh.make_image_folder(tmp_path / "imgs" / "train", {"cat": 2, "dog": 2})
    dh.make_image_folder(tmp_path / "imgs" / "test", {"cat": 1, "dog": 1})
    dh.make_image_folder(tmp_path / "imgs" / "unsorted", 3)
    with pytest.raises(DataError, match=r"imgs/unsorted: not a split folder of class folders, but .*imgs has the "
                                        r"split folders \['test', 'train'\] .*move or remove \['unsorted'\]"):
        open_source(f"folder:{tmp_path / 'imgs'}")
    (tmp_path / "imgs" / "unsorted").rename(tmp_path / "unsorted")
    loose = tmp_path / "imgs" / "train" / "loose.png"
    (tmp_path / "unsorted" / sorted(os.listdir(tmp_path / "unsorted"))[0]).rename(loose)
    with pytest.raises(DataError, match=rf"{loose}: an image directly in the split folder .*imgs/train, next to its "
                                        rf"class folders \['cat', 'dog'\]"):
        open_source(f"folder:{tmp_path / 'imgs'}")


def test_split_named_folders_of_loose_images_are_classes_with_a_note(tmp_path):
    dh.make_image_folder(tmp_path / "imgs" / "train", 3)  # images directly in train/ and test/
    dh.make_image_folder(tmp_path / "imgs" / "test", 2)
    src = open_source(f"folder:{tmp_path / 'imgs'}")
    assert src.class_names == ["test", "train"] and src.splits["train"].count == 5  # the documented DIR/CLASS rule
    assert any("['test', 'train'] are read as classes" in note and "convert each split folder on its own" in note
               for note in src.notes), src.notes
    dh.make_image_folder(tmp_path / "pets", {"cat": 1, "dog": 1})
    assert not open_source(f"folder:{tmp_path / 'pets'}").notes
