"""Sampled rows (bus.encoding: sampled; dml_cluster/sparse_rows.py) and their estimator
(dml_cluster/losses_sparse.py), the bias of top-k, the encodings' bookkeeping, and evaluation
exchanged in chunks.

- Round trips: the zmq wire and the torch transport's payload give back what the sender drew.
- The draw: counter-based, seeded by (run.seed, step, round, peer) and the row: the same rows draw
  the same ids whatever the chunking and the process; another key, other ids.
- The statistical test: over 400 seeds the sampled estimator's gradient w.r.t. the receiver's
  logits averages to the dense KL's gradient (a z-test on every logit, tolerance below).
- Top-k's bias, measured: the KL gradient towards top-k rows (the rest spread evenly) against
  the dense one, 256 rows of C = 100 (logits randn * 3; top-5 keeps 79% of the mass, top-16
  94%): relative L2 bias 0.102 for k = 5, 0.022 for k = 16. It does not average away. One draw
  of sampled-12 errs by 0.43 (relative L2, mean over 8 seeds), all of it variance: the mean of
  64 draws' gradients is 0.054 off (0.43 / sqrt(64)). BENCHMARKS.md quotes these numbers.
- Bad settings are one config-error line; /metrics serves bytes per exchange and kept mass.
One process vs processes, bitwise, with sampled rows: tests/test_multiprocess.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dml_cluster import losses, losses_sparse
from dml_cluster.bus import EVAL_ROUND, BusStats, StepKey
from dml_cluster.bus.encoding import FLOAT32, payload_bytes, rows_from_bytes
from dml_cluster.bus.local import LocalBus
from dml_cluster.bus.wire import SAMPLED, Header, Kind, WireError, decode, encode_sent
from dml_cluster.bus.wire import unpack_header as unpack
from dml_cluster.config import draw_temperatures, load_config, peer_temperatures
from dml_cluster.determinism import set_determinism
from dml_cluster.errors import ConfigError
from dml_cluster.evaluation import evaluate_cohort, predict
from dml_cluster.launch.transports import bus_encoding
from dml_cluster.metrics import events
from dml_cluster.metrics.events import PeerStep, StepEvent
from dml_cluster.metrics.exporter import PrometheusExporter
from dml_cluster.metrics.progress import ProgressDisplay, RunningCrossEntropy
from dml_cluster.sparse_rows import (
    Sampled,
    densify,
    draw_key,
    encode_sampled,
    encode_topk,
    log_prob_at,
)
from dml_cluster.trainer import CohortTrainer, Placement

from .cohort_runs import REPO
from .metrics_helpers import parse, scrape, value

RUN = b"run-0001"
CONFIG = REPO / "configs/digits-dml.yaml"


def _log_p(rows: int, classes: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(torch.randn(rows, classes, generator=g) * scale, dim=1)


# -- the rows and their round trips ---------------------------------------------------------


def test_sampled_rows_hold_distinct_ids_with_counts_and_the_drawn_log_probabilities() -> None:
    log_p = _log_p(64, 300)
    rows = encode_sampled(log_p, 12, 2.0, draw_key(0, 5, 0, 1))
    assert rows.indices.dtype == torch.int16 and rows.counts.dtype == torch.uint8
    assert rows.values.dtype == torch.bfloat16 and rows.indices.shape == (64, 12)
    rows.check()  # ids in 0..C-1, counts >= 0 adding up to n a row
    wide = rows.widened()
    drawn = wide.drawn()
    log_q = torch.log_softmax(log_p / 2.0, dim=1)  # drawn at T = 2
    assert torch.equal(wide.values[drawn], log_q.gather(1, wide.indices)[drawn].bfloat16().float())
    assert torch.equal(wide.counts.sum(dim=1), torch.full((64,), 12))
    for r in range(64):  # distinct ids first, ascending, then padding (id 0, count 0)
        ids = wide.indices[r][drawn[r]]
        assert torch.equal(ids, ids.unique()) and not drawn[r][int(drawn[r].sum()) :].any()
    assert 1 <= float(rows.distinct().float().mean()) <= 12
    assert rows.samples == 12
    # densified, the drawn ids keep their own probability and the rest is spread evenly
    dense = densify(rows)
    # tolerance: bf16 values on the wire, summed in float32
    assert torch.allclose(dense.exp().sum(dim=1), torch.ones(64), atol=1e-5)  # float32 rounding


def test_sampled_rows_round_trip_through_the_zmq_wire_and_the_torch_payload() -> None:
    rows = encode_sampled(_log_p(5, 40_000), 300, 1.0, draw_key(1, 2, 0, 0), torch.float16)
    fields, body = encode_sent(rows)
    assert fields == dict(encoding=SAMPLED, rows=5, cols=300, values=2, classes=40_000)
    assert body.numel() == 5 * 300 * (4 + 2 + 2)  # int32 ids, int16 counts, float16 values
    header = unpack(Header(Kind.DATA, run_id=RUN, step=3, round=0, sender_rank=1, sender_peer=1,
                           fingerprint=9, **fields).pack())  # fmt: skip
    for got in (
        decode(header, body.numpy().tobytes()),  # the zmq wire
        rows_from_bytes("sampled", payload_bytes(rows), 5, 300, 40_000, torch.float16).widened(),
    ):  # fmt: skip
        assert isinstance(got, Sampled) and got.num_classes == 40_000
        assert torch.equal(got.indices, rows.indices.long())
        assert torch.equal(got.counts, rows.counts.long())
        assert torch.equal(got.values, rows.values.float())


def _sampled_message(body_change: slice | None = None, value: int = 0) -> tuple[Header, bytes]:
    rows = encode_sampled(_log_p(3, 10), 4, 1.0, draw_key(0, 0, 0, 0))  # uint8 ids and counts
    fields, body = encode_sent(rows)
    raw = bytearray(body.numpy().tobytes())
    if body_change is not None:
        raw[body_change] = bytes([value])
    header = Header(Kind.DATA, run_id=RUN, step=3, round=0, sender_rank=1, sender_peer=1,
                    fingerprint=9, **fields)  # fmt: skip
    return unpack(header.pack()), bytes(raw)


@pytest.mark.parametrize(
    ("where", "value", "reason"),
    [(slice(0, 1), 10, "sampled id outside 0..9"),  # the first id: class 10 of 10
     (slice(12, 13), 9, "counts that do not add up to 4"),  # the first count
     (slice(12, 13), 0, "counts that do not add up to 4")],
)  # fmt: skip
def test_malformed_sampled_payloads_are_refused(where: slice, value: int, reason: str) -> None:
    """(Dropped and counted by a running bus like any malformed message: test_wire.py.)"""
    header, body = _sampled_message(where, value)
    with pytest.raises(WireError, match=reason):
        decode(header, body)
    with pytest.raises(WireError, match="sampled rows of 0 draws"):
        unpack(Header(Kind.DATA, SAMPLED, RUN, 3, 0, 1, 1, 9, 3, 0, 3, 10).pack())


# -- the draw -------------------------------------------------------------------------------


def test_the_draw_is_a_function_of_its_key_and_rows_only(monkeypatch) -> None:
    """Same key and rows: the same ids, whatever the chunking (rows are drawn in chunks bounded
    in memory); another seed, step, round or peer: other ids. No global random state is read
    or changed."""
    log_p = _log_p(40, 50)
    key = draw_key(7, 3, 0, 1)
    state = torch.get_rng_state()
    whole = encode_sampled(log_p, 12, 1.0, key)
    assert torch.equal(torch.get_rng_state(), state)
    monkeypatch.setattr("dml_cluster.sparse_rows._CHUNK_ELEMENTS", 3 * 50)  # 3 rows a chunk
    chunked = encode_sampled(log_p, 12, 1.0, key)
    assert torch.equal(whole.indices, chunked.indices)
    assert torch.equal(whole.counts, chunked.counts)
    for other in (draw_key(8, 3, 0, 1), draw_key(7, 4, 0, 1), draw_key(7, 3, 1, 1),
                  draw_key(7, 3, 0, 2)):  # fmt: skip
        assert not torch.equal(encode_sampled(log_p, 12, 1.0, other).indices, whole.indices)


def test_a_peer_draws_at_its_receivers_temperature_and_evaluations_at_one() -> None:
    cfg = load_config(CONFIG, ["bus.encoding=sampled", "bus.samples=12", "method.temperature=3"])
    encoding = bus_encoding(cfg)
    assert encoding.temperatures == (3.0, 3.0) and encoding.seed == cfg.run.seed
    assert encoding.temperature(StepKey(4, 0, 1), 0) == 3.0
    assert encoding.temperature(StepKey(4, EVAL_ROUND + 2, 1), 0) == 1.0
    log_p = _log_p(8, 10)
    sent = encoding.send(log_p, StepKey(4, 0, 1), 1)
    expected = encode_sampled(log_p, 12, 3.0, draw_key(cfg.run.seed, 4, 0, 1))
    assert torch.equal(sent.indices, expected.indices)
    assert torch.equal(sent.values, expected.values)
    # KD: teachers drawn at the KD temperature, students at 1 (DML among students, peer_weight)
    assert draw_temperatures({"teacher": {4.0}, "student": {1.0}}) == {
        "teacher": 4.0,
        "student": 1.0,
    }
    assert draw_temperatures({}) == {"teacher": 1.0, "student": 1.0}
    assert peer_temperatures(load_config(CONFIG)) == (1.0, 1.0)


def test_receivers_of_one_sender_at_two_temperatures_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        draw_temperatures({"student": {1.0, 4.0}})
    assert str(err.value) == (
        "config error: bus.encoding: sampled draws each peer's ids at the temperature its "
        "receivers distil at, but the students' predictions are read at 1 and 4 (use one "
        "temperature, or topk)"
    )


# -- the estimator: unbiased, and top-k's bias -----------------------------------------------


def _grad(loss_of, logits: torch.Tensor) -> torch.Tensor:
    z = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_of(z), z)
    return g


SEEDS = 400


@pytest.mark.parametrize("integer", [False, True], ids=["float-cdf", "int64-cdf"])
def test_the_sampled_estimator_is_unbiased_for_the_gradient_wrt_the_receivers_logits(
    integer: bool,
) -> None:
    """Over SEEDS runs (run.seed = 0..399), the gradient of DML's term (T = 2, n = 4 draws of
    C = 10) towards sampled rows averages to the dense term's gradient; with either cumulative
    sum of the draw (float32, the CPU's; int64, a GPU's).

    Tolerance: a z-test per logit: |mean - dense| <= 5 standard errors (the empirical standard
    deviation over seeds / sqrt(SEEDS)), on each of the 60 logits. Under an unbiased estimator
    a |z| > 5 has probability 5.7e-7 per logit (3.4e-5 for any of 60, and the seeds are fixed,
    so the test is deterministic); top-k (k = 3), biased, fails the same test by far (below).
    """
    temperature, target = 2.0, _log_p(6, 10, seed=1, scale=2.0)
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(2))
    dense = _grad(lambda z: losses.mutual_kl(z, [target], temperature), logits)
    draws = torch.stack([
        _grad(lambda z, s=s: losses_sparse.mutual_kl(z, [encode_sampled(
            target, 4, temperature, draw_key(s, 0, 0, 1), torch.float32, integer)], temperature),
            logits)
        for s in range(SEEDS)
    ])  # fmt: skip
    z = (draws.mean(dim=0) - dense) / (draws.std(dim=0) / math.sqrt(SEEDS))
    assert float(z.abs().max()) < 5.0, z
    top3 = encode_topk(target, 3, torch.float32)
    biased = _grad(lambda z: losses_sparse.mutual_kl(z, [top3], temperature), logits)
    z_topk = (biased - dense) / (draws.std(dim=0) / math.sqrt(SEEDS))
    assert float(z_topk.abs().max()) > 10.0  # the test tells a biased estimator (19 here)


def test_topk_bias_is_measured() -> None:
    """Relative L2 distance of the top-k KL gradient (the rest spread evenly) from the dense
    one at C = 100 (peaked rows: randn * 3 logits), and one sampled-12 draw's RMS error (the
    numbers in the module's docstring and BENCHMARKS.md)."""
    target = _log_p(256, 100, seed=3)
    logits = torch.randn(256, 100, generator=torch.Generator().manual_seed(4))
    dense = _grad(lambda z: losses.mutual_kl(z, [target]), logits)
    bias = {
        k: float((_grad(lambda z, k=k: losses_sparse.mutual_kl(
            z, [encode_topk(target, k, torch.float32)]), logits) - dense).norm() / dense.norm())
        for k in (5, 16)
    }  # fmt: skip
    one_draw = [
        float((_grad(lambda z, s=s: losses_sparse.mutual_kl(z, [encode_sampled(
            target, 12, 1.0, draw_key(s, 0, 0, 0), torch.float32)]), logits) - dense).norm()
            / dense.norm())
        for s in range(8)
    ]  # fmt: skip
    # tolerance: the digits quoted
    assert round(bias[5], 3) == 0.102 and round(bias[16], 3) == 0.022, bias
    assert round(sum(one_draw) / len(one_draw), 2) == 0.43, one_draw


def test_sampled_dml_e_has_the_gradient_of_the_mean_of_the_members_estimators() -> None:
    """DML_e's probability ensemble of sampled peers: the gradient of KL(p_bar || q) estimated
    by the mixture of the members' draws (losses_sparse's docstring)."""
    peers = [
        encode_sampled(_log_p(8, 20, s), 6, 1.0, draw_key(0, 0, 0, s), torch.float32)
        for s in range(3)
    ]
    logits = torch.randn(8, 20)
    got = _grad(lambda z: losses_sparse.ensemble_kl(z, peers), logits)
    mixture = sum(densify_counts(p) for p in peers) / 3  # [rows, C] c / n, mixed
    expected = (torch.softmax(logits, dim=1) - mixture) / 8  # mean over 8 rows
    # tolerance: float32 sums in another order
    assert torch.allclose(got, expected, atol=1e-7)  # float32 rounding


def densify_counts(rows: Sampled) -> torch.Tensor:
    """[rows, C] counts / n (the empirical distribution of the draws)."""
    wide = rows.widened()
    out = torch.zeros(wide.indices.shape[0], wide.num_classes)
    return out.scatter_add_(1, wide.indices, wide.weights())


# -- settings ------------------------------------------------------------------------------

BAD_SETTINGS = {
    "bus.encoding=sampled": "bus: encoding sampled needs samples",
    "bus.encoding=sampled,bus.samples=0": "bus: samples must be at least 1, got 0",
    "bus.encoding=sampled,bus.samples=-3": "bus: samples must be at least 1, got -3",
    "bus.samples=12": "bus: samples is a setting of encoding sampled, not of float32",
    "bus.encoding=sampled,bus.samples=12,bus.k=3": "k is a setting of encoding topk",
    "bus.encoding=sampled,bus.samples=12,method.name=dkd": "sampled cannot be used with method",
    "bus.encoding=sampled,bus.samples=12,method.name=dml_js": "sampled cannot be used with method",
    "bus.encoding=sampled,bus.samples=12,method.name=dml_e,method.ensemble=logits": (
        "sampled cannot be used with method 'dml_e': dml_e's logit ensemble"
    ),
}


@pytest.mark.parametrize(("items", "words"), BAD_SETTINGS.items())
def test_bad_sampled_settings_are_one_config_error_line(items: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, items.split(","))
    message = str(err.value)
    assert "\n" not in message and message.startswith("config error: ") and words in message


def test_samples_decide_the_trained_numbers_so_they_are_hashed() -> None:
    hashes = {
        load_config(CONFIG, ["bus.encoding=sampled", f"bus.samples={n}"]).hash() for n in (4, 12)
    }
    assert len(hashes) == 2


# -- the engine: chunked evaluation, logs and metrics --------------------------------------


def test_the_running_cross_entropy_reads_sparse_rows_as_their_densified_rows_bitwise() -> None:
    """The progress line's cross-entropy from sparse rows (each row's log-probability at its
    label, read from the support) is, bit for bit, the one of the densified rows; unlabelled
    rows (-1) count for neither. Three steps of 2,000 values with room for 4,000: the first two
    summed as one batch, as the dense rows are (the large-C case, where few steps fit)."""
    log_p = _log_p(200, 20, seed=3)
    y = torch.randint(-1, 20, (200,), generator=torch.Generator().manual_seed(4))
    labels = y.clamp(min=0)
    for rows in (
        encode_topk(log_p, 4), encode_topk(log_p, 20), encode_sampled(log_p, 12, 1.0, 9),
        encode_sampled(log_p, 6, 2.0, 10),
    ):  # fmt: skip
        assert torch.equal(
            log_prob_at(rows, labels), densify(rows).gather(1, labels[:, None])[:, 0]
        )
        sparse, dense = RunningCrossEntropy(), RunningCrossEntropy()
        sparse.KEEP_VALUES = dense.KEEP_VALUES = 4000
        for half in (slice(0, 100), slice(100, 200), slice(100, 200)):
            tensors = {f.name: getattr(rows, f.name) for f in dataclasses.fields(rows)}
            part = dataclasses.replace(
                rows, **{k: t[half] for k, t in tensors.items() if k != "num_classes"}
            )
            sparse.add({0: part}, y[half])
            dense.add({0: densify(part)}, y[half])
        assert len(sparse.kept) == len(dense.kept) == 1
        assert sparse.means() == dense.means()


def test_evaluation_in_chunks_scores_what_one_message_scored(
    tmp_path: Path, restore_torch: None
) -> None:
    """The evaluation exchanges eval_batch_size rows at a time (4 chunks of the 360 test
    digits here), dense float32 under a top-k bus, and reports, bit for bit, what exchanging the
    whole [N, C] at once gave."""
    cfg = load_config(CONFIG, ["bus.encoding=topk", "bus.k=3", "data.eval_batch_size=100",
                               f"run.out_dir={tmp_path}"])  # fmt: skip
    set_determinism(cfg)
    bus = LocalBus(bus_encoding(cfg))
    trainer = CohortTrainer(cfg, bus, Placement((0, 1), torch.device("cpu"), True))
    got = trainer.evaluate(after_step=0)
    assert bus.stats.exchanges == 4
    parts, ys = {0: [], 1: []}, []
    for x, y in trainer.batches.test_batches():
        for i, p in trainer.peers.items():
            parts[i].append(predict(p.model, x, 100))
        ys.append(y)
    whole = {i: torch.cat(c) for i, c in parts.items()}
    key = StepKey(0, EVAL_ROUND, trainer.test_fingerprint)
    once = bus.exchange(key, whole, [0, 1], encoding=FLOAT32)
    named = {trainer.names[i]: once[i] for i in (0, 1)}
    assert got == evaluate_cohort(named, torch.cat(ys), 10, ensemble_of=trainer.names)


def test_a_sampled_wire_run_evaluates_the_models_own_predictions(
    tmp_path: Path, restore_torch: None
) -> None:
    """A one-process run over a sampled wire (2 draws a row) logs, bit for bit, the evaluation
    its final weights get over a dense float32 bus: the models' own predictions, not the rows
    the sampled wire would have carried (those score another NLL: checked below)."""
    cfg = load_config(CONFIG, ["bus.encoding=sampled", "bus.samples=2", "train.max_steps=2",
                               "data.eval_batch_size=100", "run.progress_every_s=3600",
                               "metrics.enabled=false", f"run.out_dir={tmp_path}"])  # fmt: skip
    set_determinism(cfg)
    run = CohortTrainer(
        cfg, LocalBus(bus_encoding(cfg)), Placement((0, 1), torch.device("cpu"), True)
    )
    run.run()
    logged = [json.loads(line) for line in (cfg.run.dir / "cohort.jsonl").read_text().splitlines()]
    final = [r for r in logged if r["event"] == "eval"][-1]
    again = CohortTrainer(cfg, LocalBus(FLOAT32), Placement((0, 1), torch.device("cpu"), True))
    try:
        for peer in again.peers.values():
            peer.model.load_state_dict(torch.load(cfg.run.dir / "final" / f"{peer.name}.pt"))
        own = again.evaluate(after_step=0)
        travelled = {i: [] for i in (0, 1)}  # what the sampled wire makes of the same rows
        for c, (x, _) in enumerate(again.batches.test_batches()):
            key = StepKey(0, EVAL_ROUND + c, again.test_fingerprint)
            for i, p in again.peers.items():
                rows = bus_encoding(cfg).as_received(predict(p.model, x, 100), key, i)
                travelled[i].append(densify(rows))
    finally:
        again.batches.close()
    for name in again.names:
        assert final["peers"][name]["nll"] == own["peers"][name]["nll"]
        assert final["peers"][name]["accuracy"] == own["peers"][name]["accuracy"]
    assert final["ensemble"]["nll"] == own["ensemble"]["nll"]
    as_travelled = evaluate_cohort(
        {again.names[i]: torch.cat(t) for i, t in travelled.items()},
        torch.cat([y for _, y in again.batches.test_batches()]), 10, ensemble_of=again.names,
    )  # fmt: skip
    assert all(as_travelled["peers"][n]["nll"] != own["peers"][n]["nll"] for n in again.names)


def test_bytes_per_exchange_and_kept_mass_are_logged_and_served(
    tmp_path: Path, restore_torch: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short one-process run with sampled rows logs each peer's kept mass and distinct ids;
    the exporter serves them and the bytes per exchange on its real /metrics endpoint. Its
    steps densify the received rows only where the run log reports (steps 0 and 2 of 3, for
    the batch statistics), though the progress line reads every step's cross-entropy."""
    cfg = load_config(CONFIG, ["bus.encoding=sampled", "bus.samples=12", "train.max_steps=3",
                               "run.log_every=2", "run.progress_every_s=3600",
                               "metrics.enabled=false", f"run.out_dir={tmp_path}"])  # fmt: skip
    set_determinism(cfg)
    densified: list[int] = []

    def counted(rows: Sampled) -> torch.Tensor:
        densified.append(rows.values.shape[0])
        return densify(rows)

    monkeypatch.setattr(events, "densify", counted)  # what a training step's event densifies
    trainer = CohortTrainer(
        cfg, LocalBus(bus_encoding(cfg)), Placement((0, 1), torch.device("cpu"), True)
    )
    assert any(isinstance(o, ProgressDisplay) for o in trainer.observers)
    trainer.run()
    assert densified == [cfg.data.batch_size] * 4  # 2 reporting steps x 2 peers
    records = [
        json.loads(line)
        for line in (cfg.run.dir / "peers" / "small_cnn-0.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r["event"] == "train"]
    assert len(train) == 2
    for r in train:
        assert 0 < r["kept_mass"] <= 1 and 1 <= r["distinct_ids"] <= 12
        assert r["bytes_sent_per_exchange"] == r["bytes_received_per_exchange"] == 0  # one process

    served = load_config(CONFIG, ["metrics.port=0", "metrics.address=127.0.0.1",
                                  "metrics.stats_every=1",
                                  f"run.out_dir={tmp_path / 'm'}"])  # fmt: skip
    exporter = PrometheusExporter(served, (0, 1), "0123456789abcdef", 0)
    try:
        for step, (sent, received, mass) in enumerate([(0, 0, 0.5), (3000, 5000, 0.7)]):
            bus = BusStats(bytes_sent=sent, bytes_received=received, exchanges=2 * step)
            peers = {i: PeerStep(0.05, None, None) for i in (0, 1)}
            event = StepEvent.of(step=step, epoch=0, batch_size=4, step_seconds=0.1, peers=peers,
                                 bus=bus)  # fmt: skip
            event.encoded = {
                0: {"kept_mass": torch.tensor(mass), "distinct_ids": torch.tensor(6.0)}
            }
            exporter.on_step(event)
        samples = parse(scrape(exporter.url))
    finally:
        exporter.close()
    peer = "small_cnn-0"
    assert value(samples, "dml_bus_sent_bytes_per_exchange", peer=peer) == 1500.0
    assert value(samples, "dml_bus_received_bytes_per_exchange", peer=peer) == 2500.0
    smoothing = served.metrics.smoothing
    kept = value(samples, "dml_encoding_kept_mass_ratio", peer=peer)
    # tolerance: float32 scalars read back as floats
    assert abs(kept - (smoothing * 0.5 + (1 - smoothing) * 0.7)) < 1e-6  # float32 rounding
    assert value(samples, "dml_encoding_distinct_ids", peer=peer) == 6.0
