"""PLM pseudo-region mining (clipteacher/pseudo/kmeans.py, fusion.py) and its pictures (vis.py)."""
import warnings

import numpy as np
import pytest

from clipteacher.pseudo.fusion import fuse_regions, pseudo_label_map, pseudo_regions
from clipteacher.pseudo.kmeans import grid_centres, multiscale_kmeans, resize_nearest, spherical_kmeans, token_ignore_mask
from clipteacher.pseudo.vis import (NONE_RGB, TILE_HEIGHT, colorize, legend, overlay, pseudo_label_panel,
                                 region_palette)



def _coords(h, w):
    """h x w x 3 tokens [row, col, 1]: window means are easy to compute by hand."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    return np.stack([yy, xx, np.ones_like(yy)], -1)


def _blobs(h=8, w=8, d=32, noise=0.05, seed=0):
    """Left half along one random direction, right half along another (nearly orthogonal)."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, d))
    truth = np.zeros((h, w), dtype=np.int64)
    truth[:, w // 2:] = 1
    tokens = np.where(truth[..., None] == 0, a, b) + noise * rng.standard_normal((h, w, d))
    return tokens.astype(np.float32), truth


def _same_partition(pred, truth):
    """pred and truth split the same cells into the same groups (ids may differ)."""
    pairs = set(zip(pred.ravel().tolist(), truth.ravel().tolist()))
    return len(pairs) == len(np.unique(pred)) == len(np.unique(truth))


# ---------------------------------------------------------------- ignore mask
def test_token_ignore_mask_fraction_and_padding():
    label = np.zeros((8, 8), dtype=np.int64)
    label[:4, :4] = 255  # token (0, 0) of a 2 x 2 grid fully ignored
    label[:4, 4:6] = 255  # token (0, 1) exactly half ignored
    label[4:, :1] = 255  # token (1, 0) a quarter ignored
    mask = token_ignore_mask(label, (2, 2))
    assert mask.tolist() == [[True, True], [False, False]]
    assert token_ignore_mask(label, (2, 2), fraction=0.6).tolist() == [[True, False], [False, False]]
    # Padding is not 'ignored' even when labelled 255.
    valid = np.ones((8, 8), dtype=bool)
    valid[:, 4:6] = False  # the half-ignored columns of token (0, 1) are padding
    assert token_ignore_mask(label, (2, 2), valid=valid).tolist() == [[True, False], [False, False]]


def test_token_ignore_mask_non_divisible_and_upsampled():
    label = np.zeros((10, 7), dtype=np.int64)
    label[:3] = 255  # rows 0-2 = first of 3 cells (cells start at 0, 3, 6)
    mask = token_ignore_mask(label, (3, 2))
    assert mask.tolist() == [[True, True], [False, False], [False, False]]
    # A grid finer than the label: every token still gets a value, nearest-style.
    big = token_ignore_mask(np.full((3, 3), 255), (8, 8))
    assert big.shape == (8, 8) and big.all()


def test_resize_nearest_matches_ignore_mask_geometry():
    # The pixels a token's pseudo label lands on are exactly the pixels that decided whether it was ignored.
    h, w, H, W = 3, 4, 10, 13
    ids = np.arange(h * w).reshape(h, w)
    up = resize_nearest(ids, (H, W))
    for t in range(h * w):
        label = np.where(up == t, 255, 0)
        expected = (ids == t)
        assert np.array_equal(token_ignore_mask(label, (h, w), fraction=1.0), expected)


# ---------------------------------------------------------------- grid init
def test_grid_init_window_means():
    tokens = _coords(7, 9)  # k=3 -> strides 2 and 3; row 6 falls in no window
    c = grid_centres(tokens, 3, "grid")
    assert c.shape == (9, 3)
    for m in range(3):
        for n in range(3):
            np.testing.assert_allclose(c[m * 3 + n], [2 * m + 0.5, 3 * n + 1, 1])


def test_stride_init_and_mask():
    tokens = _coords(7, 9)
    c = grid_centres(tokens, 3, "stride")  # ceil(7/3) x ceil(9/3) windows of side 3
    assert c.shape == (9, 3)
    np.testing.assert_allclose(c[6], [6, 1, 1])  # last, partial window row holds only row 6
    mask = np.ones((7, 9), dtype=bool)
    mask[:2, :3] = False  # empties grid window (0, 0)
    mask[2, 3] = False  # one token out of window (1, 1)
    c = grid_centres(tokens, 3, "grid", mask)
    assert c.shape == (8, 3)
    np.testing.assert_allclose(c[3], [(2 * 2 + 3 * 3) / 5, (4 + 5 + 3 + 4 + 5) / 5, 1], rtol=1e-6)


def test_grid_smaller_than_window():
    tokens = _coords(2, 2)
    assert grid_centres(tokens, 7, "grid").shape == (4, 3)  # strides clamp to 1: one centre per token
    assert grid_centres(tokens, 7, "stride").shape == (1, 3)
    assert grid_centres(tokens, 7, "grid", np.zeros((2, 2), bool)).shape == (0, 3)
    with pytest.raises(ValueError, match="unknown init"):
        grid_centres(tokens, 3, "slic")


# ---------------------------------------------------------------- K-Means
def test_spherical_kmeans_recovers_blobs_and_drops_empty():
    tokens, truth = _blobs()
    x = tokens.reshape(-1, tokens.shape[-1])
    centres = np.concatenate([x[:1], x[-1:], np.zeros((1, x.shape[1]))])  # third centre never wins
    labels, c = spherical_kmeans(x, centres)
    assert labels.tolist() == truth.ravel().tolist()
    assert c.shape == (2, x.shape[1])
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, rtol=1e-5)


def test_clustering_touches_only_masked_tokens():
    tokens, truth = _blobs(seed=1)
    mask = np.zeros(truth.shape, dtype=bool)
    mask[2:6, 1:7] = True
    maps = multiscale_kmeans(tokens, mask)
    assert len(maps) == 2
    for m in maps:
        assert (m[~mask] == -1).all() and (m[mask] >= 0).all()
    # Whatever sits outside the mask cannot change the clustering inside it.
    noisy = tokens.copy()
    noisy[~mask] = 100 * np.random.default_rng(2).standard_normal(((~mask).sum(), tokens.shape[-1]))
    for a, b in zip(maps, multiscale_kmeans(noisy, mask)):
        assert np.array_equal(a, b)


def test_pseudo_regions_recover_two_blobs():
    tokens, truth = _blobs(h=16, w=16, noise=0.3, seed=3)
    for init in ("grid", "stride"):
        maps, fused = pseudo_regions(tokens, np.ones(truth.shape, bool), init=init)
        assert maps[1].max() + 1 > 2  # 7x7 seeding over-fragments on its own ...
        assert fused.max() == 1 and _same_partition(fused, truth)  # ... fusion repairs it


# ---------------------------------------------------------------- fusion
def _three_groups(d=16):
    """4 x 6 tokens: cols 0-1 along a, cols 2-3 along a (slightly tilted), cols 4-5 along b."""
    rng = np.random.default_rng(0)
    a, b = np.eye(d)[0], np.eye(d)[1]
    tilted = a + 0.1 * np.eye(d)[2]
    group = np.repeat(np.arange(3)[None, :], 2, axis=1).repeat(4, axis=0)  # 4 x 6 in {0,1,2}
    tokens = np.stack([a, tilted, b])[group] + 0.01 * rng.standard_normal((4, 6, d))
    return tokens, group


def test_fusion_centroid_merges_similar_keeps_different():
    tokens, group = _three_groups()
    fused = fuse_regions(tokens, [group], threshold=0.8, criterion="centroid")
    assert fused.max() == 1
    assert (fused[group == 0] == 0).all() and (fused[group == 1] == 0).all()  # merged, larger first
    assert (fused[group == 2] == 1).all()
    # A threshold above their cosine keeps all three apart.
    assert fuse_regions(tokens, [group], threshold=0.999, criterion="centroid").max() == 2


def test_fusion_overlap_merges_only_across_scales():
    tokens, group = _three_groups()
    # One scale: disjoint masks never overlap, so overlap-NMS cannot merge fragments (why centroid is the default).
    assert fuse_regions(tokens, [group], criterion="overlap").max() == 2
    coarse = np.where(group == 2, 1, 0)  # a coarse scale that already joins groups 0 and 1
    fused = fuse_regions(tokens, [coarse, group], criterion="overlap")
    assert fused.max() == 1 and _same_partition(fused, coarse)
    with pytest.raises(ValueError, match="unknown criterion"):
        fuse_regions(tokens, [group], criterion="iou")


def test_fusion_resolves_cross_scale_overlap_by_centroid():
    tokens, truth = _blobs(h=4, w=8, noise=0.0)
    everything = np.zeros(truth.shape, dtype=np.int64)  # one coarse mask: centroid between a and b
    fused = fuse_regions(tokens, [everything, truth], threshold=0.8)
    # The coarse region is not merged (cos ~0.7) and loses every token to the closer half.
    assert fused.max() == 1 and _same_partition(fused, truth)


def test_fusion_min_tokens_and_area_order():
    tokens, group = _three_groups()
    tokens[0, 4:] = np.eye(tokens.shape[-1])[3]  # a 2-token fragment unlike anything else
    scale = group.copy()
    scale[0, 4:] = 3
    fused = fuse_regions(tokens, [scale], threshold=0.999, min_tokens=3)
    sizes = np.bincount(fused[fused >= 0])
    assert (fused[0, 4:] == -1).all()  # too small and covered by no other region
    assert list(sizes) == sorted(sizes, reverse=True) and len(sizes) == 3


# ---------------------------------------------------------------- pseudo labels
def test_pseudo_label_map_never_overwrites_seen():
    label = np.full((8, 8), 255, dtype=np.int64)
    label[:, :2] = 1  # seen class 1 in the first two columns
    label[0, 0] = 0
    fused = np.array([[0, 0], [1, -1]])
    out = pseudo_label_map(label, fused, num_seen=5)
    assert out.dtype == np.int64
    assert (out[:, :2] == label[:, :2]).all()  # seen pixels untouched, even under a region
    assert (out[:4, 2:] == 5).all() and (out[4:, 2:4] == 6).all()  # region r -> num_seen + r
    assert (out[4:, 4:] == 255).all()  # no region: stays ignore
    valid = np.ones((8, 8), dtype=bool)
    valid[:, 7] = False
    assert (pseudo_label_map(label, fused, 5, valid=valid)[:, 7] == 255).all()


# ---------------------------------------------------------------- degenerate input
@pytest.fixture
def strict():
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        yield


def test_no_masked_tokens(strict):
    tokens, _ = _blobs()
    maps, fused = pseudo_regions(tokens, np.zeros((8, 8), bool))
    assert all((m == -1).all() for m in maps) and (fused == -1).all()
    assert (pseudo_label_map(np.full((16, 16), 255), fused, 3) == 255).all()


def test_all_masked_small_grid_identical_and_zero_tokens(strict):
    tokens, truth = _blobs()
    maps, fused = pseudo_regions(tokens, np.ones((8, 8), bool))
    assert all((m >= 0).all() for m in maps) and _same_partition(fused, truth)

    maps, fused = pseudo_regions(np.random.default_rng(0).standard_normal((2, 2, 8)), np.ones((2, 2), bool))
    assert maps[1].shape == (2, 2) and (fused >= 0).all()  # 2 x 2 grid with k = 7

    same = np.ones((5, 5, 8))
    maps, fused = pseudo_regions(same, np.ones((5, 5), bool))
    assert all((m == 0).all() for m in maps) and (fused == 0).all()

    zero = np.zeros((5, 5, 8))
    for criterion in ("centroid", "overlap"):
        maps, fused = pseudo_regions(zero, np.ones((5, 5), bool), criterion=criterion)
        assert (fused == 0).all()  # one region, no NaN
    labels, c = spherical_kmeans(np.zeros((4, 3)), np.zeros((2, 3)))
    assert np.isfinite(c).all() and labels.tolist() == [0, 0, 0, 0]
    assert spherical_kmeans(np.zeros((0, 3)), np.ones((2, 3)))[1].shape == (0, 3)


# ---------------------------------------------------------------- pictures
def test_colorize_overlay_legend():
    pal = region_palette(12)
    assert pal.shape == (12, 3) and pal.dtype == np.uint8 and len({tuple(c) for c in pal}) == 12
    ids = np.array([[0, 0, 1], [-1, 1, 1]])
    rgb = colorize(ids)
    assert rgb.shape == (2, 3, 3) and tuple(rgb[1, 0]) == NONE_RGB and tuple(rgb[0, 2]) == tuple(region_palette(2)[1])
    image = np.full((4, 6, 3), 100, dtype=np.uint8)
    over = overlay(image, ids, alpha=0.5)
    assert over.shape == image.shape and (over[2:, :2] == 100).all()  # -1 cells untouched
    assert not (over[:2, :2] == 100).all()
    entries = legend(ids, names=["cat", "chair"])
    assert [e[0] for e in entries] == ["chair", "cat"]
    assert entries[0][1] == pytest.approx(3 / 6) and entries[1][1] == pytest.approx(2 / 6)


def test_colorize_wraps_and_marks_none_with_and_without_the_fast_path():
    pal = region_palette(3)
    inside = np.array([[2, 0], [1, 1]])  # ids within the palette (the app's labels)
    np.testing.assert_array_equal(colorize(inside, pal), np.array([[pal[2], pal[0]], [pal[1], pal[1]]]))
    beyond = np.array([[0, 4, -1]])  # 4 wraps to 1; -1 is "none"
    np.testing.assert_array_equal(colorize(beyond, pal), np.array([[pal[0], pal[1], NONE_RGB]], np.uint8))


def test_panel_renders():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    label = np.zeros((60, 90), dtype=np.int64)
    label[20:, 30:] = 255
    tokens, _ = _blobs(h=6, w=9)
    mask = token_ignore_mask(label, (6, 9))
    maps, fused = pseudo_regions(tokens, mask)
    panel = pseudo_label_panel(image, maps, fused, (3, 7), label=label)
    tile_w = round(90 * TILE_HEIGHT / 60)
    assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[2] == 3
    assert panel.shape[0] > TILE_HEIGHT and panel.shape[1] > 5 * tile_w  # image, 2 scales, fused, overlay
    with pytest.raises(ValueError, match="windows"):
        pseudo_label_panel(image, maps, fused, (3,))


def test_region_defaults_are_the_training_defaults():
    """The app calls regions_for_image with its defaults; they must be the training config's."""
    import inspect

    from clipteacher.pseudo import regions_for_image
    from clipteacher.config import PLMConfig

    params = inspect.signature(regions_for_image).parameters
    for name, value in PLMConfig().region_kwargs().items():
        assert params[name].default == value, name
