"""CAM normalisation, multi-scale + flip inference and label maps of core/cams.py."""

import numpy as np
import pytest
import torch
from torch import nn

from core.cam.cams import multiscale_cams, multiscale_cams_batch, normalize_cams, resize_bicubic
from core.labels import cams_to_label_map, label_map_with_ignore
from core.models import Classifier

torch.set_num_threads(2)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # ImageNet statistics, as in the reference
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class StridedCAM(nn.Module):
    """Stand-in classifier: a 3x3 conv (not flip-symmetric) then stride-4 average pooling."""

    def __init__(self, num_classes: int = 3, stride: int = 4) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AvgPool2d(stride, ceil_mode=True)
        self.classifier = nn.Conv2d(8, num_classes, 1, bias=False)

    def forward(self, x, with_cam=False):
        maps = self.classifier(self.pool(torch.relu(self.features(x))))
        logits = maps.mean(dim=(2, 3))
        return (logits, maps) if with_cam else logits


class PixelCAM(nn.Module):
    """Per-pixel 1x1 conv: class 0 = red channel, class 1 = minus red, class 2 = green."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.classifier.weight.zero_()
            self.classifier.weight[0, 0] = 1.0
            self.classifier.weight[1, 0] = -1.0
            self.classifier.weight[2, 1] = 1.0

    def forward(self, x, with_cam=False):
        maps = self.classifier(x)
        return (maps.mean(dim=(2, 3)), maps) if with_cam else maps.mean(dim=(2, 3))


def _image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image[: height // 2, : width // 3, 0] = 255  # a bright red block so class 0 has a clear peak
    return image


@pytest.fixture(scope="module")
def strided_model():
    torch.manual_seed(0)
    return StridedCAM().eval()


def test_normalize_cams_per_channel_max_and_range():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 3, 5, 6, generator=g) * 4
    raw[1, 2] = -torch.rand(5, 6, generator=g)  # an all-negative channel
    cams = normalize_cams(raw)
    assert cams.shape == raw.shape
    assert cams.min() >= 0 and cams.max() < 1
    peaks = cams.amax(dim=(2, 3))
    assert torch.allclose(peaks[[0, 0, 0, 1, 1], [0, 1, 2, 0, 1]], torch.ones(5), atol=1e-4)
    assert peaks[1, 2] == 0
    expected = torch.relu(raw[0, 1]) / (torch.relu(raw[0, 1]).max() + 1e-5)
    assert torch.allclose(cams[0, 1], expected)


def test_resize_bicubic_uses_python_rounding():
    image = _image(37, 50)
    assert resize_bicubic(image, 0.5).shape == (18, 25, 3)  # round(18.5) = 18, as in the reference
    assert resize_bicubic(image, 1.5).shape == (56, 75, 3)  # round(55.5) = 56
    assert np.array_equal(resize_bicubic(image, 1.0), image)


def test_multiscale_cams_shapes_ranges_and_keys(strided_model):
    image = _image(37, 50)
    keys, cam, hr_cam = multiscale_cams(strided_model, image, device="cpu")
    assert keys.dtype == np.int64 and keys.tolist() == [1, 2, 3]
    assert cam.dtype == np.float32 and cam.shape == (3, 10, 13)  # ceil(37/4), ceil(50/4)
    assert hr_cam.dtype == np.float32 and hr_cam.shape == (3, 37, 50)
    for planes in (cam, hr_cam):
        assert planes.min() >= 0 and planes.max() < 1
        peaks = planes.reshape(3, -1).max(axis=1)
        assert np.all((peaks == 0) | (np.abs(peaks - 1) < 1e-3))
    assert (hr_cam.reshape(3, -1).max(axis=1) > 0).any()

    sub_keys, sub_cam, sub_hr = multiscale_cams(strided_model, image, device="cpu", keys=[3, 1])
    assert sub_keys.tolist() == [3, 1]
    assert np.allclose(sub_cam, cam[[2, 0]], atol=1e-6)
    assert np.allclose(sub_hr, hr_cam[[2, 0]], atol=1e-6)

    empty_keys, empty_cam, empty_hr = multiscale_cams(strided_model, image, device="cpu", keys=[])
    assert empty_keys.size == 0 and empty_cam.shape == (0, 10, 13) and empty_hr.shape == (0, 37, 50)
    with pytest.raises(ValueError, match="only 3 classes"):
        multiscale_cams(strided_model, image, device="cpu", keys=[4])


def test_multiscale_cams_are_flip_equivariant(strided_model):
    # H, W multiples of 16: otherwise the resize-to-16k-then-crop step of hr_cam is anchored at the top-left corner
    image = _image(48, 64, seed=3)
    flipped = np.ascontiguousarray(image[:, ::-1])
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        maps = strided_model(batch, with_cam=True)[1]
        maps_of_mirror = strided_model(batch.flip(-1), with_cam=True)[1].flip(-1)
    assert not torch.allclose(maps, maps_of_mirror, atol=1e-3)  # the model alone is not flip-symmetric

    _, cam, hr_cam = multiscale_cams(strided_model, image, device="cpu")
    _, cam_f, hr_cam_f = multiscale_cams(strided_model, flipped, device="cpu")
    assert np.allclose(hr_cam_f[:, :, ::-1], hr_cam, atol=1e-5)
    assert np.allclose(cam_f[:, :, ::-1], cam, atol=1e-5)


def test_multiscale_cams_single_scale_hand_case():
    image = _image(32, 48, seed=5)
    keys, cam, hr_cam = multiscale_cams(PixelCAM().eval(), image, scales=(1.0,), device="cpu", keys=[1, 3])
    assert keys.tolist() == [1, 3]
    normalized = (image.astype(np.float32) / 255 - MEAN) / STD
    # per-pixel model, scale 1, size a multiple of 16: hr_cam = 2 * ReLU(channel) / max, no resizing involved
    for plane, channel in zip(hr_cam, (0, 1), strict=True):
        expected = 2 * np.maximum(normalized[..., channel], 0)
        expected = expected / (expected.max() + 1e-5)
        assert np.allclose(plane, expected, atol=1e-5)
    # the stride-4 cam of a 32x48 image is an exact 4x bilinear downsampling: each cell averages a 2x2 centre
    red = np.maximum(normalized[..., 0], 0)
    centre = (red[1::4, 1::4] + red[1::4, 2::4] + red[2::4, 1::4] + red[2::4, 2::4]) / 4
    assert np.allclose(cam[0], centre / (centre.max() + 1e-5 / 2), atol=1e-5)


def test_hr_cam_is_resized_to_a_multiple_of_16_then_cropped():
    image = _image(40, 36, seed=6)
    _, _, hr_cam = multiscale_cams(PixelCAM().eval(), image, scales=(1.0,), device="cpu", keys=[1])
    normalized = (image.astype(np.float32) / 255 - MEAN) / STD
    red = torch.from_numpy(2 * np.maximum(normalized[..., 0], 0))[None, None]
    stretched = torch.nn.functional.interpolate(red, size=(48, 48), mode="bilinear", align_corners=False)
    expected = stretched[0, 0, :40, :36].numpy()  # top-left crop of the 48x48 resize, as the reference does
    assert np.allclose(hr_cam[0], expected / (expected.max() + 1e-5), atol=1e-5)
    assert not np.allclose(hr_cam[0], red[0, 0].numpy() / red.max().item(), atol=1e-2)


def test_multiscale_cams_mixed_precision_is_close(strided_model):
    image = _image(32, 32, seed=1)
    _, _, hr_full = multiscale_cams(strided_model, image, scales=(1.0, 0.5), device="cpu")
    _, _, hr_amp = multiscale_cams(
        strided_model, image, scales=(1.0, 0.5), device="cpu", amp_dtype=torch.bfloat16, channels_last=True
    )
    assert hr_amp.dtype == np.float32
    assert np.abs(hr_amp - hr_full).max() < 0.05


def test_multiscale_cams_output_size_maps_back_to_the_original():
    torch.manual_seed(0)
    model = StridedCAM().eval()
    _, cam, hr_cam = multiscale_cams(model, _image(32, 32), scales=(1.0,), device="cpu", output_size=(40, 60))
    assert cam.shape == (3, 10, 15) and hr_cam.shape == (3, 40, 60)


def test_multiscale_cams_rejects_bad_images(strided_model):
    with pytest.raises(ValueError, match="uint8"):
        multiscale_cams(strided_model, np.zeros((8, 8, 3), np.float32), device="cpu")
    with pytest.raises(ValueError, match="0 is the background"):
        multiscale_cams(strided_model, _image(8, 8), device="cpu", keys=[0, 1])


HAND_CAMS = np.array(
    [
        [[0.1, 0.5, 0.2], [0.3, 0.0, 0.9]],  # key 3
        [[0.05, 0.6, 0.2], [0.3, 0.25, 0.1]],  # key 7
    ],
    dtype=np.float32,
)


def test_cams_to_label_map_hand_case():
    labels = cams_to_label_map(HAND_CAMS, [3, 7], threshold=0.2)
    # (0,2): max equals the threshold -> background; (1,0): tie between planes -> the first plane
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[0, 7, 0], [3, 7, 3]]
    assert np.array_equal(cams_to_label_map(HAND_CAMS, np.array([0, 3, 7]), threshold=0.2), labels)
    assert cams_to_label_map(HAND_CAMS, [3, 7], threshold=0.0).tolist() == [[3, 7, 3], [3, 7, 3]]
    assert cams_to_label_map(HAND_CAMS[::-1], [7, 3], threshold=0.0).tolist() == [[3, 7, 7], [7, 7, 3]]
    assert cams_to_label_map(np.zeros((0, 2, 3), np.float32), [], 0.1).tolist() == [[0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError):
        cams_to_label_map(HAND_CAMS, [3], threshold=0.2)


def test_label_map_with_ignore_hand_case():
    labels = label_map_with_ignore(HAND_CAMS, [3, 7], fg_threshold=0.5, bg_threshold=0.2)
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[0, 7, 0], [255, 255, 3]]  # 0.5 itself is not foreground: (0,1) is 0.6
    assert label_map_with_ignore(HAND_CAMS, [3, 7], 0.55, 0.45).tolist() == [[0, 7, 0], [0, 0, 3]]
    with pytest.raises(ValueError):
        label_map_with_ignore(HAND_CAMS, [3, 7], fg_threshold=0.1, bg_threshold=0.2)


def test_channels_last_gives_the_same_fp32_cams_as_contiguous():
    torch.manual_seed(0)
    model = Classifier("resnet18", 4, backbone_weights="none").eval()
    image = _image(40, 36, seed=2)
    _, cam, hr_cam = multiscale_cams(model, image, scales=(1.0, 0.5), device="cpu", keys=[1, 3])
    model = model.to(memory_format=torch.channels_last)
    _, cam_cl, hr_cam_cl = multiscale_cams(
        model, image, scales=(1.0, 0.5), device="cpu", keys=[1, 3], channels_last=True
    )
    assert np.abs(cam_cl - cam).max() < 1e-4 and np.abs(hr_cam_cl - hr_cam).max() < 1e-4


def _batch_models() -> dict[str, nn.Module]:
    from core.cam.eps import EPSClassifier
    from core.cam.seam import SeamClassifier
    from core.ccam.network import CCAM

    torch.manual_seed(0)
    return {
        "classifier": Classifier("resnet18", 4, backbone_weights="none").eval(),
        "seam": SeamClassifier("resnet18", 4, backbone_weights="none").eval(),  # PCM: per-image affinities
        "eps": EPSClassifier("resnet18", 4, backbone_weights="none").eval(),
        "ccam": CCAM("resnet18", backbone_weights="none").eval(),
    }


@pytest.mark.parametrize("name", ["classifier", "seam", "eps", "ccam"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_batch_gives_each_image_the_cams_it_gets_alone(name, channels_last):
    model = _batch_models()[name]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = [_image(40, 36, seed=s) for s in range(4)]
    keys = [[1], [1], [], [1]] if name == "ccam" else [[1, 3], [2], [], [4, 1, 2]]
    extra = {"activation": "sigmoid", "average": True} if name == "ccam" else {}
    sizes = [(40, 36), (80, 72), (40, 36), (33, 50)]  # output sizes may differ (--resize maps back per image)
    common = {"scales": (1.0, 0.5), "device": "cpu", "channels_last": channels_last, **extra}
    batched = multiscale_cams_batch(model, images, keys=keys, output_sizes=sizes, **common)
    assert len(batched) == len(images)
    for image, image_keys, size, (got_keys, cam, hr_cam) in zip(images, keys, sizes, batched, strict=True):
        alone_keys, alone_cam, alone_hr = multiscale_cams(model, image, keys=image_keys, output_size=size, **common)
        assert got_keys.tolist() == alone_keys.tolist() == list(image_keys)
        assert cam.shape == alone_cam.shape and hr_cam.shape == alone_hr.shape == (len(image_keys), *size)
        assert np.abs(cam - alone_cam).max(initial=0) < 1e-5 and np.abs(hr_cam - alone_hr).max(initial=0) < 1e-5
    # The images' maps differ (so a batch that mixed them up would have failed above).
    _, _, other = multiscale_cams(model, images[3], keys=[1], output_size=sizes[0], **common)
    assert np.abs(batched[0][2][0] - other[0]).max() > 0.05


def test_a_batch_needs_images_of_one_size_and_one_key_list_per_image(strided_model):
    with pytest.raises(ValueError, match="images of one size"):
        multiscale_cams_batch(strided_model, [_image(16, 16), _image(16, 20)], device="cpu")
    with pytest.raises(ValueError, match="2 images but 1 keys"):
        multiscale_cams_batch(strided_model, [_image(16, 16), _image(16, 16)], device="cpu", keys=[[1]])
    assert multiscale_cams_batch(strided_model, [], device="cpu") == []
    all_keys = multiscale_cams_batch(strided_model, [_image(16, 16)] * 2, scales=(1.0,), device="cpu")
    assert [k.tolist() for k, _, _ in all_keys] == [[1, 2, 3], [1, 2, 3]]
