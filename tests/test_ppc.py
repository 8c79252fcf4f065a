"""PPC (core/cam/ppc.py): prototypes, the contrast unit, semi-hard mining, hard pixel sampling, and prototypes under
a 2-process torchrun equal to one process with the same global batch.

Run as a script (``torchrun --standalone --nproc_per_node=2 tests/test_ppc.py OUT``) this file is the worker of the
two-process test; pytest collects only the ``test_*`` functions.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import commands
import pytest
import torch
import torch.nn.functional as F

from core.cam import ppc

REPO = Path(__file__).resolve().parents[1]


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 images, 4x4 grid, 16-d embeddings, CAMs with a background slot and 3 classes; ties in the bg channel."""
    g = torch.Generator().manual_seed(5)
    emb = torch.rand(4, 16, 4, 4, generator=g)
    cams = torch.randn(4, 4, 4, 4, generator=g)
    cams[:, 2] = cams[:, 2].round()  # many ties inside one class as well
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    return emb, cams, labels


def test_prototype_of_a_known_region_is_the_normalised_weighted_mean_of_its_top_k():
    g = torch.Generator().manual_seed(0)
    emb = torch.rand(2, 8, 4, 4, generator=g) + 0.1
    scores = torch.zeros(2, 2, 4, 4)
    scores[:, 0] = 0.2  # background: a constant, as PPC sets it
    region = [
        (1, 0, 0, 0.9),
        (1, 0, 1, 0.8),
        (1, 1, 0, 0.7),
        (1, 1, 1, 0.6),
    ]  # (image, y, x, score): class 1 lives here
    for image, y, x, score in region:
        scores[image, 1, y, x] = score
    scores[0, 1, 3, 3] = 0.1  # a fifth, weaker position outside the top-k
    protos = ppc.batch_prototypes(emb, scores, topk_fraction=4 / 16)  # k = 4 over the whole batch
    weights = torch.tensor([s for *_, s in region])
    feats = torch.stack([emb[i, :, y, x] for i, y, x, _ in region])
    expected = F.normalize((weights[:, None] * feats).sum(0) / weights.sum(), dim=0)
    torch.testing.assert_close(protos[1], expected)
    # ties (the constant background) resolve to the first k positions of the batch, image 0 row-major
    torch.testing.assert_close(protos[0], F.normalize(emb[0, :, 0, :4].T.mean(0), dim=0))
    assert protos.shape == (2, 8)


def test_background_prototype_constant_takes_the_first_positions_complement_the_least_class_like():
    # One image, 2x4 grid; the class map is high on the left half and 0 on the right; k = int(8 / 4) = 2 positions.
    embeddings = torch.eye(8).reshape(1, 8, 2, 4) + 0.01  # a distinct direction per position
    cams = torch.zeros(1, 2, 2, 4)
    cams[0, 1, :, :2] = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    scores = ppc.normalized_scores(cams, bg_score=0.2)
    for mode, positions in (("constant", [0, 1]), ("complement", [2, 3])):
        weights = ppc.prototype_weights(scores, mode)
        background = ppc.batch_prototypes(embeddings, weights, topk_fraction=1 / 4)[0]
        expected = F.normalize(embeddings.flatten(2)[0, :, positions].mean(dim=1), dim=0)  # equal weights: a plain mean
        assert torch.allclose(background, expected, atol=1e-6), mode
    assert torch.equal(ppc.prototype_weights(scores, "complement")[:, 1:], scores[:, 1:])  # class channels unchanged
    with pytest.raises(ValueError, match="unknown background prototype"):
        ppc.prototype_weights(scores, "median")


def test_labelled_prototype_images_ignore_an_absent_class_blip_that_min_max_lifts_to_one():
    # Image 0 holds class 1 (peak 10 at position 0); image 1 lacks it but has a faint blip of 0.01 at position 5.
    # Min-max scaling lifts both to ~1, so with k = 2 the blip enters the top-k beside the true peak.
    embeddings = torch.eye(8).reshape(1, 8, 2, 4).repeat(2, 1, 1, 1) + 0.01
    cams = torch.zeros(2, 3, 2, 4)
    cams[0, 1, 0, 0], cams[1, 1, 1, 1] = 10.0, 0.01
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    scores = ppc.normalized_scores(cams, bg_score=0.2)
    assert scores[1, 1, 1, 1] > 0.99  # the blip of an absent class scores like a peak
    everywhere = ppc.batch_prototypes(embeddings, ppc.prototype_weights(scores), topk_fraction=2 / 8)
    labelled = ppc.batch_prototypes(embeddings, ppc.prototype_weights(scores, labels=labels), topk_fraction=2 / 8)
    assert everywhere[1] @ embeddings[1, :, 1, 1] > 0.5  # the reference's rule takes image 1's blip in
    torch.testing.assert_close(labelled[1], F.normalize(embeddings[0, :, 0, 0], dim=0))  # only image 0's peak
    assert torch.equal(labelled[2], torch.zeros(8))  # class 2 is in no image: a zero prototype
    torch.testing.assert_close(labelled[0], everywhere[0])  # the background channel is not masked


def test_pseudo_labels_use_the_background_constant_and_the_image_labels():
    cams = torch.zeros(1, 3, 1, 3)
    cams[0, 1] = torch.tensor([0.0, 5.0, 10.0])  # present class: normalised to 0, ~0.5, ~1
    cams[0, 2] = torch.tensor([10.0, 0.0, 0.0])  # absent class: never wins
    scores = ppc.normalized_scores(cams, bg_score=0.3)
    assert torch.all(scores[:, 0] == 0.3) and scores[0, 1, 0, 0] == 0
    labels = ppc.pseudo_labels(scores, torch.tensor([[1.0, 0.0]]))
    assert labels.tolist() == [[[0, 1, 1]]]


def test_contrast_is_minimal_when_embeddings_equal_their_prototypes():
    protos = torch.eye(5, 8)  # 5 orthonormal prototypes
    targets = torch.tensor([0, 1, 2, 3, 4, 2])
    exact = protos[targets]
    tau = 0.1
    best = ppc.contrast(exact, protos, targets, tau)
    analytic = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 4))
    assert best.item() == pytest.approx(analytic, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        moved = F.normalize(exact + 0.3 * torch.randn(exact.shape, generator=g), dim=-1)
        assert ppc.contrast(moved, protos, targets, tau) > best
    # the whole loss: two identical views whose pixels sit on their class prototype score lower than noisy ones
    labels = torch.tensor([[1.0, 1.0]])
    cams = torch.zeros(1, 3, 2, 4)
    cams[0, 1, :, :2], cams[0, 2, :, 2:] = 1.0, 1.0
    emb = torch.zeros(1, 8, 2, 4)
    emb[0, 1, :, :2], emb[0, 2, :, 2:] = 1.0, 1.0
    kwargs = {"bg_score": 0.1, "topk_fraction": 0.5, "generator": torch.Generator().manual_seed(0)}
    clean, terms = ppc.ppc_loss(emb, emb, cams, cams, labels, **kwargs)
    noisy_emb = emb + 0.5 * torch.rand(emb.shape, generator=g)
    noisy, _ = ppc.ppc_loss(noisy_emb, noisy_emb, cams, cams, labels, **kwargs)
    assert clean < noisy and set(terms) == set(ppc.TERMS)


def test_semi_hard_mining_skips_the_three_most_similar_prototypes():
    protos = torch.eye(16)
    sims = torch.tensor([0.0] * 16)
    sims[[3, 7, 11]] = torch.tensor([0.9, 0.8, 0.7])  # the 3 most similar: skipped
    sims[0] = 0.5  # the positive
    sims[torch.tensor([1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 15])] = torch.linspace(0.4, 0.05, 12)
    pixel = sims / sims.norm()
    pixels = torch.stack([pixel, pixel])  # 2 identical pixels: hard sampling keeps one of them, twice over
    tau = 0.1
    loss = ppc.intra_view_loss(pixels, protos, torch.tensor([0, 0]), tau, torch.Generator().manual_seed(0))
    s = pixel
    ranked = s.sort(descending=True).values  # ranks 1..16; the positive is rank 4 here
    negatives = ranked[3:13]
    expected = -(s[0] / tau - torch.logsumexp(torch.cat([s[:1], negatives]) / tau, 0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with_top3 = -(s[0] / tau - torch.logsumexp(torch.cat([s[:1], ranked[:10]]) / tau, 0))
    assert loss < with_top3


def test_hard_pixel_sampling_takes_a_random_half_and_the_10_to_60_percent_band():
    # One class of 10 pixels whose similarity to the prototype (and so whose loss) rises with the index: the band is
    # ascending ranks 1..5 (int(0.6·10) - 10//2 = 1 up to 6); the random half is 5 pixels.
    protos = torch.eye(4)
    angles = torch.linspace(1.2, 0.1, 10)  # pixel 9 is the most similar
    pixels = torch.zeros(10, 4)
    pixels[:, 0], pixels[:, 1] = torch.cos(angles), torch.sin(angles)
    targets = torch.zeros(10, dtype=torch.long)
    tau = 0.1
    logits = pixels @ protos.T / tau
    per_pixel = -F.log_softmax(torch.cat([logits[:, :1], logits[:, 3:4]], 1), dim=1)[:, 0]  # 4 prototypes: rank 4 only
    generator = torch.Generator().manual_seed(3)
    loss = ppc.intra_view_loss(pixels, protos, targets, tau, torch.Generator().manual_seed(3))
    noise = torch.rand(10, generator=generator)
    random_half = noise.argsort()[:5]
    expected = (per_pixel[random_half].sum() + per_pixel[1:6].sum()) / 10
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_class_with_one_pixel_is_left_out_of_the_mean():
    protos = torch.eye(4)
    pixels = F.normalize(torch.rand(3, 4, generator=torch.Generator().manual_seed(2)), dim=-1)
    alone = ppc.intra_view_loss(pixels, protos, torch.tensor([1, 1, 2]), 0.1, torch.Generator().manual_seed(0))
    pair = ppc.intra_view_loss(pixels[:2], protos, torch.tensor([1, 1]), 0.1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(alone, pair)


def test_ppc_loss_resizes_view_one_and_backpropagates_into_the_embeddings_only():
    emb, cams, labels = global_batch()
    emb1 = F.interpolate(emb, size=(8, 8), mode="bilinear", align_corners=True).requires_grad_(True)
    cams1 = F.interpolate(cams, size=(8, 8), mode="bilinear", align_corners=True).requires_grad_(True)
    emb2 = emb.clone().requires_grad_(True)
    loss, terms = ppc.ppc_loss(emb1, emb2, cams1, cams, labels, bg_score=0.2, topk_fraction=1 / 8)
    loss.backward()
    assert emb1.grad.abs().sum() > 0 and emb2.grad.abs().sum() > 0 and cams1.grad is None
    weighted = 0.1 * sum(terms.values())
    assert loss.item() == pytest.approx(weighted.item(), rel=1e-5)
    with pytest.raises(ValueError, match="differ in size"):
        ppc.ppc_loss(emb, emb, cams, cams[..., :2], labels, bg_score=0.2, topk_fraction=1 / 8)


def test_projection_head_shape_and_flags():
    head = ppc.ProjectionHead(32, dim=128)
    out = head(torch.randn(2, 32, 3, 5))
    assert out.shape == (2, 128, 3, 5) and out.min() >= 0
    parser = argparse.ArgumentParser()
    ppc.add_ppc_args(parser, bg=0.1, topk=1 / 16)
    assert ppc.PPCConfig.from_args(parser.parse_args([])) is None
    config = ppc.PPCConfig.from_args(parser.parse_args(["--ppc", "true", "--ppc_weight", "0.2"]))
    assert config == ppc.PPCConfig(bg_score=0.1, topk_fraction=1 / 16, weights=(0.2, 0.2, 0.2))
    labelled = ppc.PPCConfig.from_args(parser.parse_args(["--ppc", "true", "--ppc_prototype_images", "labelled"]))
    assert labelled.prototype_images == "labelled" and ppc.config_kwargs(labelled)["prototype_images"] == "labelled"


def _local_prototypes() -> dict[str, torch.Tensor]:
    emb, cams, labels = global_batch()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    part = slice(rank * len(emb) // world, (rank + 1) * len(emb) // world)
    scores = ppc.normalized_scores(cams[part], bg_score=0.2)
    return {
        "k2": ppc.batch_prototypes(emb[part], scores, topk_fraction=2 / 16),
        "k12": ppc.batch_prototypes(emb[part], scores, topk_fraction=12 / 16),  # k larger than one process's top-k
    }


def test_prototypes_under_two_process_torchrun_equal_one_process_with_the_global_batch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = tmp_path / "ddp.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out)]
    done = commands.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    single = _local_prototypes()
    for key, protos in single.items():
        torch.testing.assert_close(ddp[key], protos, rtol=0, atol=1e-6)


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        result = _local_prototypes()
        if dist.get_rank() == 0:
            torch.save(result, sys.argv[1])
    finally:
        dist.destroy_process_group()
