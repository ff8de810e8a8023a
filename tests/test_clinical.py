import numpy as np
import pytest

import vlseg
from vlseg.data import clinical as C

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")


def write_dicom(path, values, slope=1.0, intercept=-1024.0, photometric="MONOCHROME2", z=0.0, spacing=(0.7, 0.8),
                window=None, instance=1):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "CT"
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelSpacing = list(spacing)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    ds.InstanceNumber = instance
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = values.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_dicom_rescale_window_and_spacing(tmp_path):
    raw = np.zeros((16, 20), np.uint16)
    raw[:, :10] = 1024 + 40  # 40 HU: the abdomen window center
    raw[:, 10:] = 1024 + 500  # 500 HU: above the window
    p = write_dicom(tmp_path / "a.dcm", raw)
    img, meta = C.read_dicom(p, win="abdomen")
    assert img.shape == (16, 20) and meta["spacing"] == (0.7, 0.8) and meta["modality"] == "CT"
    assert abs(int(img[0, 0]) - 128) <= 1 and img[0, 15] == 255
    assert meta["value_range"] == (40.0, 500.0)
    img_lung, _ = C.read_dicom(p, win="lung")
    assert abs(int(img_lung[0, 0]) - 236) <= 1  # (40 + 1350) / 1500 * 255 in the lung window (-600, 1500)


def test_dicom_monochrome1_inverted(tmp_path):
    raw = np.zeros((8, 8), np.uint16)
    raw[:4] = 1000
    a, _ = C.read_dicom(write_dicom(tmp_path / "m2.dcm", raw, intercept=0), win=None)
    b, _ = C.read_dicom(write_dicom(tmp_path / "m1.dcm", raw, intercept=0, photometric="MONOCHROME1"), win=None)
    assert np.array_equal(b, 255 - a)


def test_dicom_file_window_and_segment(tmp_path):
    raw = (np.random.default_rng(0).random((32, 32)) * 2000).astype(np.uint16)
    p = write_dicom(tmp_path / "x.dcm", raw, window=(40, 400))
    m = vlseg.create_model("tiny-test", pretrained=False)
    masks = vlseg.segment(m, p, ["liver", "aorta"])
    assert masks.shape == (2, 32, 32)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.dcm"):
        vlseg.segment(m, bad, ["liver"])


def test_dicom_series(tmp_path):
    for i, z in enumerate([5.0, 0.0, 2.5]):
        write_dicom(tmp_path / f"s{i}.dcm", np.full((6, 7), 1024 + 10 * i, np.uint16), z=z, instance=i)
    vol = C.read_dicom_series(tmp_path)
    assert vol.data.shape == (6, 7, 3) and vol.spacing == (0.7, 0.8, 2.5)
    assert [vol.data[0, 0, k] for k in range(3)] == [10.0, 20.0, 0.0]  # sorted by position: z = 0, 2.5, 5


def test_nifti_round_trip_keeps_affine_and_spacing(tmp_path):
    aff = np.array([[0.8, 0, 0, 10], [0, 0.7, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]], float)
    data = (np.random.default_rng(0).random((24, 20, 4)) * 1000 - 500).astype(np.int16)
    src = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(src))
    vol = C.read_nifti(src)
    assert vol.spacing == pytest.approx((0.8, 0.7, 2.5)) and np.allclose(vol.affine, aff)
    assert len(C.volume_slices(vol, axis=2)) == 4 and C.volume_slices(vol, axis=0)[0].shape == (20, 4)
    m = vlseg.create_model("tiny-test", pretrained=False)
    masks = vlseg.segment(m, src, ["liver"], window="abdomen")
    assert masks.shape == (1, 24, 20, 4) and masks.dtype == bool
    # An informative mask: an off-centre box in every axis plus one lone voxel, so a flip, transpose, shift or
    # resampling of any axis on the way to disk and back changes it (the segmentation above may be all empty).
    mask = np.zeros(data.shape, bool)
    mask[3:9, 12:17, 1:3] = True
    mask[20, 2, 3] = True
    for axis in range(3):
        assert not np.array_equal(mask, np.flip(mask, axis))
    out = C.write_nifti(mask, vol, tmp_path / "liver.nii.gz")
    back = nib.load(out)
    arr = np.asarray(back.dataobj)
    assert back.shape == data.shape and np.allclose(back.affine, aff)
    assert arr.dtype == np.uint8 and set(np.unique(arr).tolist()) == {0, 1}
    assert np.array_equal(arr.astype(bool), mask) and int(arr.sum()) == 6 * 5 * 2 + 1
    assert np.allclose(back.affine @ [20, 2, 3, 1], aff @ [20, 2, 3, 1])  # the lone voxel sits where it did
    assert back.header.get_zooms()[:3] == pytest.approx((0.8, 0.7, 2.5))
    seg = nib.load(C.write_nifti(masks[0], vol, tmp_path / "seg.nii.gz"))
    assert np.array_equal(np.asarray(seg.dataobj).astype(bool), masks[0])
    with pytest.raises(FileExistsError):
        C.write_nifti(mask, vol, tmp_path / "liver.nii.gz")


def test_dicom_series_mask_lands_at_its_world_position(tmp_path):
    """A series (LPS) mask written as NIfTI (RAS): a voxel at (row 2, col 5, slice 1) is at x = 5 * 0.8 mm,
    y = 2 * 0.7 mm, z = 2.5 mm in LPS, i.e. (-4.0, -1.4, 2.5) in RAS."""
    for i, z in enumerate([0.0, 2.5, 5.0]):
        write_dicom(tmp_path / f"s{i}.dcm", np.full((6, 7), 1024, np.uint16), z=z, instance=i)
    vol = C.read_dicom_series(tmp_path)
    mask = np.zeros(vol.data.shape, bool)
    mask[2, 5, 1] = True
    back = nib.load(C.write_nifti(mask, vol, tmp_path / "out" / "m.nii.gz"))
    (ijk,) = np.argwhere(np.asarray(back.dataobj) > 0)
    assert tuple(ijk) == (2, 5, 1)
    assert np.allclose(back.affine @ [*ijk, 1], [-4.0, -1.4, 2.5, 1])


def test_sixteen_bit_png(tmp_path):
    from PIL import Image

    arr = np.zeros((20, 30), np.uint16)
    arr[:, 15:] = 40000
    Image.fromarray(arr).save(tmp_path / "x.png")
    img, _ = vlseg.io.read_image(tmp_path / "x.png")
    assert img.shape == (20, 30, 3) and img[0, 0, 0] == 0 and img[0, 20, 0] == 255
