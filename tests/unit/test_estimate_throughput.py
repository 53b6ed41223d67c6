"""tools/estimate_throughput.py: the planning arithmetic against hand computations."""
from __future__ import annotations

from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture()
def est(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    import estimate_throughput

    return estimate_throughput


def test_one_node_step_by_hand(est):
    teacher = est.Model(params=2e9, layers=2, hidden=64, vocab=1000, bytes_per_token=4.0)
    student = est.Model(params=1e9, layers=2, hidden=64, vocab=100, bytes_per_token=2.0)
    cluster = est.Cluster(gpus_per_node=4, nodes=1, intra_gbps=100.0, inter_gbps=10.0)
    e = est.step_estimate(teacher, student, cluster, windows=2, window_bytes=4000, efficiency=0.5, placement="zero3")
    t_tok, s_tok = 2000, 4000
    flops = 2 * 2e9 * t_tok + 6 * 1e9 * s_tok
    compute = flops / (0.5 * 989e12) + 2 * t_tok * 1000 * 4 / 4.8e12
    assert e["compute_s"] == pytest.approx(compute)
    assert e["comm_s"]["student_zero3"] == pytest.approx(6e9 * 0.75 / 100e9)  # 3 x bf16 params, 3/4 sent
    assert e["comm_s"]["teacher_zero3"] == pytest.approx(4e9 * 0.75 / 100e9)
    serial = compute + (6e9 + 4e9) * 0.75 / 100e9
    assert e["serial"]["step_s"] == pytest.approx(serial)
    assert e["serial"]["tokens_per_s"] == pytest.approx(s_tok / serial)
    assert e["overlapped"]["mfu"] == pytest.approx(flops / max(compute, serial - compute) / 989e12)
    replicated = est.step_estimate(teacher, student, cluster, 2, 4000, 0.5, "replicate")
    assert replicated["comm_s"]["teacher_zero3"] == 0.0
    # several nodes: the inter-node link bounds the ring; ZeRO++ cuts that volume 4x
    multi = est.Cluster(gpus_per_node=4, nodes=2, intra_gbps=100.0, inter_gbps=10.0)
    e2 = est.step_estimate(teacher, student, multi, 2, 4000, 0.5, "zero3")
    assert e2["comm_s"]["student_zero3"] == pytest.approx(6e9 * 7 / 8 / 10e9)
    e3 = est.step_estimate(teacher, student, multi, 2, 4000, 0.5, "zero3", zero_pp=True)
    assert e3["comm_s"]["student_zero3"] == pytest.approx(e2["comm_s"]["student_zero3"] / 4)
    # a measured plain loop replaces the compute estimate
    e4 = est.step_estimate(teacher, student, cluster, 2, 4000, 0.5, "zero3", plain_tokens_per_s=8000.0)
    assert e4["compute_s"] == pytest.approx(0.5)


def test_the_table_prints_every_placement(est, capsys):
    assert est.main(["--pair", "qwen2-1.5b:llama-1b", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("replicate") == 3 and out.count("zero3") == 3  # 1 node: 1 row each; 2 nodes: +/- ZeRO++
    with pytest.raises(SystemExit):
        est.main(["--pair", "gpt5:llama-1b"])
