"""Image I/O: round trips, atomic writes, deterministic bytes, clear errors."""

import gzip
import os
import stat

import nibabel as nib
import numpy as np
import pytest

from atlasflow.errors import AtlasflowError
from atlasflow.io.images import Image, load_image, save_image


def test_round_trip_keeps_data_and_affine(tmp_path, blob):
    path = save_image(blob, tmp_path / "a.nii.gz")
    back = load_image(path)
    np.testing.assert_allclose(back.data, blob.data, atol=1e-6)
    np.testing.assert_allclose(back.affine, blob.affine)


def test_same_image_gives_identical_bytes(tmp_path, blob):
    a = save_image(blob, tmp_path / "a.nii.gz").read_bytes()
    b = save_image(blob, tmp_path / "b.nii.gz").read_bytes()
    assert a == b


def test_no_temporary_file_left_behind(tmp_path, blob):
    save_image(blob, tmp_path / "a.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]


def test_singleton_fourth_dimension_is_dropped(tmp_path, blob):
    nib.save(nib.Nifti1Image(blob.data[..., None], blob.affine), tmp_path / "x.nii.gz")
    assert load_image(tmp_path / "x.nii.gz").data.shape == blob.data.shape


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "file not found"),
        (lambda p: p.write_text("hello, not an image"), "not a readable NIfTI"),
        (lambda p: nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), p), "expected a 3-D image"),
        (lambda p: nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), p), "NaN"),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path, make, message):
    path = tmp_path / "bad.nii.gz"
    make(path)
    with pytest.raises(AtlasflowError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_is_an_atlasflow_error(tmp_path, blob):
    path = save_image(blob, tmp_path / "a.nii.gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AtlasflowError):
        load_image(path)
    # sanity: the file really is a truncated gzip stream
    with pytest.raises((EOFError, OSError)), gzip.open(path) as fh:
        fh.read()


def test_vector_images_keep_their_components(tmp_path):
    field = Image(np.random.default_rng(0).normal(size=(5, 6, 7, 3)).astype(np.float32), np.eye(4))
    save_image(Image(field.data[:, :, :, None, :], field.affine), tmp_path / "v.nii.gz", intent="vector")
    back = load_image(tmp_path / "v.nii.gz", allow_vector=True)
    np.testing.assert_allclose(back.data, field.data)


@pytest.mark.parametrize("existing", [False, True])
def test_a_write_that_fails_midway_leaves_nothing_under_the_final_name(tmp_path, blob, monkeypatch, existing):
    """A crash while writing (disk full, killed job) never leaves a partial file as if complete."""
    import atlasflow.io.images as aio

    target = tmp_path / "a.nii.gz"
    if existing:  # an earlier complete version stays exactly as it was
        save_image(blob.with_data(blob.data * 2), target)
    before = target.read_bytes() if existing else None

    class FullDisk(gzip.GzipFile):
        def write(self, data):
            super().write(bytes(data)[: len(data) // 2])  # part of the bytes reach the disk
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(aio.gzip, "GzipFile", FullDisk)
    with pytest.raises(OSError, match="No space left"):
        save_image(blob, target)
    assert [p.name for p in tmp_path.iterdir()] == (["a.nii.gz"] if existing else [])
    if existing:
        assert target.read_bytes() == before


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_get_the_permissions_the_umask_allows(tmp_path, blob, umask, mode):
    """Atomic writes go through a temporary file, which mkstemp makes 0600: the outputs must
    still be readable by whoever the user's umask lets read new files (a lab's group)."""
    from atlasflow.io.atomic import atomic_write_text
    from atlasflow.io.itk import write_itk_affine

    previous = os.umask(umask)
    try:
        written = [
            save_image(blob, tmp_path / "a.nii.gz"),
            save_image(blob, tmp_path / "a.nii"),
            atomic_write_text(tmp_path / "a.tsv", "x\n"),
            write_itk_affine(np.eye(4), tmp_path / "a.mat"),
        ]
    finally:
        os.umask(previous)
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {mode}
