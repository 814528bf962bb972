"""The METHOD.md display mapping against hand values: jet, the sigmoid scaling, bilinear upsampling, the blend."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest

from pipeline.viz.display import display_heat, jet, overlay


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-5 * x)) - 0.5


def test_jet_is_matplotlibs_table():
    values = np.array([0.0, 0.5, 1.0, 0.125, -1.0, 2.0])
    colours = jet(values)
    table = matplotlib.colormaps["jet"]
    expected = [np.array(table(float(v))[:3]) * 255 for v in np.clip(values, 0, 1)]
    np.testing.assert_allclose(colours, expected, atol=1e-3)
    # 0.5 is entry 128 of the 256-entry table, at 128/255: red rises on [0.35, 0.66], blue falls on [0.34, 0.65]
    ramp = (128 / 255 - 0.35) / (0.66 - 0.35) * 255
    fall = (1 - (128 / 255 - 0.34) / (0.65 - 0.34)) * 255
    rise = (32 / 255 - 0.125) / (0.375 - 0.125) * 255  # 0.125 is entry 32: green starts rising at 0.125
    hand = [[0, 0, 127.5], [ramp, 255, fall], [127.5, 0, 0], [0, rise, 255], [0, 0, 127.5], [127.5, 0, 0]]
    np.testing.assert_allclose(colours, hand, atol=1e-3)


def test_heat_is_the_sigmoid_of_d_over_max_final_then_min_max():
    maps = np.array([[[0.0, 1.0, 2.0]], [[0.5, 1.0, 2.0]]], dtype=np.float32)  # D_0, D_1 on a 1x3 grid; max D_L = 2
    heat, mask = display_heat(maps, (3, 1))
    assert heat.shape == (2, 1, 3) and mask.all()
    # D_0 / 2 = [0, .5, 1] and D_1 / 2 = [.25, .5, 1]; then sigmoid(5x) - 0.5, min-max to [0, 255]
    first = [_sig(v) for v in (0, 0.5, 1)]
    second = [_sig(v) for v in (0.25, 0.5, 1)]
    for got, values in zip(heat, (first, second), strict=True):
        expected = [(v - min(values)) / (max(values) - min(values)) * 255 for v in values]
        np.testing.assert_allclose(got[0], expected, rtol=1e-5)
    assert heat[1, 0, 1] == pytest.approx((_sig(0.5) - _sig(0.25)) / (_sig(1) - _sig(0.25)) * 255, rel=1e-5)


def test_reference_changes_the_shape_only_through_the_sigmoid():
    maps = np.array([[[0.0, 1.0, 2.0]]], dtype=np.float32)
    heat, _ = display_heat(maps, (3, 1), reference=4.0)  # x = [0, .25, .5]
    assert heat[0, 0, 1] == pytest.approx(_sig(0.25) / _sig(0.5) * 255, rel=1e-5)


def test_upsampling_is_bilinear_with_half_pixel_centres():
    maps = np.array([[[0.0, 1.0]]], dtype=np.float32)  # heat [0, 255] after the mapping
    heat, _ = display_heat(maps, (4, 1))
    np.testing.assert_allclose(heat[0, 0], [0, 63.75, 191.25, 255], atol=1e-3)


def test_all_zero_maps_give_zero_heat_not_nan():
    heat, _ = display_heat(np.zeros((3, 2, 2), dtype=np.float32), (5, 4))
    assert np.array_equal(heat, np.zeros((3, 4, 5)))


def test_overlay_blends_point4_jet_with_point8_image_and_clips():
    maps = np.array([[[0.0, 1.0, 0.2]]], dtype=np.float32)  # heat [0, 255, 255 * 0.4684]
    image = np.array([[[100, 100, 100], [100, 100, 100], [255, 255, 255]]], dtype=np.uint8)
    result = overlay(maps, image)
    assert result.dtype == np.uint8 and result.shape == (1, 1, 3, 3)
    assert result[0, 0, 0].tolist() == [80, 80, 131]  # jet(0) = (0, 0, 127.5): 0.8 * 100 + 0.4 * 127.5 = 131
    assert result[0, 0, 1].tolist() == [131, 80, 80]  # jet(1) = (127.5, 0, 0)
    red = matplotlib.colormaps["jet"](_sig(0.2) / _sig(1))[0] * 255  # jet(0.4684): entry 119, (96.0, 255, 151.1)
    assert red == pytest.approx((119 / 255 - 0.35) / (0.66 - 0.35) * 255)
    assert result[0, 0, 2].tolist() == [round(0.4 * red + 0.8 * 255), 255, 255]  # 0.4 * 255 + 0.8 * 255 clipped


def test_window_places_the_maps_and_dims_the_outside():
    maps = np.zeros((2, 2, 2), dtype=np.float32)
    maps[:, 0, 0] = [1.0, 2.0]  # hot top-left patch
    image = np.full((20, 40, 3), 200, dtype=np.uint8)
    heat, mask = display_heat(maps, (40, 20), window=(10, 0, 30, 20))
    assert mask[:, 10:30].all() and not mask[:, :10].any() and not mask[:, 30:].any()
    assert np.unravel_index(heat[1].argmax(), heat[1].shape) == (0, 10)  # the window's top-left corner
    assert (heat[:, :, :10] == 0).all() and heat[1, 15:, 25:30].max() == 0
    result = overlay(maps, image, window=(10, 0, 30, 20))
    assert (result[:, :, :10] == 80).all()  # outside: 0.4 * 200, no heat colour


def test_window_reaching_outside_the_picture_is_cut():
    maps = np.zeros((1, 2, 2), dtype=np.float32)
    maps[0, 0, 0] = 1.0
    heat, mask = display_heat(maps, (20, 10), window=(-20, 0, 20, 10))  # a 40-pixel-wide window, half outside
    assert mask.all()
    # the picture shows the window's right half: the hot left column of patches lies outside
    full, _ = display_heat(maps, (40, 10))
    np.testing.assert_allclose(heat[0], full[0][:, 20:])
