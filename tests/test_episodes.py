"""FeatureBank loading, episode sampling, frame positions, episode gathering and evaluation maths.

Stores are written directly with known numbers (no extraction), so every check is exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fsar.cache import StoreLayout, create_store, open_store
from fsar.cache.bank import BankError, load_bank
from fsar.data.frames import FramePolicy, select_frames
from fsar.heads import ProtoMeanHead
from fsar.heads.registry import head_config
from fsar.pipelines.build import episode_tensors
from fsar.pipelines.episodes import (
    EpisodeSampler,
    EpisodeShape,
    EpisodeSpecError,
    cached_test_positions,
    fixed_episodes,
    segment_random_positions,
    train_positions,
)
from fsar.pipelines.evaluate import EvalSetup, compare, evaluate_episodes

RECIPE = {"model": "fsar-tiny-vit", "weights": "random:0", "preprocess": {"crop": 32}}
T_CAP, DIM = 6, 8
PROTO = head_config("proto_mean")


def write_store(path, class_ids, splits, status, n_frames, features, layers=None):
    """A store holding exactly the given arrays. features: view -> float [N, T_CAP, D]."""
    n_classes = int(max(class_ids)) + 1
    layers = layers or {}
    layer_dims = {k: v.shape[-1] for k, v in next(iter(layers.values()), {}).items()}
    dim = next(iter(features.values())).shape[-1]
    layout = StoreLayout(
        video_ids=tuple(f"c{c}/v{i}" for i, c in enumerate(class_ids)),
        class_ids=tuple(class_ids),
        splits=tuple(splits),
        class_names=tuple(f"class {c}" for c in range(n_classes)),
        t_cap=T_CAP,
        feature_dim=dim,
        views=tuple(features),
        layer_dims=layer_dims,
        chunk_videos=4,
    )
    store = create_store(path, layout, RECIPE)
    n_frames, status = np.asarray(n_frames), np.asarray(status)
    index = np.where(np.arange(T_CAP) < n_frames[:, None], np.arange(T_CAP), -1)
    for a, b in store.blocks():
        store.write_block(
            a,
            b,
            features={v: x[a:b] for v, x in features.items()},
            layers={v: {k: x[a:b] for k, x in d.items()} for v, d in layers.items()},
            frame_index=index[a:b],
            n_frames=n_frames[a:b],
            status=status[a:b],
            errors=["broken" if s == 2 else "" for s in status[a:b]],
        )
    text = np.arange(n_classes * dim, dtype=np.float32).reshape(n_classes, dim) / 7
    store.write_classes(text, text[:, None])
    return open_store(path)


def class_features(class_ids, rng, noise=0.05, dim=DIM, same=()):
    """[N, T_CAP, D]: one basis direction per class plus noise; classes in ``same`` share
    direction 0 and have no noise, so their prototypes are bitwise identical."""
    ids = np.asarray(class_ids)
    x = np.eye(dim)[ids % dim][:, None, :] + noise * rng.standard_normal((len(ids), T_CAP, dim))
    tied = np.isin(ids, same)
    x[tied] = np.eye(dim)[0]
    return x.astype(np.float16)


# class c has COUNTS[c] done test videos; plus train videos and failed / pending test videos
COUNTS = [4, 5, 6, 7, 8, 9, 10, 6]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    rng = np.random.default_rng(0)
    videos = [(c, "test", 1) for c, k in enumerate(COUNTS) for _ in range(k)]
    videos += [(0, "train", 1), (1, "train", 1), (2, "test", 2), (3, "test", 0), (0, "test", 2)]
    order = rng.permutation(len(videos))  # interleave classes and splits in store order
    class_ids, splits, status = (list(x) for x in zip(*[videos[i] for i in order], strict=True))
    n_frames = np.where(np.array(status) == 1, rng.integers(1, T_CAP + 1, len(order)), 0)
    feats = {v: class_features(class_ids, rng, noise=0.2) for v in ("center", "flip")}
    layers = {v: {"block1": rng.standard_normal((len(order), T_CAP, 3))} for v in feats}
    path = tmp_path_factory.mktemp("bank") / "s.zarr"
    store = write_store(path, class_ids, splits, status, n_frames, feats, layers)
    return store, dict(class_ids=class_ids, splits=splits, status=status, n_frames=n_frames,
                       features=feats, layers=layers)  # fmt: skip


@pytest.fixture(scope="module")
def bank(written):
    return load_bank(written[0], "test", views=("center", "flip"), layers=("block1",))


def test_load_bank_holds_exactly_the_done_videos_of_the_split(written, bank):
    store, w = written
    rows = np.flatnonzero((np.array(w["splits"]) == "test") & (np.array(w["status"]) == 1))
    assert bank.store_rows.tolist() == rows.tolist() and len(bank) == sum(COUNTS)
    assert bank.skipped == 3  # two failed, one pending test videos
    assert bank.video_ids == tuple(store.video_ids[i] for i in rows)
    assert bank.class_ids.tolist() == np.array(w["class_ids"])[rows].tolist()
    assert bank.n_frames.tolist() == w["n_frames"][rows].tolist()
    for view in ("center", "flip"):
        assert bank.features[view].dtype == torch.float16
        np.testing.assert_array_equal(bank.features[view].numpy(), w["features"][view][rows])
        want = w["layers"][view]["block1"][rows].astype(np.float16)
        np.testing.assert_array_equal(bank.layers[view]["block1"].numpy(), want)
    np.testing.assert_array_equal(bank.class_text.numpy(), store.class_text)
    assert bank.views == ("center", "flip") and bank.feature_dim == DIM
    assert bank.layer_dims == {"block1": 3}
    assert bank.videos_per_class() == dict(enumerate(COUNTS))
    train = load_bank(store, "train")
    assert len(train) == 2 and train.skipped == 0 and train.layers == {}


def test_load_bank_errors_name_the_fix(written, tmp_path):
    store, _ = written
    with pytest.raises(BankError, match=r"no 'val' videos.*dataset.splits"):
        load_bank(store, "val")
    with pytest.raises(BankError, match=r"no cached view\(s\) \['crop0'\].*--views"):
        load_bank(store, "test", views=("center", "crop0"))
    with pytest.raises(BankError, match=r"no cached layer\(s\) \['block9'\].*--layers block9"):
        load_bank(store, "test", layers=("block9",))
    feats = {"center": np.zeros((3, T_CAP, DIM), np.float16)}
    pending = write_store(tmp_path / "p.zarr", [0, 1, 1], ["val"] * 3, [0, 2, 0], [0] * 3, feats)
    with pytest.raises(BankError, match=r"none of the 3 'val' videos.*rerun the same fsar extract"):
        load_bank(pending, "val")


def test_episode_shapes_labels_and_distinct_videos(bank):
    way, shot, query, count = 5, 2, 2, 300
    eps = EpisodeSampler(bank, EpisodeShape(way, shot, query)).sample(
        count, torch.Generator().manual_seed(1)
    )
    assert eps.support.shape == eps.support_labels.shape == (count, way * shot)
    assert eps.query.shape == eps.query_labels.shape == (count, way * query)
    assert eps.classes.shape == (count, way) and len(eps) == count
    ids = bank.class_ids
    for b in range(count):
        assert len(set(eps.classes[b].tolist())) == way
        rows = torch.cat([eps.support[b], eps.query[b]]).tolist()
        assert len(set(rows)) == len(rows) and min(rows) >= 0  # no video twice, no padding
        assert torch.bincount(eps.support_labels[b], minlength=way).tolist() == [shot] * way
        assert torch.bincount(eps.query_labels[b], minlength=way).tolist() == [query] * way
    assert torch.equal(ids[eps.support], torch.gather(eps.classes, 1, eps.support_labels))
    assert torch.equal(ids[eps.query], torch.gather(eps.classes, 1, eps.query_labels))
    # shuffled: sorted label orders (or sorted class lists) would be rare by chance
    for labels in (eps.support_labels, eps.query_labels, eps.classes):
        assert (labels.diff(dim=1) >= 0).all(1).float().mean() < 0.05


def test_episodes_are_seeded(bank):
    sampler = EpisodeSampler(bank, EpisodeShape(5, 1, 3))
    a, b, c = (sampler.sample(50, torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    for x, y in zip(a._tensors(), b._tensors(), strict=True):
        assert torch.equal(x, y)
    assert a.digest() == b.digest() != c.digest()
    assert not torch.equal(a.support, c.support) and not torch.equal(a.classes, c.classes)
    fixed = fixed_episodes(bank, EpisodeShape(5, 1, 3), 50, seed=3)
    assert fixed.digest() == a.digest()
    assert a.slice(10, 20).digest() == b.slice(10, 20).digest() != a.slice(0, 10).digest()


def test_class_and_video_frequencies_are_uniform(bank):
    """Chi-square statistics stay far below a generous bound (dof + 6 sqrt(2 dof))."""
    way, shot, query, count = 3, 2, 2, 4000
    eps = EpisodeSampler(bank, EpisodeShape(way, shot, query)).sample(
        count, torch.Generator().manual_seed(5)
    )
    n_classes, n_videos = len(COUNTS), len(bank)
    class_hits = torch.bincount(eps.classes.flatten(), minlength=n_classes).double()
    expected = count * way / n_classes
    chi2 = float(((class_hits - expected) ** 2 / expected).sum())
    assert chi2 < (n_classes - 1) + 6 * np.sqrt(2 * (n_classes - 1))
    rows = torch.cat([eps.support, eps.query], 1).flatten()
    video_hits = torch.bincount(rows, minlength=n_videos).double()
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    expected = (class_hits * (shot + query) / counts)[bank.class_ids]  # [V]
    chi2 = float(((video_hits - expected) ** 2 / expected).sum())
    dof = n_videos - n_classes
    assert chi2 < dof + 6 * np.sqrt(2 * dof)
    # the smallest class (4 videos, shot + query = 4) uses every video whenever it is drawn
    smallest = bank.class_ids == 0
    assert torch.equal(video_hits[smallest], torch.full((4,), class_hits[0].item()).double())


def test_impossible_requests_raise_naming_the_keys(bank):
    too_many = r"9-way.*has 8 with extracted videos.*lower episodes\.way to at most 8"
    with pytest.raises(EpisodeSpecError, match=too_many):
        EpisodeSampler(bank, EpisodeShape(9, 1, 1))
    too_few = r"2 \+ 3 = 5.*'class 0'.*only 4 extracted.*episodes\.shot or episodes\.query.* <= 4"
    with pytest.raises(EpisodeSpecError, match=too_few):
        EpisodeSampler(bank, EpisodeShape(5, 2, 3))
    keys = ("episodes.way", "protocol.train_shot", "protocol.train_query")
    with pytest.raises(EpisodeSpecError, match=r"protocol\.train_shot or protocol\.train_query"):
        EpisodeSampler(bank, EpisodeShape(5, 4, 1), keys=keys)
    EpisodeSampler(bank, EpisodeShape(8, 1, 3))  # exactly enough: fine


def test_sampler_restricted_to_some_classes(bank):
    sampler = EpisodeSampler(bank, EpisodeShape(3, 2, 3), classes=[6, 2, 4, 99])
    eps = sampler.sample(200, torch.Generator().manual_seed(2))
    assert set(eps.classes.flatten().tolist()) == {2, 4, 6}
    assert torch.equal(bank.class_ids[eps.query], torch.gather(eps.classes, 1, eps.query_labels))
    with pytest.raises(EpisodeSpecError, match="has 3 with extracted videos"):
        EpisodeSampler(bank, EpisodeShape(4, 1, 1), classes=[2, 4, 6])


def reference_test(n: int, t: int) -> list[int]:
    start, end = (0, n - 1) if n - 3 < t else (1, n - 2)
    return [int(f) for f in np.linspace(start, end, t)]


@pytest.mark.parametrize("seq_len", [1, 3, 8, 16])
def test_cached_test_positions_are_reference_test(seq_len):
    n = torch.arange(1, 400)
    got = cached_test_positions(n, seq_len)
    assert got.shape == (len(n), seq_len) and got.dtype == torch.long
    want = [reference_test(int(k), seq_len) for k in n]
    assert got.tolist() == want
    policy = FramePolicy("reference_test", seq_len, 1)
    assert all(select_frames(policy, int(k)) == w for k, w in zip(n, want, strict=True))
    # a store cached with reference_test holds n = T frames: every cached frame, in order
    assert cached_test_positions(torch.tensor([seq_len]), seq_len).tolist() == [
        list(range(seq_len))
    ]


def test_segment_and_train_positions_stay_in_range_and_are_seeded():
    n, t = torch.arange(1, 300).repeat(4), 8
    pos = segment_random_positions(n, t, torch.Generator().manual_seed(0))
    again = segment_random_positions(n, t, torch.Generator().manual_seed(0))
    other = segment_random_positions(n, t, torch.Generator().manual_seed(1))
    assert torch.equal(pos, again) and not torch.equal(pos, other)
    k = torch.arange(t)
    low = torch.div(k * n[:, None], t, rounding_mode="floor")  # floor(k n / T)
    assert ((pos >= low.clamp(max=n[:, None] - 1)) & (pos >= 0) & (pos < n[:, None])).all()
    assert (pos * t < (k + 1) * n[:, None]).all()  # pos < (k+1) n / T: inside segment k
    long_videos = n >= t
    assert (pos.diff(dim=1) >= 0).all()  # segments in order
    assert (pos[long_videos, 0] < pos[long_videos, -1]).all()
    tp = train_positions(n, t, torch.Generator().manual_seed(2))
    assert tp.shape == (len(n), t) and (tp >= 0).all() and (tp < n[:, None]).all()
    assert torch.equal(tp, train_positions(n, t, torch.Generator().manual_seed(2)))


def test_episode_tensors_gather_the_right_frames_views_and_text(bank):
    eps = fixed_episodes(bank, EpisodeShape(4, 2, 2), 6, seed=8)
    gen = torch.Generator().manual_seed(9)
    positions = torch.randint(0, T_CAP, (len(bank), 5), generator=gen)
    views = torch.randint(0, 2, (len(bank),), generator=gen)
    got = episode_tensors(bank, eps, positions, views, PROTO, training=False)
    first = episode_tensors(bank, eps, positions, None, PROTO, training=False)
    names = bank.views
    for part in ("support", "query"):
        rows = getattr(eps, part)
        tensor, center = getattr(got, part), getattr(first, part)
        assert tensor.shape == (6, rows.shape[1], 5, DIM) and tensor.dtype == torch.float32
        for b, s in np.ndindex(*rows.shape):
            r = int(rows[b, s])
            want = bank.features[names[int(views[r])]][r, positions[r]].float()
            assert torch.equal(tensor[b, s], want)
            assert torch.equal(center[b, s], bank.features["center"][r, positions[r]].float())
    assert torch.equal(got.class_text, bank.class_text[eps.classes])
    assert torch.equal(got.support_labels, eps.support_labels) and got.extras == {}


def evaluate(store_bank, shape, count, seed=0, batch=7):
    setup = EvalSetup(store_bank, fixed_episodes(store_bank, shape, count, seed), 4, "cached", seed)
    return setup, evaluate_episodes(ProtoMeanHead(), setup, PROTO, episode_batch=batch)


def test_well_separated_classes_score_100_percent(bank):
    _, out = evaluate(bank, EpisodeShape(5, 1, 3), 40)
    assert out.accuracy == 100.0 and out.std == 0.0 and out.ci95 == 0.0
    assert out.confusion.sum() == 40 * 5 * 3
    assert np.array_equal(np.diag(np.diag(out.confusion)), out.confusion)  # all on the diagonal
    same = compare(out, out)
    assert (same.difference, same.ci95, same.a, same.episodes) == (0.0, 0.0, 100.0, 40)


def test_indistinguishable_classes_give_the_computed_accuracy_and_interval(tmp_path):
    """Classes 0 and 1 have identical features: an episode holding both gets one of them
    wrong for every query (ties go to one label), so its accuracy is (way - 1) / way."""
    way, query, count = 3, 2, 200
    class_ids = [c for c in range(5) for _ in range(4)]
    feats = {"center": class_features(class_ids, np.random.default_rng(1), same=(0, 1))}
    n = len(class_ids)
    store = write_store(tmp_path / "s.zarr", class_ids, ["test"] * n, [1] * n, [T_CAP] * n, feats)
    setup, out = evaluate(load_bank(store, "test"), EpisodeShape(way, 1, query), count, seed=3)
    classes = setup.episodes.classes.numpy()
    both = (classes == 0).any(1) & (classes == 1).any(1)
    want = np.where(both, (way - 1) / way, 1.0)
    assert 0 < both.sum() < count
    np.testing.assert_allclose(out.per_episode, want, rtol=0, atol=1e-12)
    assert out.accuracy == pytest.approx(100 * want.mean(), abs=1e-9)
    assert out.ci95 == pytest.approx(100 * 1.96 * want.std() / np.sqrt(count), abs=1e-9)
    conf = out.confusion
    assert conf.sum() == count * way * query
    assert np.trace(conf) == pytest.approx(out.accuracy / 100 * conf.sum())
    assert conf[0, 1] + conf[1, 0] == query * both.sum()
    assert conf.sum() - np.trace(conf) == conf[0, 1] + conf[1, 0]
    _, rebatched = evaluate(setup.bank, EpisodeShape(way, 1, query), count, seed=3, batch=count)
    np.testing.assert_array_equal(rebatched.per_episode, out.per_episode)
    perfect = type(out)(np.ones(count), out.confusion)
    diff = compare(perfect, out)
    delta = 1.0 - want
    assert diff.difference == pytest.approx(100 * delta.mean(), abs=1e-9)
    assert diff.ci95 == pytest.approx(100 * 1.96 * delta.std() / np.sqrt(count), abs=1e-9)
    with pytest.raises(ValueError, match="same episodes"):
        compare(out, type(out)(out.per_episode[:-1], out.confusion))


def test_noisy_classes_match_a_numpy_prototype_classifier(bank):
    """Overlapping classes: per-episode accuracy equals a float64 numpy reimplementation."""
    center = bank.features["center"].double()
    noise = np.random.default_rng(4).standard_normal(tuple(center.shape)) * 0.6
    nb = dataclasses.replace(bank, features={"center": (center + torch.from_numpy(noise)).half()})
    setup, out = evaluate(nb, EpisodeShape(5, 2, 2), 60, seed=6)
    x = nb.features["center"].double().numpy()
    pos = setup.positions().numpy()
    clip = x[np.arange(len(nb))[:, None], pos].mean(1)  # [V, D] frame means
    e = setup.episodes
    want = []
    for b in range(len(e)):
        sup, lab = clip[e.support[b].numpy()], e.support_labels[b].numpy()
        protos = np.stack([sup[lab == n].mean(0) for n in range(5)])
        qry = clip[e.query[b].numpy()]
        cos = (qry @ protos.T) / np.outer(
            np.linalg.norm(qry, axis=1), np.linalg.norm(protos, axis=1)
        )
        want.append((cos.argmax(1) == e.query_labels[b].numpy()).mean())
    want = np.array(want)
    assert 0.3 < want.mean() < 0.95  # the construction really is ambiguous
    np.testing.assert_allclose(out.per_episode, want, atol=1e-12)
    assert out.ci95 == pytest.approx(100 * 1.96 * want.std() / np.sqrt(len(want)), abs=1e-9)
    assert np.trace(out.confusion) == round(want.mean() * 60 * 5 * 2)


def test_training_extras_carry_shallow_layers_and_the_video_text_table(bank):

    eps = fixed_episodes(bank, EpisodeShape(3, 1, 2), 4, seed=3)
    positions = torch.zeros(len(bank), 2, dtype=torch.long)
    spm = head_config("clipspm", hsmr_source="layer:block1")
    got = episode_tensors(bank, eps, positions, None, spm, training=True)
    assert set(got.extras) == {"support_shallow", "query_shallow"}
    rows = eps.support
    assert got.extras["support_shallow"].shape == (4, rows.shape[1], 2, 3)
    assert torch.equal(
        got.extras["support_shallow"][1, 0],
        bank.layers["center"]["block1"][rows[1, 0], [0, 0]].float(),
    )
    assert episode_tensors(bank, eps, positions, None, spm, training=False).extras == {}

    text_classes = torch.tensor([6, 2, 0, 1, 3, 4, 5, 7])  # a table in another order than ids
    fsar_head = head_config("clipfsar")
    got = episode_tensors(bank, eps, positions, None, fsar_head, True, text_classes)
    assert torch.equal(got.extras["text_table"], bank.class_text[text_classes])
    for part in ("support", "query"):
        table_rows = got.extras[f"{part}_class_ids"]
        true_ids = bank.class_ids[getattr(eps, part)]
        assert torch.equal(text_classes[table_rows], true_ids)  # row k of the table is its class


def test_segment_random_evaluation_frames_are_seeded_per_evaluation(bank):
    eps = fixed_episodes(bank, EpisodeShape(3, 1, 1), 2, seed=0)
    setup = EvalSetup(bank, eps, 4, "segment_random", seed=5)
    first, again = setup.positions(), setup.positions()
    assert torch.equal(first, again)  # every head is scored on the same frames
    assert not torch.equal(first, EvalSetup(bank, eps, 4, "segment_random", seed=6).positions())
    assert bool((first < bank.n_frames[:, None]).all()) and bool((first >= 0).all())
    cached = EvalSetup(bank, eps, 4, "cached", seed=5).positions()
    assert not torch.equal(first, cached)
