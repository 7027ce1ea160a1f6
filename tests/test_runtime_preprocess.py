"""Runtime preprocessing (Pillow + numpy) against open_clip's own transform, on real photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from qks.runtime.preprocess import Preprocess, PreprocessError
from runtime_fixtures import PHOTOS, photo

from qks.images import to_rgb

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PARITY_BOUND = 1e-5  # measured: 0.0 (bit-identical) on every photo and setting below


def open_clip_pixels(img: Image.Image, size: int, interpolation: str, resize_mode: str = "shortest") -> np.ndarray:
    import open_clip

    tf = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD, resize_mode=resize_mode,
                                   interpolation=interpolation)
    return tf(img).numpy()


def runtime_pp(size, interpolation="bicubic", resize_mode="shortest", **kw) -> Preprocess:
    return Preprocess(size=size, resize_mode=resize_mode, interpolation=interpolation, mean=MEAN, std=STD, **kw)


@pytest.mark.parametrize("size,interpolation,resize_mode", [(224, "bicubic", "shortest"), (32, "bicubic", "shortest"),
                                                            (224, "bilinear", "shortest"), (224, "bicubic", "squash")])
def test_parity_with_open_clip_on_real_photos(size, interpolation, resize_mode):
    worst = 0.0
    for name in PHOTOS:
        img = photo(name)
        for im in (img, img.transpose(Image.Transpose.TRANSPOSE)):  # landscape and portrait crops
            ours = runtime_pp(size, interpolation, resize_mode)(im)
            ref = open_clip_pixels(im, size, interpolation, resize_mode)
            assert ours.shape == ref.shape == (3, size, size) and ours.dtype == np.float32
            worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"max abs diff vs open_clip ({size}, {interpolation}, {resize_mode}): {worst:.3g}")
    assert worst <= PARITY_BOUND


def test_parity_with_the_tiny_models_own_preprocess(tiny_backbone):
    """The bundle's Preprocess (from the backbone) against the qks training-side eval transform."""
    from qks.transforms import eval_transform

    pp_dict = tiny_backbone.preprocess.to_dict()
    ours = Preprocess.from_dict(pp_dict)
    for name in PHOTOS:
        img = photo(name)
        ref = eval_transform(tiny_backbone.preprocess)(img).numpy()
        np.testing.assert_allclose(ours(img), ref, rtol=0, atol=PARITY_BOUND)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "RGBA", "LA", "YCbCr"])
def test_modes_match_the_training_loader(mode):
    """Training loads with `.convert("RGB")` then the transform; the runtime does the same."""
    base = photo("chelsea")
    img = base.convert(mode) if mode != "LA" else base.convert("L").convert("LA")
    if mode in ("RGBA", "LA"):
        alpha = Image.linear_gradient("L").resize(img.size)
        img.putalpha(alpha)
    ours = runtime_pp(224)(img)
    ref = open_clip_pixels(img.convert("RGB"), 224, "bicubic")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_BOUND)


def test_alpha_composited_over_background_when_asked():
    img = Image.new("RGBA", (40, 30), (10, 200, 30, 255))
    img.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent (hidden colour black)
    rgb = np.asarray(to_rgb(img, background=(255, 255, 255)))
    assert (rgb[:, :20] == 255).all() and (rgb[:, 20:] == (10, 200, 30)).all()
    dropped = np.asarray(to_rgb(img))  # default: parity with convert("RGB")
    assert (dropped[:, :20] == 0).all()


def test_palette_with_transparency_and_background():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (4, 0, 8, 8))
    img.info["transparency"] = 0
    rgb = np.asarray(to_rgb(img, background=(0, 0, 255)))
    assert (rgb[:, :4] == (0, 0, 255)).all() and (rgb[:, 4:] == (255, 0, 0)).all()


@pytest.mark.parametrize("mode,values,expected", [
    ("I;16", np.array([[0, 257, 65535]], dtype=np.uint16), [0, 1, 255]),
    ("I", np.array([[0, 128, 255]], dtype=np.int32), [0, 128, 255]),  # 8-bit range kept
    ("I", np.array([[0, 32896, 65535]], dtype=np.int32), [0, 128, 255]),  # 16-bit range scaled
    ("F", np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),  # [0, 1] scaled
    ("F", np.array([[-3.0, 100.0, 900.0]], dtype=np.float32), [0, 100, 255]),  # else clipped
])
def test_high_bit_depth_modes_are_scaled_not_clipped(mode, values, expected):
    img = Image.fromarray(values)
    assert img.mode == mode
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (1, 3, 3)
    assert rgb[0, :, 0].tolist() == expected and (rgb[..., 0] == rgb[..., 2]).all()


def test_sixteen_bit_png_photo_matches_its_eight_bit_version(tmp_path):
    gray = np.asarray(photo("coffee").convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    loaded = Image.open(tmp_path / "g16.png")
    assert loaded.mode.startswith("I")
    ours = runtime_pp(224).load(tmp_path / "g16.png")
    ref = open_clip_pixels(Image.fromarray(gray).convert("RGB"), 224, "bicubic")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_BOUND)


@pytest.mark.parametrize("orientation,transpose", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270),
                                                   (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_honoured(tmp_path, orientation, transpose):
    img = photo("coffee")  # 600 x 400: a wrong orientation changes the crop
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    ours = runtime_pp(224).load(path)
    with Image.open(path) as raw:
        upright = raw.convert("RGB").transpose(transpose)
        as_stored = raw.convert("RGB")
    np.testing.assert_allclose(ours, open_clip_pixels(upright, 224, "bicubic"), rtol=0, atol=PARITY_BOUND)
    assert np.abs(ours - open_clip_pixels(as_stored, 224, "bicubic")).max() > 0.1


def test_unreadable_files_give_short_errors(tmp_path):
    pp = runtime_pp(32)
    (tmp_path / "junk.png").write_bytes(b"definitely not a png")
    with pytest.raises(PreprocessError, match="not a readable image"):
        pp.load(tmp_path / "junk.png")
    photo("astronaut").save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(PreprocessError, match="cannot decode"):
        pp.load(tmp_path / "cut.jpg")
    with pytest.raises(PreprocessError, match="not found"):
        pp.load(tmp_path / "missing.jpg")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="resize mode"):
        Preprocess(size=32, resize_mode="longest")
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(size=32, interpolation="lanczos")


def _training_pixels(path, size=224):
    """What training/qks-eval feed the model for a file: qks.data.load_rgb then qks.transforms."""
    from qks.backbones.base import Preprocess as TrainPreprocess
    from qks.data import load_rgb
    from qks.transforms import eval_transform

    pp = TrainPreprocess(size=size, resize_mode="shortest", interpolation="bicubic", mean=MEAN, std=STD)
    return eval_transform(pp)(load_rgb(str(path))).numpy()


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "RGBA", "I;16"])
def test_parity_with_the_training_loader_on_files(tmp_path, mode):
    img = photo("rocket").convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    np.testing.assert_allclose(runtime_pp(224).load(path), _training_pixels(path), rtol=0, atol=PARITY_BOUND)


def test_exif_orientation_parity_with_the_training_loader(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    photo("coffee").save(tmp_path / "r.jpg", exif=exif, quality=95)
    np.testing.assert_allclose(runtime_pp(224).load(tmp_path / "r.jpg"), _training_pixels(tmp_path / "r.jpg"),
                               rtol=0, atol=PARITY_BOUND)
