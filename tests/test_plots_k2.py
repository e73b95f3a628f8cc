"""The report's divergence figure draws every line once (issue 21, item 8): for a K = 2 cohort
JS and agreement, the same both ways, are one line per pair (they were two, on top of each
other); KL, which differs with the order, keeps both directions, each labelled. The figure's
data and legend, not its pixels."""

from __future__ import annotations

from pathlib import Path

from dml_cluster.plots import divergence_figure, divergence_series
from dml_cluster.run_folder import RunLogs


def _logs(peers: list[str]) -> RunLogs:
    """Two logged steps and one evaluation; KL differs with the order, JS and agreement not."""

    def pair(a: str, b: str, step: int) -> dict[str, float]:
        ia, ib = peers.index(a), peers.index(b)
        return {"kl": 0.1 * (1 + ia) + 0.01 * ib + step, "js": 0.05 * (ia + ib) + step,
                "agreement": 0.9 - 0.01 * (ia + ib)}  # fmt: skip

    train = {
        a: [{"step": s, "pairs": {b: pair(a, b, s) for b in peers if b != a}} for s in (0, 10)]
        for a in peers
    }
    tested = {f"{a}|{b}": pair(a, b, 20) for a in peers for b in peers if a != b}
    evals = [{"epoch": 1, "step": 20, "peers": {}, "pairs": tested}]
    return RunLogs(Path("run"), evals, train, None, peers)


def test_a_pair_of_peers_draws_js_and_agreement_once_and_kl_both_ways() -> None:
    logs = _logs(["a", "b"])
    series = divergence_series(logs)
    labels = {key: [s.label for s in lines] for key, lines in series.items()}
    assert labels["js"] == ["a ↔ b (train)", "a ↔ b (test)"]
    assert labels["agreement"] == ["a ↔ b (train)", "a ↔ b (test)"]
    assert labels["kl"] == ["a ← b (train)", "a ← b (test)", "b ← a (train)", "b ← a (test)"]
    kl = {s.label: s.values for s in series["kl"]}
    assert kl["a ← b (train)"] == [0.11, 10.11] and kl["b ← a (train)"] == [0.2, 10.2]
    assert kl["a ← b (test)"] == [20.11] and kl["b ← a (test)"] == [20.2]
    (js_train, _) = series["js"]
    assert js_train.steps == [0, 10] and js_train.values == [0.05, 10.05]
    assert [s.values for s in series["agreement"]] == [[89.0, 89.0], [89.0]]
    # the two KL directions in their own colours; the figure's legends name each line once
    assert len({s.colour for s in series["kl"]}) == 2
    figure = divergence_figure(logs)
    assert figure is not None
    kl_ax, js_ax, agree_ax = figure.axes[:3]
    assert kl_ax.get_legend_handles_labels()[1] == labels["kl"]
    assert js_ax.get_legend_handles_labels()[1] == labels["js"]
    assert agree_ax.get_legend_handles_labels()[1] == labels["agreement"]


def test_three_peers_draw_three_pairs_of_symmetric_lines_and_six_kl_directions() -> None:
    series = divergence_series(_logs(["a", "b", "c"]))
    trained = {key: [s.label for s in lines if s.split == "train"] for key, lines in series.items()}
    assert trained["js"] == ["a ↔ b (train)", "a ↔ c (train)", "b ↔ c (train)"]
    assert len(trained["kl"]) == 6 and len(set(trained["kl"])) == 6
    assert divergence_figure(_logs(["a"])) is None
