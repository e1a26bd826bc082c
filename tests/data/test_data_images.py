import shutil

import numpy as np
import tifffile

from kiban.data import Rejects, detect_kind, read, read_images
from kiban.encoders.image import ImageFeaturizer


def _report(rejects):
    report = rejects.report()
    assert report.read == report.accepted + report.rejected
    return report


def test_real_scikit_image_files_come_out_as_z_c_h_w(skimage_data):
    (cell,) = read(skimage_data / "cell.png")
    assert cell.item.shape == (1, 1, 660, 550) and cell.id == "cell.png"
    (ihc,) = read(skimage_data / "ihc.png")
    assert ihc.item.shape == (1, 3, 512, 512)
    (stack,) = read(skimage_data / "multipage.tif")  # two pages: a z-stack
    assert stack.item.shape == (2, 1, 15, 10)
    (rgb_stack,) = read(skimage_data / "multipage_rgb.tif")
    assert rgb_stack.item.shape == (2, 3, 10, 10)
    features = ImageFeaturizer(in_chans=3, img_size=32)(ihc.item, item_id=ihc.id)
    assert features["pixels"].shape == (1, 3, 32, 32)


def test_ome_tiff_axes_time_points_become_records(tmp_path):
    data = np.random.default_rng(0).integers(0, 4000, size=(2, 4, 3, 16, 20), dtype=np.uint16)  # T C Z Y X
    path = tmp_path / "movie.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "TCZYX"})
    assert detect_kind(path) == "image"
    records = list(read(path))
    assert [r.id for r in records] == ["movie.ome.tif[t=0]", "movie.ome.tif[t=1]"]
    assert records[1].item.shape == (3, 4, 16, 20)  # Z, C, H, W
    np.testing.assert_array_equal(records[1].item[2, 1], data[1, 1, 2])


def test_a_corrupt_tiff_in_a_folder_is_reported_and_the_rest_read(tmp_path, skimage_data):
    shutil.copy(skimage_data / "ihc.png", tmp_path / "a.png")
    good = tmp_path / "sub" / "b.tif"
    good.parent.mkdir()
    tifffile.imwrite(good, np.ones((8, 8), dtype=np.uint8))
    broken = tmp_path / "sub" / "c.tif"
    broken.write_bytes(good.read_bytes()[:40])
    (tmp_path / "notes.txt").write_text("not an image, not read")
    rejects = Rejects()
    records = list(read_images(tmp_path, rejects=rejects))
    assert [r.id for r in records] == ["a.png", "sub/b.tif"]
    report = _report(rejects)
    assert report.by_reason == {"unreadable image": 1}
    assert report.first_rejects[0].location == str(broken) and report.first_rejects[0].id == "sub/c.tif"


def test_non_finite_pixels_are_rejected(tmp_path):
    image = np.zeros((6, 6), dtype=np.float32)
    image[2, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", image)
    rejects = Rejects()
    assert list(read(tmp_path / "nan.tif", rejects=rejects)) == []
    assert rejects.report().by_reason == {"invalid pixels": 1}


def test_shared_blood_cell_crops(shared_data):
    rejects = Rejects()
    records = list(read(shared_data / "microscopy/bccd_blood_cells/crops", rejects=rejects))
    assert len(records) == 360 and _report(rejects).rejected == 0
    assert {r.item.shape for r in records} == {(1, 3, 64, 64)}
