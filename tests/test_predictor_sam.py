"""Box-prompted SAM: strict loading of official-layout checkpoints, type inference, input checks, batched prompts.

The checkpoint is a randomly initialised ViT-B saved as the official files are (``torch.save(state_dict)``, about
375 MB), written once per module. Mask content from random weights means nothing, so the tests check shapes, dtypes,
what ran, and agreement with segment_anything's own single-box path.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from densevision.errors import CheckpointError, ConfigError, InvalidRegionError
from densevision.predictors.sam import SamBoxPredictor, _unwrap, infer_sam_model_type, sam_from_state_dict

segment_anything = pytest.importorskip("segment_anything")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    state = segment_anything.sam_model_registry["vit_b"]().state_dict()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return SamBoxPredictor.from_checkpoint(checkpoint[0])


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_loads_the_official_layout_strictly_with_equal_values(predictor, checkpoint):
    _, state = checkpoint
    loaded = predictor.model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert predictor.device == torch.device("cpu")
    assert not predictor.model.training


def test_infers_vit_b_and_the_larger_variants_from_width_and_depth(checkpoint):
    _, state = checkpoint
    assert infer_sam_model_type(state) == "vit_b"
    for name, width, depth in (("vit_l", 1024, 24), ("vit_h", 1280, 32)):
        fake = {"image_encoder.patch_embed.proj.weight": torch.zeros(width, 3, 16, 16)}
        fake.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(width) for i in range(depth)})
        assert infer_sam_model_type(fake) == name


def test_an_encoder_matching_no_variant_is_refused():
    fake = {"image_encoder.patch_embed.proj.weight": torch.zeros(512, 3, 16, 16)}
    fake.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(512) for i in range(6)})
    with pytest.raises(CheckpointError, match=r"512 wide with 6 blocks, which matches none of vit_b"):
        infer_sam_model_type(fake)
    with pytest.raises(CheckpointError, match="not a Segment Anything checkpoint"):
        infer_sam_model_type({"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)})


def test_missing_unexpected_and_misshaped_keys_are_named(checkpoint):
    _, state = checkpoint
    bad = dict(state)
    del bad["mask_decoder.iou_prediction_head.layers.2.bias"]
    del bad["image_encoder.blocks.11.mlp.lin2.weight"]
    bad["mask_decoder.extra_head.weight"] = torch.zeros(3)
    bad["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 128)
    with pytest.raises(CheckpointError) as err:
        sam_from_state_dict(bad)
    msg = str(err.value)
    assert "does not fit SAM vit_b" in msg
    assert "2 missing keys" in msg and "mask_decoder.iou_prediction_head.layers.2.bias" in msg
    assert "image_encoder.blocks.11.mlp.lin2.weight" in msg
    assert "1 unexpected keys: mask_decoder.extra_head.weight" in msg
    assert "prompt_encoder.no_mask_embed.weight (1, 128) (model (1, 256))" in msg


def test_a_type_the_checkpoint_does_not_hold_is_refused_before_building(checkpoint):
    path, _ = checkpoint
    with pytest.raises(CheckpointError, match=r"sam_vit_b_random.pth: .*holds a SAM vit_b but vit_l was asked for"):
        SamBoxPredictor.from_checkpoint(path, "vit_l")
    with pytest.raises(ConfigError, match="unknown SAM model type 'vit_s'"):
        SamBoxPredictor.from_checkpoint(path, "vit_s")


def test_a_truncated_file_is_refused(checkpoint, tmp_path):
    path, _ = checkpoint
    cut = tmp_path / "cut.pth"
    with open(path, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable torch checkpoint"):
        SamBoxPredictor.from_checkpoint(cut)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        SamBoxPredictor.from_checkpoint(tmp_path / "absent.pth")


def test_nested_state_dicts_are_unwrapped_and_other_objects_refused():
    sd = {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    assert _unwrap({"state_dict": sd, "meta": {"epoch": 3}}).keys() == sd.keys()
    assert _unwrap({"model": sd}).keys() == sd.keys()
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        _unwrap({"epoch": 3, "weights": [torch.zeros(1)]})
    with pytest.raises(CheckpointError, match="holds a list"):
        _unwrap([1, 2])


def test_no_boxes_returns_empty_arrays_without_running_the_encoder(predictor):
    calls = []
    hook = predictor.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        masks, scores = predictor(_image(37, 53), np.zeros((0, 4)))
        masks2, _ = predictor(_image(37, 53), [])
    finally:
        hook.remove()
    assert calls == []
    assert masks.shape == masks2.shape == (0, 37, 53) and masks.dtype == bool
    assert scores.shape == (0,) and scores.dtype == np.float32


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((32, 32, 3), np.float32), "uint8 RGB image, got a float32 array of shape"),
        (np.zeros((32, 32, 4), np.uint8), r"got a uint8 array of shape \(32, 32, 4\)"),
        (np.zeros((32, 32), np.uint8), "H x W x 3 uint8"),
        ([[0, 0, 0]], "got a list"),
    ],
)
def test_images_that_are_not_uint8_rgb_are_refused(predictor, image, match):
    with pytest.raises(ConfigError, match=match):
        predictor(image, np.array([[0, 0, 4, 4]]))


@pytest.mark.parametrize(
    "box",
    [[-1, 0, 10, 10], [0, 0, 54, 10], [0, 0, 10, 38], [10, 0, 5, 10], [0, 0, np.nan, 10]],
)
def test_boxes_outside_the_image_or_reversed_are_refused(predictor, box):
    with pytest.raises(InvalidRegionError, match=r"box 1 = .* inside the 53 x 37 image"):
        predictor(_image(37, 53), np.array([[0, 0, 53, 37], box], dtype=np.float64))
    with pytest.raises(InvalidRegionError, match="N x 4"):
        predictor(_image(37, 53), np.zeros((2, 5)))


class _CheapEncoder(torch.nn.Module):
    """Stands in for the ViT: a fixed function of the image with the real embedding's shape (1 x 256 x 64 x 64)."""

    img_size = 1024

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.proj = torch.nn.Conv2d(3, 256, 1)
        self.calls = 0
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.batches.append(len(x))
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 64))


def test_batched_chunks_agree_with_segment_anythings_single_box_path(predictor):
    """Real prompt encoder, decoder and mask upsampling on a 75 x 90 window; boxes decoded 2 at a time (2 + 1)."""
    model = copy.deepcopy(predictor.model)
    model.image_encoder = _CheapEncoder()
    ours = SamBoxPredictor(model, box_batch=2)
    image = _image(75, 90, seed=3)
    boxes = np.array([[3.5, 4, 40, 50], [20, 10, 90, 75], [60, 30, 70.25, 41]])
    masks, scores = ours(image, boxes)
    assert model.image_encoder.calls == 1  # one encoder pass for the whole window
    assert masks.shape == (3, 75, 90) and masks.dtype == bool
    assert scores.shape == (3,) and scores.dtype == np.float32

    ref = segment_anything.SamPredictor(model)
    ref.set_image(image)
    for k, box in enumerate(boxes):
        m, s, _ = ref.predict(box=box, multimask_output=False)
        assert m.shape == (1, 75, 90)
        np.testing.assert_allclose(scores[k], s[0], rtol=1e-4, atol=1e-5)
        assert (masks[k] == m[0]).mean() > 0.999
    assert masks.any(axis=(1, 2)).any()  # the thresholded masks are not all empty: the comparison means something


def test_windows_in_one_encoder_pass_give_what_each_window_gives_alone(predictor):
    """Three windows of different sizes, one without boxes (not encoded), boxes decoded 2 at a time across windows:
    the same masks and scores as one window per call."""
    model = copy.deepcopy(predictor.model)
    model.image_encoder = _CheapEncoder()
    ours = SamBoxPredictor(model, box_batch=2)
    images = [_image(75, 90, seed=3), _image(64, 64, seed=4), _image(120, 50, seed=5)]
    boxes = [np.array([[3.5, 4, 40, 50], [20, 10, 90, 75], [60, 30, 70.25, 41]]), np.zeros((0, 4)),
             np.array([[0, 0, 50, 120], [10, 60, 30, 100]])]  # fmt: skip
    together = ours.predict_windows(images, boxes)
    assert model.image_encoder.batches == [2]  # the two windows with boxes, in one pass
    for image, b, (masks, scores) in zip(images, boxes, together, strict=True):
        alone_masks, alone_scores = ours(image, b)
        assert masks.shape == (len(b), *image.shape[:2]) and masks.dtype == bool and scores.dtype == np.float32
        np.testing.assert_allclose(scores, alone_scores, rtol=1e-4, atol=1e-5)
        assert (masks == alone_masks).mean() > 0.999 if len(b) else masks.size == 0
    assert model.image_encoder.batches == [2, 1, 1]  # the window without boxes was never encoded
    assert all(m.any(axis=(1, 2)).any() for m, _ in (together[0], together[2]))
    with pytest.raises(ConfigError, match="one per window"):
        ours.predict_windows(images, boxes[:2])


@pytest.mark.slow
def test_end_to_end_on_cpu_with_the_real_encoder(predictor):
    """ViT-B encoder (a 1024 x 1024 pass) on a 80 x 96 window with two boxes: once, and with the masks and scores
    segment_anything's own SamPredictor gives for each box on that window (its own encoder pass); about 30-120 s
    on 2 CPU cores."""
    calls = []
    image = _image(80, 96)
    boxes = np.array([[5, 5, 40, 50], [30, 20, 96, 80]])
    hook = predictor.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        masks, scores = predictor(image, boxes)
    finally:
        hook.remove()
    assert calls == [1]
    assert masks.shape == (2, 80, 96) and masks.dtype == bool
    assert scores.shape == (2,) and scores.dtype == np.float32 and np.isfinite(scores).all()

    ref = segment_anything.SamPredictor(predictor.model)
    ref.set_image(image, image_format="RGB")
    for k, box in enumerate(boxes):
        m, s, _ = ref.predict(box=box, multimask_output=False)
        np.testing.assert_allclose(scores[k], s[0], rtol=1e-4, atol=1e-5)
        assert (masks[k] != m[0]).sum() <= 2, k  # batched vs one-by-one decoding: float noise at the threshold
        assert 0 < m[0].sum() < m[0].size, k  # neither empty nor everything: the comparison means something
    assert (masks[0] != masks[1]).any()  # the boxes prompt different masks

    # Two windows in one encoder pass: the first gives what it gave alone (a batch of 2 may round differently).
    batches = []
    hook = predictor.model.image_encoder.register_forward_hook(lambda _m, args, _o: batches.append(len(args[0])))
    try:
        (together, together_scores), (other, _) = predictor.predict_windows(
            [image, _image(64, 64, 1)], [boxes, boxes[:1] / 2]
        )
    finally:
        hook.remove()
    assert batches == [2]
    np.testing.assert_allclose(together_scores, scores, rtol=1e-4, atol=1e-5)
    assert (together != masks).sum() <= 4 and other.shape == (1, 64, 64)
