"""Transforms: normalisation values, shape preservation, and what the random ones may produce."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockscale.data.transforms import (
    STATS,
    Compose,
    Normalization,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    build_transform,
)

images = st.builds(
    lambda c, h, w, seed: torch.rand(c, h, w, generator=torch.Generator().manual_seed(seed)),
    st.integers(1, 4),
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(0, 2**31),
)


def test_published_statistics() -> None:
    assert STATS["fashion-mnist"] == Normalization((0.2860,), (0.3530,))
    assert STATS["cifar10"] == Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert STATS["cifar100"] == Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def test_normalize_per_channel() -> None:
    image = torch.stack([torch.full((2, 2), 0.5), torch.full((2, 2), 1.0)])
    out = Normalize((0.5, 0.0), (1.0, 0.5))(image)
    torch.testing.assert_close(out, torch.stack([torch.zeros(2, 2), torch.full((2, 2), 2.0)]))


@pytest.mark.parametrize(("mean", "std"), [((0.5,), (0.5, 0.5)), ((0.5,), (0.0,))])
def test_normalize_rejects_bad_stats(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="std"):
        Normalize(mean, std)


@settings(max_examples=30, deadline=None)
@given(image=images, padding=st.integers(0, 5), seed=st.integers(0, 2**31))
def test_random_crop_is_a_window_of_the_padded_image(
    image: torch.Tensor, padding: int, seed: int
) -> None:
    out = RandomCrop(padding, torch.Generator().manual_seed(seed))(image)
    assert out.shape == image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    height, width = image.shape[-2:]
    windows = [
        padded[:, top : top + height, left : left + width]
        for top in range(2 * padding + 1)
        for left in range(2 * padding + 1)
    ]
    assert any(torch.equal(out, window) for window in windows)


@settings(max_examples=30, deadline=None)
@given(image=images, seed=st.integers(0, 2**31))
def test_flip_gives_the_image_or_its_mirror(image: torch.Tensor, seed: int) -> None:
    out = RandomHorizontalFlip(0.5, torch.Generator().manual_seed(seed))(image)
    assert torch.equal(out, image) or torch.equal(out, image.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(image), image)
    assert torch.equal(RandomHorizontalFlip(1.0)(image), image.flip(-1))


@settings(max_examples=20, deadline=None)
@given(image=images, augment=st.booleans())
def test_pipeline_keeps_shape_and_dtype(image: torch.Tensor, augment: bool) -> None:
    stats = Normalization((0.5,) * image.shape[0], (0.25,) * image.shape[0])
    out = build_transform(stats, augment=augment, padding=2)(image)
    assert out.shape == image.shape and out.dtype == torch.float32


def test_seeded_augmentation_is_reproducible_and_varies() -> None:
    image = torch.rand(3, 8, 8)

    def run(seed: int) -> list[torch.Tensor]:
        transform = build_transform(
            None, augment=True, generator=torch.Generator().manual_seed(seed)
        )
        return [transform(image) for _ in range(10)]

    first, again = run(1), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert len({tuple(t.flatten().tolist()) for t in first}) > 1


def test_identity_pipeline_and_composition_order() -> None:
    image = torch.rand(1, 4, 4)
    assert torch.equal(build_transform(None)(image), image)
    composed = Compose(lambda x: x + 1, lambda x: x * 2)
    torch.testing.assert_close(composed(image), (image + 1) * 2)


def test_transforms_pickle_for_dataloader_workers() -> None:
    transform = build_transform(STATS["cifar10"], augment=True)
    clone = pickle.loads(pickle.dumps(transform))
    assert clone(torch.rand(3, 32, 32)).shape == (3, 32, 32)


@pytest.mark.parametrize(
    "make", [lambda: RandomCrop(-1), lambda: RandomHorizontalFlip(1.5)], ids=["crop", "flip"]
)
def test_bad_arguments(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]
