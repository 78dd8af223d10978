"""Pictures of predictions: class palette, label and depth colours, legends, overlays and titled strips."""

import numpy as np
import pytest

from iedp.visualize import (
    TURBO,
    beside,
    classes_by_area,
    colorize_depth,
    colorize_labels,
    format_share,
    heatmap,
    label_legend,
    legend,
    overlay,
    palette,
    panel,
    srgb_to_lab,
)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def min_distance(colors: np.ndarray) -> float:
    """Smallest CIELAB distance between two of ``colors``, black and white."""
    lab = srgb_to_lab(np.concatenate([colors, [[0, 0, 0], [255, 255, 255]]]))
    distances = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    return float(distances[~np.eye(len(lab), dtype=bool)].min())


def test_srgb_to_lab_matches_the_cie_reference_values():
    lab = srgb_to_lab(np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]))
    expected = [
        [0, 0, 0],
        [100, 0, 0],
        [53.24, 80.09, 67.20],
        [87.73, -86.18, 83.18],
        [32.30, 79.19, -107.86],
    ]
    np.testing.assert_allclose(lab, expected, atol=0.05)  # the 4-digit matrix of IEC 61966-2-1


def test_palette_colours_are_far_apart_stable_and_never_black_or_white():
    colors = palette(150)
    assert colors.dtype == np.uint8 and colors.shape == (150, 3)
    # the first pick is the colour farthest from black and white: pure blue; then green, red
    assert colors[:3].tolist() == [[0, 0, 255], [0, 255, 0], [255, 0, 0]]
    # the 19 synthetic classes: PASCAL VOC's bit scheme got as close as ΔE 8.8 (wall and cabinet), 150: 1.5
    assert min_distance(palette(19)) > 40
    assert min_distance(colors) > 15
    np.testing.assert_array_equal(palette(150), colors)
    np.testing.assert_array_equal(palette(10), colors[:10])  # a prefix: a class keeps its colour
    palette(19)[0] = 7  # a copy: the cached colours cannot be changed through it
    assert palette(19)[0].tolist() == [0, 0, 255]
    assert palette(0).shape == (0, 3)
    with pytest.raises(ValueError, match="num_classes"):
        palette(-1)


def test_colorize_labels_maps_classes_to_palette_and_ignore_to_black():
    colors = palette(5)
    labels = np.array([[0, 4], [255, 2]], dtype=np.uint8)
    rgb = colorize_labels(labels, colors)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == colors[0].tolist()
    assert rgb[0, 1].tolist() == colors[4].tolist()
    assert rgb[1, 1].tolist() == colors[2].tolist()
    assert rgb[1, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="palette has 5"):
        colorize_labels(np.array([[5]]), colors)
    many = palette(300)
    assert colorize_labels(np.array([[255]]), many, ignore_index=None)[0, 0].tolist() == many[255].tolist()


def test_overlay_blends_with_alpha():
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    mask = np.full((2, 3, 3), 200, dtype=np.uint8)
    assert (overlay(image, mask, alpha=0.25) == 125).all()
    np.testing.assert_array_equal(overlay(image, mask, alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image, mask, alpha=1.0), mask)
    with pytest.raises(ValueError, match="shape"):
        overlay(image, mask[:1])


def test_classes_by_area_sorts_largest_first_and_skips_ignore():
    labels = np.array([[3, 3, 3, 1], [1, 255, 255, 0]])
    assert classes_by_area(labels) == [(3, 0.5), (1, 2 / 6), (0, 1 / 6)]
    assert classes_by_area(labels, ignore_index=None) == [(3, 3 / 8), (1, 2 / 8), (255, 2 / 8), (0, 1 / 8)]


def test_format_share_never_shows_zero_percent():
    assert [format_share(f) for f in (1.0, 0.5, 0.123, 0.006, 0.004, 1e-6)] == [
        "100%",
        "50%",
        "12%",
        "1%",
        "<1%",
        "<1%",
    ]


def test_legend_rows_have_their_swatch_colour():
    colors = palette(3)
    image = np.asarray(legend(["wall", "floor", "a much longer class name"], colors, swatch=12, padding=4))
    short = np.asarray(legend(["wall"], colors[:1], swatch=12, padding=4))
    assert image.shape[0] > 3 * 12 and image.shape[1] > short.shape[1]  # three rows, widened by the long name
    swatch_column = image[:, 4 + 6]  # the middle of the swatches
    for color in colors:
        assert (swatch_column == color).all(axis=1).sum() >= 8
    assert (image[0, :] == 255).all()  # white background at the top padding


def test_label_legend_lists_present_classes_in_area_order():
    colors = palette(4)
    labels = np.array([[2, 2, 2], [0, 255, 2]])
    image = np.asarray(label_legend(labels, ["wall", "floor", "bed", "lamp"], colors))
    rows = [i for i in range(image.shape[0]) if not (image[i, 10] == 255).all()]
    first_colors = [tuple(image[r, 10]) for r in rows if tuple(image[r, 10]) != (0, 0, 0)]
    # bed (4 of 5 labelled pixels) above wall; floor and lamp are absent
    assert first_colors[0] == tuple(colors[2]) and first_colors[-1] == tuple(colors[0])
    assert set(first_colors) == {tuple(colors[2]), tuple(colors[0])}


def test_beside_pads_the_shorter_part_with_white():
    image = np.zeros((10, 7, 3), dtype=np.uint8)
    extra = np.full((15, 4, 3), 50, dtype=np.uint8)
    out = np.asarray(beside(image, extra))
    assert out.shape == (15, 11, 3)
    assert (out[:10, :7] == 0).all() and (out[10:, :7] == 255).all() and (out[:, 7:] == 50).all()


def test_colorize_depth_uses_lut_ends_and_blacks_out_invalid():
    depth = np.array([[1.0, 2.0, 3.0], [0.0, np.nan, np.inf]])
    rgb = colorize_depth(depth)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[0, 0].tolist() == TURBO[-1].tolist()  # nearest: the warm end
    assert rgb[0, 2].tolist() == TURBO[0].tolist()  # farthest: the cool end
    assert rgb[0, 1].tolist() == TURBO[128].tolist()
    assert (rgb[1] == 0).all()
    # a fixed range clips values outside it to the ends
    fixed = colorize_depth(np.array([[0.5, 20.0]]), vmin=1.0, vmax=10.0)
    assert fixed[0, 0].tolist() == TURBO[-1].tolist() and fixed[0, 1].tolist() == TURBO[0].tolist()
    # the table itself: no black entry (black is reserved for invalid), blue-ish start, red-ish end
    assert (TURBO.astype(int).sum(axis=1) > 0).all()
    assert TURBO[0, 2] > TURBO[0, 0] and TURBO[-1, 0] > TURBO[-1, 2]


def test_colorize_depth_flat_map_does_not_divide_by_zero():
    rgb = colorize_depth(np.full((2, 2), 3.0))
    assert (rgb == TURBO[-1]).all()


def test_heatmap_spans_the_lut():
    values = np.array([[0.2, 0.7], [0.45, 0.2]])
    rgb = heatmap(values)
    assert rgb[0, 0].tolist() == TURBO[0].tolist() and rgb[0, 1].tolist() == TURBO[-1].tolist()
    assert rgb[1, 0].tolist() == TURBO[128].tolist()
    assert luminance(TURBO[0]) < luminance(TURBO[128])  # the low end is dark, the middle bright


def test_panel_places_images_side_by_side_under_titles():
    first = np.full((20, 30, 3), 10, dtype=np.uint8)
    second = np.full((25, 40, 3), 200, dtype=np.uint8)
    strip = np.asarray(panel([first, second], ["input", "prediction"]))
    title = strip.shape[0] - 25
    assert strip.shape[1] == 30 + 40 and title > 0
    assert (strip[title : title + 20, :30] == 10).all()
    assert (strip[title + 20 :, :30] == 255).all()  # shorter image padded with white
    assert (strip[title:, 30:] == 200).all()
    assert (strip[:title] < 255).any()  # the titles are drawn
    with pytest.raises(ValueError, match="titles"):
        panel([first], ["a", "b"])
    with pytest.raises(ValueError, match="uint8"):
        panel([first.astype(np.float32)], ["a"])


def test_the_demo_seg_row_has_a_legend_of_every_class_drawn_largest_first():
    import torch

    from iedp.demo import seg_row
    from iedp.visualize import beside, colorize_labels, legend, palette, panel

    names = ["wall", "floor", "bed", "lamp"]
    label = np.zeros((8, 8), dtype=np.int64)
    label[6:] = 1  # wall 48 px, floor 16 px
    label[0, 0] = 255  # ignored: no legend entry
    predicted = np.full((8, 8), 1)
    predicted[:2] = 2  # a bed only the prediction sees: floor 48 + 16, wall 47, bed 16
    image = torch.zeros(3, 8, 8)
    row = seg_row({"image": image, "label": torch.from_numpy(label)}, {"iedp": predicted}, names)

    colors = palette(4)
    expected = beside(
        panel(
            [
                np.full((8, 8, 3), 128, dtype=np.uint8),
                colorize_labels(label, colors),
                colorize_labels(predicted, colors, ignore_index=None),
            ],
            ["input", "ground truth", "iedp"],
        ),
        legend(["floor", "wall", "bed"], colors[[1, 0, 2]]),
    )
    assert np.array_equal(np.asarray(row), np.asarray(expected))


def test_the_demo_depth_row_draws_every_map_on_the_ground_truths_range_named_in_its_title():
    import torch

    from iedp.demo import depth_row
    from iedp.visualize import colorize_depth, panel

    depth = np.linspace(0.5, 4.3, 64, dtype=np.float32).reshape(1, 8, 8)
    far = float(depth.max())
    predicted = np.full((8, 8), 6.0, dtype=np.float32)  # beyond the range: drawn at its far end
    row = depth_row({"image": torch.zeros(3, 8, 8), "depth": torch.from_numpy(depth)}, {"vpd": predicted})
    expected = panel(
        [
            np.full((8, 8, 3), 128, dtype=np.uint8),
            colorize_depth(depth[0], 0.0, far),
            colorize_depth(np.full((8, 8), far), 0.0, far),
        ],
        ["input", "ground truth 0-4.3 m", "vpd"],
    )
    assert np.array_equal(np.asarray(row), np.asarray(expected))
