"""dittofx.metrics against values known in closed form and against scikit-image."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dittofx.cli import Row, format_table, main
from dittofx.metrics import compare_dirs, load_pngs, psnr, relative_l2, save_pngs, ssim, to_uint8


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert psnr(a, a.copy(), 255.0) == math.inf
    assert ssim(a, a.copy(), 255.0) == pytest.approx(1.0, abs=1e-12)
    assert relative_l2(a, a.copy()) == 0.0


def test_constant_offset_gives_formula_value():
    # MSE = 0.1^2 = 0.01 with data range 1 -> exactly 20 dB
    a = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    assert psnr(a + 0.1, a, 1.0) == pytest.approx(20.0, abs=1e-9)
    # data range 2 (images in [-1, 1]) adds 20 log10(2) dB
    assert psnr(a + 0.1, a, 2.0) == pytest.approx(20.0 + 20 * math.log10(2), abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(1.0, 60.0), seed=st.integers(0, 2**31 - 1))
def test_gaussian_noise_matches_psnr_formula(sigma, seed):
    rng = np.random.default_rng(seed)
    clean = rng.uniform(0, 255, (16, 16, 3))
    noisy = clean + rng.normal(0, sigma, clean.shape)
    mse = np.mean((noisy - clean) ** 2)  # independent: the definition, on the realised noise
    assert psnr(noisy, clean, 255.0) == pytest.approx(10 * np.log10(255.0**2 / mse), rel=1e-12)


def test_uint8_inputs_do_not_wrap_around():
    black = np.zeros((1, 4, 4, 3), np.uint8)
    white = np.full((1, 4, 4, 3), 255, np.uint8)
    # in uint8, black - white wraps to 1 and would give ~48 dB; the true MSE is 255^2 -> 0 dB
    assert psnr(black, white, 255.0) == pytest.approx(0.0, abs=1e-12)
    one = np.full((1, 4, 4, 3), 1, np.uint8)
    assert psnr(black, one, 255.0) == pytest.approx(20 * math.log10(255.0), abs=1e-9)


def test_ssim_is_scikit_image_per_image_mean():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, (3, 32, 32, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    want = np.mean([structural_similarity(x, y, data_range=1.0, channel_axis=-1) for x, y in zip(a, b)])
    assert ssim(a, b, 1.0) == pytest.approx(want, rel=1e-12)
    assert 0 < ssim(a, b, 1.0) < 1


def test_relative_l2_known_value():
    ref = torch.tensor([3.0, 4.0])  # norm 5
    assert relative_l2(ref + torch.tensor([0.0, 1.0]), ref) == pytest.approx(0.2)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((2, 2)), np.zeros((2, 3)), 1.0)


def test_png_roundtrip_and_compare_dirs(tmp_path, capsys):
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.uniform(-1, 1, (3, 3, 16, 16))).float()
    pixels = to_uint8(images)
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 16, 16, 3)
    # [-1, 1] -> [0, 255]: -1 -> 0, 1 -> 255
    assert to_uint8(torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2))[0, 0, :, 0].tolist() == [0, 255]
    names = ["a", "b", "c"]
    save_pngs(pixels, tmp_path / "x", names)
    loaded = load_pngs(tmp_path / "x")
    assert list(loaded) == ["a.png", "b.png", "c.png"]
    assert all(np.array_equal(loaded[f"{n}.png"], p) for n, p in zip(names, pixels))
    noisy = np.clip(pixels.astype(np.int16) + rng.integers(-8, 9, pixels.shape), 0, 255).astype(np.uint8)
    save_pngs(noisy, tmp_path / "y", names)
    result = compare_dirs(tmp_path / "x", tmp_path / "y")
    assert result["images"] == 3
    assert result["psnr"] == pytest.approx(psnr(pixels, noisy, 255.0))
    assert result["ssim"] == pytest.approx(ssim(pixels, noisy, 255.0))
    assert main(["metrics", str(tmp_path / "x"), str(tmp_path / "y")]) == 0
    assert f"PSNR {result['psnr']:.2f} dB" in capsys.readouterr().out


def test_compare_dirs_rejects_different_file_sets(tmp_path):
    pixels = np.zeros((2, 4, 4, 3), np.uint8)
    save_pngs(pixels, tmp_path / "x", ["a", "b"])
    save_pngs(pixels, tmp_path / "y", ["a", "c"])
    with pytest.raises(ValueError, match="different files"):
        compare_dirs(tmp_path / "x", tmp_path / "y")


def test_compare_dirs_compares_pair_by_pair(tmp_path):
    """Folders whose images differ in size among themselves: PSNR pooled over all pixels (the sum
    of squared errors over the pixel count) and SSIM averaged over the pairs, computed here by hand."""
    rng = np.random.default_rng(3)
    small, large = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((8, 8, 3), (16, 12, 3)))
    small_b, large_b = ((x.astype(np.int16) + rng.integers(-9, 10, x.shape)).clip(0, 255).astype(np.uint8) for x in (small, large))
    for folder, images in (("x", (small, large)), ("y", (small_b, large_b))):
        for name, image in zip(("a", "b"), images):
            save_pngs(image[None], tmp_path / folder, [name])
    squared = sum(float(((x.astype(float) - y) ** 2).sum()) for x, y in ((small, small_b), (large, large_b)))
    want_psnr = 10 * np.log10(255.0**2 / (squared / (small.size + large.size)))
    result = compare_dirs(tmp_path / "x", tmp_path / "y")
    assert result["psnr"] == pytest.approx(want_psnr)
    assert result["ssim"] == pytest.approx((ssim(small, small_b, 255.0) + ssim(large, large_b, 255.0)) / 2)


def test_metrics_errors_name_the_file_and_the_problem(tmp_path, capsys):
    pixels = np.zeros((1, 8, 8, 3), np.uint8)
    save_pngs(pixels, tmp_path / "x", ["a"])
    save_pngs(np.zeros((1, 16, 8, 3), np.uint8), tmp_path / "y", ["a"])
    with pytest.raises(ValueError, match=r"a.png: 8x8 in .*x, 8x16 in .*y"):
        compare_dirs(tmp_path / "x", tmp_path / "y")
    save_pngs(pixels, tmp_path / "z", ["only_z"])
    with pytest.raises(ValueError, match=r"only in .*x: \['a.png'\]; only in .*z: \['only_z.png'\]"):
        compare_dirs(tmp_path / "x", tmp_path / "z")
    save_pngs(np.zeros((1, 4, 4, 3), np.uint8), tmp_path / "tiny_a", ["a"])
    save_pngs(np.zeros((1, 4, 4, 3), np.uint8), tmp_path / "tiny_b", ["a"])
    with pytest.raises(ValueError, match=r"a.png: 4x4, smaller than SSIM's 7x7 window"):
        compare_dirs(tmp_path / "tiny_a", tmp_path / "tiny_b")
    (tmp_path / "upper").mkdir()
    (tmp_path / "x" / "a.png").rename(tmp_path / "upper" / "A.PNG")
    assert list(load_pngs(tmp_path / "upper")) == ["A.PNG"]  # the extension in any case
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"bad/a.png: not a readable PNG"):
        load_pngs(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"empty: no .png files"):
        (tmp_path / "empty").mkdir()
        load_pngs(tmp_path / "empty")
    # the command line says these as usage errors (exit 2, one line), not tracebacks
    for dirs, words in ((["bad/a.png", "y"], "bad/a.png: not a folder"), (["missing", "y"], "missing: no such folder"),
                        (["upper", "y"], "the folders hold different files")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(["metrics", *(str(tmp_path / d) for d in dirs)])
        assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_demo_table_columns_stay_aligned_with_long_labels():
    rows = [Row(label, None, {"cond": [1, 2]}, 1.0, 0.5, 30.0, 0.9, 0.01, 1) for label in ("short", "F1B0_W4_R0.12_T1_SCMfastD_long")]
    lines = format_table(rows, 1).splitlines()
    assert len({line.index(" 0.50") for line in lines[2:]}) == 1, lines  # the time ratio column, same place on every row
