"""Batching, losses, training, artifacts of trained models, and the evaluation harness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model_store.artifacts import ArtifactError
from model_store.registry import Registry
from model_store.store import ITEM_VECTORS, WEIGHTS, open_model
from training.batching import BatchConfig, Batcher, eval_users, history_range, train_users
from training.dataset import Split
from training.evaluate import evaluate
from training.loaders import prepare
from training.losses import NegativeSampler, pairwise_rank, sampled_softmax
from training.pipeline import evaluate_models, train_and_save
from training.tasks import PopularityScorer
from training.train import TrainConfig, build_task, train

TINY = TrainConfig(
    dim=16,
    n_layers=1,
    n_heads=2,
    epochs=2,
    batch_size=32,
    n_negatives=128,
    warmup_steps=5,
    device="cpu",
)


@pytest.fixture(scope="module")
def ds():
    return prepare("synthetic", n_users=300, n_items=400, n_topics=8)


# ---------------------------------------------------------------------------- batching


def test_training_history_stops_before_the_validation_session(ds):
    for u in eval_users(ds, Split.VAL)[:50]:
        first, end, target = history_range(ds, int(u), Split.TRAIN)
        assert target == -1
        assert (ds.sess_split[first:end] == Split.TRAIN).all()
        assert ds.sess_split[end] == Split.VAL
        _, val_end, val_target = history_range(ds, int(u), Split.VAL)
        assert val_end == val_target == end
        _, test_end, test_target = history_range(ds, int(u), Split.TEST)
        assert ds.sess_split[test_target] == Split.TEST and test_end == test_target


def test_eval_batch_has_one_query_at_the_end_of_each_history(ds):
    users = eval_users(ds, Split.TEST)[:20]
    b = Batcher(ds, BatchConfig(max_sessions=5)).build(users, Split.TEST)
    assert b.query_pos.shape == (20, 1)
    assert torch.equal(b.query_pos[:, 0], b.lengths)
    assert int(b.lengths.max()) <= 5
    assert b.context.items.numel() == 0
    for i, u in enumerate(users):
        target = np.flatnonzero((ds.sess_user == u) & (ds.sess_split == Split.TEST))[0]
        items, labels = ds.session(target)
        assert set(b.pos_item[b.pos_query == i].tolist()) == set(items[labels > 0].tolist())


def test_training_batch_targets_every_positive_session_and_reveal_keeps_a_positive(ds):
    users = train_users(ds)[:32]
    rng = np.random.default_rng(0)
    b = Batcher(ds, BatchConfig(reveal_prob=1.0)).build(users, Split.TRAIN, rng)
    valid = b.query_valid.flatten().nonzero().flatten()
    with_targets = torch.unique(b.pos_query)
    assert torch.equal(with_targets, valid)  # every query keeps at least one target positive
    assert b.context.items.numel() > 0
    # Revealed items are context, not targets.
    for q in torch.unique(b.context.segment)[:20].tolist():
        shown = set(b.context.items[b.context.segment == q].tolist())
        assert not shown & set(b.pos_item[b.pos_query == q].tolist())


def test_reveal_extra_keeps_every_plain_query_and_adds_revealing_ones(ds):
    users = train_users(ds)[:32]
    plain = Batcher(ds, BatchConfig()).build(users, Split.TRAIN, np.random.default_rng(0))
    extra = Batcher(ds, BatchConfig(reveal_prob=1.0, reveal_mode="extra")).build(
        users, Split.TRAIN, np.random.default_rng(0)
    )

    # Every target's full positive set is still a target of some query at its position...
    def targets(b):
        out = []
        for q in b.query_valid.flatten().nonzero().flatten().tolist():
            pos = int(b.query_pos.flatten()[q])
            items = tuple(sorted(b.pos_item[b.pos_query == q].tolist()))
            out.append((int(b.users[q // b.query_pos.shape[1]]), pos, items))
        return out

    assert set(targets(plain)) <= set(targets(extra))
    # ... and the revealing queries come on top, their revealed items not targets.
    assert int(extra.query_valid.sum()) > int(plain.query_valid.sum())
    assert extra.context.items.numel() > 0
    for q in torch.unique(extra.context.segment)[:20].tolist():
        shown = set(extra.context.items[extra.context.segment == q].tolist())
        assert not shown & set(extra.pos_item[extra.pos_query == q].tolist())
    with pytest.raises(ValueError, match="reveal_mode"):
        Batcher(ds, BatchConfig(reveal_mode="sometimes"))


def test_session_item_cap_keeps_positives_first(ds):
    batcher = Batcher(ds, BatchConfig(max_items=3))
    lengths = np.diff(ds.sess_offsets)
    s = int(np.flatnonzero(lengths > 10)[0])
    items, labels = batcher.session_events(s)
    full_items, full_labels = ds.session(s)
    assert len(items) == 3
    assert labels.sum() == min(3, int(full_labels.sum()))


# ---------------------------------------------------------------------------- losses


def test_sampled_softmax_matches_a_hand_computation_and_masks_accidental_hits():
    users = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    log_q = torch.log(torch.full((6,), 1 / 5))
    pos_query, pos_items = torch.tensor([0, 1]), torch.tensor([1, 2])
    negs = torch.tensor([2, 3, 4])  # item 2 is query 1's positive → masked for it
    loss = sampled_softmax(
        users, pos_query, items[pos_items], pos_items, items[negs], negs, log_q, temperature=0.5
    )
    expected = []
    for q, p in zip(pos_query.tolist(), pos_items.tolist(), strict=True):
        cands = [p] + [n for n in negs.tolist() if n != p]
        logits = torch.stack([users[q] @ items[c] / 0.5 - log_q[c] - np.log(3) for c in cands])
        expected.append(-torch.log_softmax(logits, 0)[0])
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_sampled_softmax_per_query_weighs_every_target_session_equally():
    g = torch.Generator().manual_seed(1)
    users = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=-1)
    log_q = torch.log(torch.full((8,), 1 / 7))
    pos_query, pos_items = torch.tensor([0, 0, 0, 2]), torch.tensor([1, 2, 3, 4])
    negs = torch.tensor([5, 6, 7])
    args = (users, pos_query, items[pos_items], pos_items, items[negs], negs, log_q, 0.5)
    per_positive = []
    for q, p in zip(pos_query.tolist(), pos_items.tolist(), strict=True):
        cands = [p, *negs.tolist()]
        logits = torch.stack([users[q] @ items[c] / 0.5 - log_q[c] - np.log(3) for c in cands])
        per_positive.append(-torch.log_softmax(logits, 0)[0])
    nll = torch.stack(per_positive)
    torch.testing.assert_close(sampled_softmax(*args), nll.mean())
    # Query 0 (three positives) and query 2 (one) count once each; query 1 has none.
    torch.testing.assert_close(
        sampled_softmax(*args, per_query=True), (nll[:3].mean() + nll[3]) / 2
    )


def test_pairwise_rank_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    pos, pos_q = torch.randn(5, generator=g), torch.tensor([0, 0, 1, 2, 2])
    neg, neg_q = torch.randn(6, generator=g), torch.tensor([0, 1, 1, 1, 3, 0])
    got = pairwise_rank(pos, pos_q, neg, neg_q, n_queries=4)
    per_query = []
    for q in range(4):
        pairs = [
            torch.nn.functional.softplus(n - p)
            for p, pq in zip(pos, pos_q, strict=True)
            if pq == q
            for n, nq in zip(neg, neg_q, strict=True)
            if nq == q
        ]
        if pairs:
            per_query.append(torch.stack(pairs).mean())
    torch.testing.assert_close(got, torch.stack(per_query).mean())


def test_negative_sampler_never_draws_padding():
    sampler = NegativeSampler(np.array([0, 5, 0, 1, 100], dtype=float))
    draws = sampler.sample(5000, generator=torch.Generator().manual_seed(0))
    assert draws.min() >= 1 and set(draws.tolist()) == {1, 2, 3, 4}


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["sessionrec", "sasrec"])
def test_train_save_load_round_trip_scores_identically(ds, tmp_path, kind):
    registry = Registry(tmp_path / "artifacts")
    cfg = TrainConfig(**{**TINY.to_dict(), "model": kind})
    trained = train_and_save(ds, cfg, registry, promote=True, progress=False)
    assert registry.current() == trained.version
    assert trained.metrics["best_epoch"] >= 1
    assert {"recall@50", "ndcg@50", "hr@50"} <= set(trained.metrics["test"])
    loaded = open_model(registry.root)
    assert loaded.kind == kind and loaded.item_ids == ds.item_ids
    torch.testing.assert_close(loaded.item_vectors, loaded.model.item_vectors())
    rows = evaluate_models(ds, registry, ["current"], progress=False)
    assert rows[f"{kind}@{trained.version}"] == pytest.approx(trained.metrics["test"], nan_ok=True)


def test_user_fraction_trains_on_a_seeded_share_of_the_users(ds):
    base = {**TINY.to_dict(), "epochs": 1, "min_epochs": 1, "batch_size": 8}
    full = train(TrainConfig(**base), ds, progress=False)
    quarter = train(TrainConfig(**{**base, "user_fraction": 0.25}), ds, progress=False)
    n_users = len(train_users(ds))
    assert full.history[0]["steps"] == -(-n_users // 8)
    assert quarter.history[0]["steps"] == -(-round(n_users * 0.25) // 8)
    with pytest.raises(ValueError, match="user_fraction"):
        TrainConfig(user_fraction=0.0)


def test_loading_refuses_a_tampered_weight_file(ds, tmp_path):
    registry = Registry(tmp_path / "artifacts")
    trained = train_and_save(
        ds, TrainConfig(**{**TINY.to_dict(), "epochs": 1}), registry, progress=False
    )
    weights = registry.path(trained.version) / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=WEIGHTS):
        open_model(registry.root, trained.version)


def test_loading_refuses_vectors_of_the_wrong_shape(ds, tmp_path):
    from safetensors.torch import save

    from model_store.artifacts import ArtifactWriter

    registry = Registry(tmp_path / "artifacts")
    trained = train_and_save(
        ds, TrainConfig(**{**TINY.to_dict(), "epochs": 1}), registry, progress=False
    )
    src = registry.path(trained.version)
    bad = "sessionrec-bad"
    with ArtifactWriter(registry.root / bad, version=bad, kind="sessionrec") as w:
        for name in ("config.json", "model.safetensors", "id_map.json", "metrics.json"):
            w.write_bytes(name, (src / name).read_bytes())
        w.write_bytes(ITEM_VECTORS, save({"vectors": torch.zeros(3, 16)}))
    with pytest.raises(ArtifactError, match="shape"):
        open_model(registry.root, bad)


def test_sessionrec_recovers_planted_structure_better_than_popularity():
    """The synthetic planted structure is learnable: a short training run clearly beats
    popularity on next-session Recall@50 (the full-size run is in docs/RESULTS.md)."""
    data = prepare("synthetic", n_users=800, n_items=600, n_topics=10, seed=3)
    result = train(
        TrainConfig(
            dim=32,
            n_layers=1,
            epochs=4,
            batch_size=32,
            n_negatives=256,
            lr=5e-3,
            warmup_steps=10,
            device="cpu",
            seed=0,
        ),
        data,
        progress=False,
    )
    task = build_task(result.config, result.model, data, torch.device("cpu"))
    model = evaluate(task, data, Split.TEST)
    popularity = evaluate(PopularityScorer(data), data, Split.TEST)
    assert model["recall@50"] > 1.3 * popularity["recall@50"], (model, popularity)
    assert model["ndcg@50"] > 1.3 * popularity["ndcg@50"]


def test_results_json_is_plain_json(ds, tmp_path):
    from training.pipeline import write_results

    rows = evaluate_models(ds, None, [], progress=False)
    write_results(tmp_path / "r.json", rows, split=Split.TEST, ds=ds)
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["split"] == "test" and "popularity" in payload["rows"]


def test_recent_items_baseline_ranks_the_users_latest_history_item_first(ds):
    from training.tasks import RecentItemsScorer

    users = eval_users(ds, Split.TEST)[:5]
    scores = RecentItemsScorer(ds).score(users, Split.TEST)
    for b, u in enumerate(users):
        _, end, _ = history_range(ds, int(u), Split.TEST)
        last_items, _ = ds.session(end - 1)
        assert int(scores[b].argmax()) == int(last_items[-1])


@pytest.mark.realdata
@pytest.mark.parametrize("source", ["taobao", "mind"])
def test_both_models_train_and_evaluate_end_to_end_on_real_data(source, tmp_path):
    from training.loaders import datasets_dir

    folder = {"taobao": "taobao_userbehavior_subset", "mind": "mind_small_subset"}[source]
    if not (datasets_dir() / folder).is_dir():
        pytest.skip(f"../shared/datasets not found: {datasets_dir() / folder} is absent")
    data = prepare(source)
    registry = Registry(tmp_path / "artifacts")
    refs = []
    for kind in ("sessionrec", "sasrec"):
        cfg = TrainConfig(**{**TINY.to_dict(), "model": kind, "epochs": 1, "val_users": 200})
        refs.append(train_and_save(data, cfg, registry, progress=False).version)
    rows = evaluate_models(data, registry, refs, progress=False)
    assert len(rows) == 4
    for metrics in rows.values():
        assert metrics["users"] == len(eval_users(data, Split.TEST)) > 0
        assert 0.0 <= metrics["recall@50"] <= metrics["recall@100"] <= 1.0
        assert metrics["auc"] is not None  # both datasets have shown negatives


def test_early_stopping_restores_the_best_validation_epoch(ds):
    cfg = TrainConfig(**{**TINY.to_dict(), "epochs": 6, "patience": 1, "min_epochs": 1, "lr": 0.05})
    result = train(cfg, ds, progress=False)
    recalls = [h["val"]["recall@50"] for h in result.history]
    assert result.best_epoch == 1 + int(np.argmax(recalls))
    # Stopped one epoch after the best stopped improving (or ran out of epochs).
    assert len(recalls) == min(cfg.epochs, result.best_epoch + cfg.patience)
    task = build_task(cfg, result.model, ds, torch.device("cpu"))
    again = evaluate(task, ds, Split.VAL)  # every VAL user was used (val_users >= their count)
    assert again["recall@50"] == pytest.approx(result.val_metrics["recall@50"])


def test_without_validation_users_training_keeps_the_last_epoch():
    data = prepare("synthetic", n_users=40, n_items=60, n_topics=4, sessions_per_user=3.0)
    # Drop every held-out session from the split: nobody has VAL/TEST.
    from dataclasses import replace

    data = replace(data, sess_split=np.zeros_like(data.sess_split))
    result = train(
        TrainConfig(**{**TINY.to_dict(), "epochs": 3, "patience": 1}), data, progress=False
    )
    assert result.best_epoch == 3 and len(result.history) == 3


def test_evaluating_on_a_differently_split_dataset_is_refused(ds, tmp_path):
    from dataclasses import replace

    registry = Registry(tmp_path / "artifacts")
    cfg = TrainConfig(**{**TINY.to_dict(), "epochs": 1})
    train_and_save(ds, cfg, registry, promote=True, progress=False)
    resplit = replace(ds, sess_split=np.zeros_like(ds.sess_split))  # same items, other split
    with pytest.raises(ValueError, match="different prepared dataset"):
        evaluate_models(resplit, registry, ["current"], progress=False)
