import pytest
import torch
from tiny_models import tiny_models

from hetpure_bench.defenses import build_defense
from hetpure_bench.diffusion.noise import NoiseStreams, rand_like, randn_like, stream_seed


def test_one_generator_per_row_draws_each_row_from_its_own_stream():
    x = torch.zeros(3, 2, 4, 4)
    five, six = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    gens = [five, six, five]
    noise = randn_like(x, gens)
    assert torch.equal(noise[0], torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(noise[1], torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(6)))
    assert not torch.equal(noise[0], noise[2])  # two rows from one generator: its stream advances
    assert rand_like(x, [torch.Generator().manual_seed(0)] * 3).min() >= 0
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn_like(x, gens[:2])


def test_copies_of_the_images_draw_from_their_images_streams_in_order():
    x = torch.zeros(6, 1, 2, 2)  # 3 copies of 2 images, as x.repeat(3, 1, 1, 1) makes
    noise = randn_like(x, NoiseStreams([11, 12]).for_batch(x))
    for image, seed in enumerate((11, 12)):
        g = torch.Generator().manual_seed(seed)
        expected = torch.stack([torch.randn(1, 2, 2, generator=g) for _ in range(3)])
        assert torch.equal(noise[image::2], expected)


def test_a_batch_that_is_not_copies_of_the_images_uses_one_shared_stream():
    streams = NoiseStreams([1, 2, 3])
    shared = streams.for_batch(torch.zeros(2, 1))
    assert isinstance(shared, torch.Generator) and shared is streams.for_batch(torch.zeros(4, 1))
    assert isinstance(NoiseStreams(7).for_batch(torch.zeros(5, 1)), torch.Generator)  # an int: one stream
    assert stream_seed(0, 3, "attack") != stream_seed(0, 3, "evaluate") != stream_seed(1, 3, "evaluate")


@pytest.mark.parametrize("name, overrides", [
    ("hetpure", {"t_l": 40, "t_s": 20, "stride": 20}),
    ("hetpure-randmask", {"t_l": 40, "t_s": 20, "stride": 20}),
    ("diffpure", {"sampler": "sde", "t_star": 0.04, "sde_dt": 0.01}),
])
def test_an_images_purification_does_not_depend_on_its_batch(name, overrides):
    classifier, diffusion = tiny_models()
    defense = build_defense(name, classifier, diffusion, overrides)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seeds = [stream_seed(0, i, "evaluate") for i in (10, 11, 12, 13)]
    defense.reseed(seeds)
    together = defense.purify(x)
    for i in range(4):
        defense.reseed([seeds[i]])
        assert torch.allclose(defense.purify(x[i:i + 1]), together[i:i + 1], atol=1e-6), f"image {i}"
    defense.reseed(seeds[::-1])
    reversed_batch = defense.purify(x.flip(0))
    assert torch.allclose(reversed_batch.flip(0), together, atol=1e-6)
    defense.reseed([stream_seed(1, i, "evaluate") for i in (10, 11, 12, 13)])
    assert not torch.allclose(defense.purify(x), together)  # another seed: other noise


def test_a_subset_of_the_streams_advances_the_same_generators():
    streams, twin = NoiseStreams([11, 12, 13]), NoiseStreams([11, 12, 13])
    x = torch.zeros(3, 1, 2, 2)
    part = streams.subset([2, 0])
    sub_noise = randn_like(x[:2].repeat(2, 1, 1, 1), part.for_batch(x[:2].repeat(2, 1, 1, 1)))
    full = randn_like(x.repeat(2, 1, 1, 1), twin.for_batch(x.repeat(2, 1, 1, 1)))
    assert torch.equal(sub_noise, full[[2, 0, 5, 3]])  # images 13 and 11, two copies each
    after, after_twin = randn_like(x, streams.for_batch(x)), randn_like(x, twin.for_batch(x))
    assert torch.equal(after[[0, 2]], after_twin[[0, 2]])  # images 11 and 13 went on alike
    assert not torch.equal(after[1], after_twin[1])  # image 12 was not drawn through the subset
    shared = NoiseStreams(7)
    assert shared.subset([0]) is shared  # one shared stream has no per-image part


def test_a_snapshot_draws_what_comes_next_and_moves_neither():
    streams = NoiseStreams([1, 2])
    x = torch.zeros(2, 3)
    randn_like(x, streams.for_batch(x))  # advance, so the snapshot must copy positions, not seeds
    snapshot = streams.snapshot()
    ahead = randn_like(x, snapshot.for_batch(x))
    assert torch.equal(randn_like(x, streams.for_batch(x)), ahead)
    assert not torch.equal(randn_like(x, snapshot.for_batch(x)), ahead)  # the snapshot went on by itself


def test_a_copy_replay_hands_each_image_its_chosen_copys_noise():
    from hetpure_bench.diffusion.noise import CopyReplay

    for seeds in ([11, 12], 5):
        streams = NoiseStreams(seeds)
        snapshot = streams.snapshot()
        batch = torch.zeros(6, 1, 2, 2)  # 3 copies of 2 images
        first, second = (randn_like(batch, streams.for_batch(batch)) for _ in range(2))
        mask = rand_like(batch[:, :, :1], streams.for_batch(batch))
        doubled = randn_like(batch.repeat(2, 1, 1, 1), streams.for_batch(batch.repeat(2, 1, 1, 1)))  # k = 2 blocks
        replay = CopyReplay(snapshot, 3, torch.tensor([2, 0]))
        images = torch.zeros(2, 1, 2, 2)
        rows = [2 * 2 + 0, 0 * 2 + 1]  # copy 2 of image 0, copy 0 of image 1
        assert torch.equal(randn_like(images, replay.for_batch(images)), first[rows])
        assert torch.equal(randn_like(images, replay.for_batch(images)), second[rows])
        assert torch.equal(rand_like(images[:, :, :1], replay.for_batch(images)), mask[rows])
        blocks = randn_like(images.repeat(2, 1, 1, 1), replay.for_batch(images.repeat(2, 1, 1, 1)))
        assert torch.equal(blocks, doubled[rows + [r + 6 for r in rows]])
        again = CopyReplay(snapshot, 3, torch.tensor([2, 0]))  # the snapshot itself was not moved
        assert torch.equal(randn_like(images, again.for_batch(images)), first[rows])
        with pytest.raises(ValueError, match="copies of the 2 images"):
            replay.for_batch(torch.zeros(3, 1))
