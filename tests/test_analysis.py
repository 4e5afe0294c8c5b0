"""smoe_fast.analysis on small inputs with known answers, and the paper's separability protocol."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from smoe_fast import analysis


def _blobs(num_classes=4, per_class=100, dim=8, spread=0.05, seed=0):
    """Well-separated Gaussian blobs: features [N, dim], labels [N] (class c centred on 3 * e_c)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    centres = 3.0 * np.eye(num_classes, dim)
    return centres[labels] + spread * rng.standard_normal((labels.size, dim)), labels


# --- import cost -------------------------------------------------------------------------------------

def test_import_does_not_load_sklearn_or_matplotlib():
    code = ("import sys, smoe_fast, smoe_fast.vae.reproduce; smoe_fast.analysis, smoe_fast.figures; "
            "bad = [m for m in ('sklearn', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- counts, usage, active experts, sparsity ---------------------------------------------------------

def test_counts_and_usage():
    idx = torch.tensor([0, 2, 2, 2, 4])
    assert analysis.expert_counts(idx, 6).tolist() == [1, 0, 3, 0, 1, 0]
    np.testing.assert_allclose(analysis.expert_usage(idx, 6), [0.2, 0, 0.6, 0, 0.2, 0])
    assert analysis.expert_usage(torch.empty(0, dtype=torch.long), 3).tolist() == [0, 0, 0]   # no samples


def test_expert_counts_rejects_out_of_range():
    with pytest.raises(ValueError, match="num_experts=3"):
        analysis.expert_counts([0, 3], 3)


def test_active_experts_threshold_is_inclusive():
    idx = [0] * 10 + [1] * 9 + [2] * 30   # expert 0 exactly at the threshold, 1 one short, 3 empty
    assert analysis.active_experts(idx, 4) == 2
    assert analysis.active_experts(idx, 4, min_wins=9) == 3
    assert analysis.network_sparsity(idx, 4) == 0.5


def test_active_experts_subsample_is_the_authors_count():
    # 20,000 samples, expert 3 wins 12 of them: >= 10 over the whole set, ~4 expected in 6,700.
    idx = np.zeros(20_000, dtype=np.int64)
    idx[:10_000] = 1
    idx[10_000:10_012] = 3
    assert analysis.active_experts(idx, 5) == 3
    assert analysis.active_experts_subsample(idx, 5, n=6_700, seed=0) == 2
    assert analysis.active_experts_subsample(idx, 5, n=50_000) == 3            # N <= n: every sample
    assert analysis.active_experts_subsample(idx, 5, seed=1) == analysis.active_experts_subsample(idx, 5, seed=1)


# --- contingency table --------------------------------------------------------------------------------

def test_contingency_table_sums():
    rng = np.random.default_rng(0)
    labels, idx = rng.integers(0, 5, 300), rng.integers(0, 7, 300)
    table = analysis.contingency_table(labels, idx, num_classes=5, num_experts=7)
    assert table.shape == (5, 7) and table.sum() == 300
    assert table.sum(1).tolist() == np.bincount(labels, minlength=5).tolist()
    assert table.sum(0).tolist() == analysis.expert_counts(idx, 7).tolist()
    assert table[labels[0], idx[0]] >= 1


def test_contingency_table_known_and_inferred_sizes():
    assert analysis.contingency_table([0, 0, 1], [2, 2, 0]).tolist() == [[0, 0, 2], [1, 0, 0]]
    with pytest.raises(ValueError, match="same length"):
        analysis.contingency_table([0, 1], [0])


# --- linear separability: the paper's protocol --------------------------------------------------------

def test_separable_assignment_scores_one():
    x, y = _blobs()
    assert analysis.linear_separability(x, y) == 1.0
    assert analysis.linear_separability(torch.from_numpy(x).float(), torch.from_numpy(y)) == 1.0


def test_random_assignment_is_near_chance():
    x, _ = _blobs(num_classes=4, per_class=500)
    random_targets = np.random.default_rng(1).integers(0, 4, x.shape[0])
    assert abs(analysis.linear_separability(x, random_targets) - 0.25) < 0.06


def test_separability_matches_direct_sklearn_protocol():
    # Overlapping blobs so the accuracy is not trivially 1: any deviation from the protocol shows.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = _blobs(num_classes=5, per_class=120, spread=1.5, seed=3)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=42)
    expected = LogisticRegression(max_iter=1000, random_state=42).fit(x_train, y_train).score(x_test, y_test)
    got = analysis.linear_separability(x, y)
    assert got == pytest.approx(expected, abs=0)
    assert 0.3 < got < 1.0


def test_separability_uses_10000_seeded_samples_from_every_class():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    # Ordered by class (as QuickDraw's test set is): the first 10,000 would miss class 2 entirely.
    x, y = _blobs(num_classes=3, per_class=5_000, spread=2.0, seed=4)
    rows = np.sort(np.random.default_rng(42).permutation(y.size)[:10_000])
    xs, ys = x[rows], y[rows]
    assert set(ys.tolist()) == {0, 1, 2}
    x_train, x_test, y_train, y_test = train_test_split(xs, ys, test_size=0.2, stratify=ys, random_state=42)
    expected = LogisticRegression(max_iter=1000, random_state=42).fit(x_train, y_train).score(x_test, y_test)
    assert analysis.linear_separability(x, y) == pytest.approx(expected, abs=0)


def test_separability_drops_singleton_targets_and_handles_one_class():
    x, y = _blobs(num_classes=3, per_class=50)
    y_with_singleton = y.copy()
    y_with_singleton[0] = 9   # a target with one member cannot be stratified: that sample is dropped
    assert analysis.linear_separability(x, y_with_singleton) == analysis.linear_separability(x[1:], y[1:])
    assert analysis.linear_separability(x, np.zeros_like(y)) == 1.0   # one expert wins everything
    with pytest.raises(ValueError, match="none"):
        analysis.linear_separability(x[:3], np.arange(3))
    with pytest.raises(ValueError, match="features must be"):
        analysis.linear_separability(x[:10], y[:9])


# --- agreement, sub-styles ----------------------------------------------------------------------------

def test_agreement_of_identical_labelings_is_one():
    labels = np.repeat(np.arange(4), 25)
    renamed = (labels + 2) % 4   # same partition, different names
    scores = analysis.clustering_agreement(renamed, labels)
    assert scores["ami"] == pytest.approx(1.0) and scores["nmi"] == pytest.approx(1.0)
    assert scores["purity"] == 1.0


def test_agreement_of_independent_labelings_is_near_zero():
    rng = np.random.default_rng(0)
    scores = analysis.clustering_agreement(rng.integers(0, 5, 5000), rng.integers(0, 5, 5000))
    assert abs(scores["ami"]) < 0.01


def test_compare_experts_with_labels():
    x, labels = _blobs(num_classes=4, per_class=100)
    experts = labels // 2   # experts merge class pairs: still separable, purity 0.5
    result = analysis.compare_experts_with_labels(x, experts, labels)
    assert result["separability_experts"] == 1.0 and result["separability_labels"] == 1.0
    assert result["chance_experts"] == 0.5 and result["chance_labels"] == 0.25
    assert result["purity"] == 0.5 and 0 < result["ami"] < 1


def test_substyle_recovery_prefers_substyles_when_experts_split_them():
    labels = np.repeat(np.arange(3), 40)
    substyles = np.tile(np.repeat([0, 1], 20), 3)   # per-class numbering 0, 1
    experts = labels * 2 + substyles                # one expert per (class, sub-style)
    result = analysis.substyle_recovery(experts, labels, substyles)
    assert result["num_substyles"] == 6
    assert result["ami_substyles"] == pytest.approx(1.0) and result["purity_substyles"] == 1.0
    assert result["ami_classes"] < result["ami_substyles"] and result["purity_classes"] == 1.0


# --- per-expert separability, most exciting inputs ----------------------------------------------------

def test_per_expert_separability():
    x, labels = _blobs(num_classes=4, per_class=60)
    experts = np.where(labels < 2, 0, labels - 1)   # expert 0 holds classes 0+1, experts 1, 2 one class each
    rows = analysis.per_expert_separability(x, experts, labels, num_experts=4)
    assert [r["wins"] for r in rows] == [120, 60, 60, 0]
    assert rows[0]["class_separability"] == 1.0 and rows[0]["purity"] == 0.5 and rows[0]["num_classes"] == 2
    assert math.isnan(rows[1]["class_separability"]) and rows[1]["purity"] == 1.0 and rows[1]["top_class"] == 2
    assert rows[1]["expert_vs_rest"] == 1.0
    assert rows[3]["wins"] == 0 and math.isnan(rows[3]["purity"]) and math.isnan(rows[3]["expert_vs_rest"])


def test_most_exciting_inputs_order():
    gates = torch.tensor([[0.6, 0.4, 0.0],
                          [0.9, 0.1, 0.0],
                          [0.2, 0.8, 0.0],
                          [0.6, 0.4, 0.0],    # ties with sample 0: lower index first
                          [0.7, 0.3, 0.0]])
    top = analysis.most_exciting_inputs(gates, gates.argmax(1), k=3)
    assert [t.tolist() for t in top] == [[1, 4, 0], [2], []]
    assert analysis.most_exciting_inputs(gates, gates.argmax(1), k=10)[0].tolist() == [1, 4, 0, 3]


# --- the full report ----------------------------------------------------------------------------------

def test_expert_report_is_json_ready():
    import json
    from types import SimpleNamespace

    x, labels = _blobs(num_classes=3, per_class=40)
    gates = torch.softmax(torch.from_numpy(x[:, :3]).float() * 5, dim=1)
    ev = SimpleNamespace(sse_per_image=12.5, kl_per_image=3.0, expert_idx=gates.argmax(1),
                         labels=torch.from_numpy(labels), z=torch.from_numpy(x).float(), gates=gates)
    report = analysis.expert_report(ev, 5, substyles=np.zeros_like(labels))
    json.dumps(report, allow_nan=False)
    assert report["active_experts"] == 3 and report["network_sparsity"] == 0.6
    assert np.array(report["contingency"]).sum() == 120 and len(report["per_expert"]) == 5
    assert report["separability_experts"] == 1.0
