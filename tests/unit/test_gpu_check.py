"""tools/gpu_check.py: its CPU mode end to end (slow), and its parts against independent references.

The end-to-end test runs `--device cpu --small`: the code paths of the GPU run (conversion against
log_softmax, the plain loop's four timed operations, the launched ZeRO-3 pipeline, its final save
and a resume) on tiny shapes, and checks the JSON. The other tests check the pieces the GPU
figures rest on: the MFU's FLOP count and peak table, the BPE folders built from ranks (against a
tiktoken-style merge loop written here, and against Tekken's own encoder), the float64 reference
of max |dp|, the final-save comparison (it must fail on a changed weight), the resume checks, and
that a failing part is recorded while the others still run.
"""
from __future__ import annotations

import datetime
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
GPU_CHECK = TOOLS / "gpu_check.py"
HEADLINE_KEYS = ("conversion_ratio", "step_ratio", "mfu", "plain_tokens_per_s", "pipeline_tokens_per_s",
                 "pipeline_over_plain", "pipeline_mfu", "pipeline_step_parts_s",
                 "final_save_ok", "resume_ok", "versions", "device_name", "date", "passed")


@pytest.fixture
def tools(monkeypatch):
    """tools/ on sys.path (the gpu_check modules import each other by name, as scripts do)."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import gpu_check
    import gpu_check_assets
    import gpu_check_pipeline
    import gpu_check_plain

    return type("Tools", (), dict(check=gpu_check, assets=gpu_check_assets, pipeline=gpu_check_pipeline,
                                  plain=gpu_check_plain))


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------------- the CPU run, end to end
@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, work = tmp / "gpu_check.json", tmp / "work"
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--device", "cpu", "--small", "--out", str(out),
                           "--workdir", str(work), "--keep-workdir"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    return proc, out, work


@pytest.mark.slow
def test_cpu_mode_passes_every_part_and_writes_sane_json(cpu_run):
    proc, out, work = cpu_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    for key in HEADLINE_KEYS:
        assert key in report, key
    assert report["passed"] is True and report["parts_run"] == ["a", "b", "c"]
    for part in ("a", "b", "c"):
        assert report["parts"][part]["ok"] is True and report["parts"][part]["error"] is None
    for key in ("conversion_ratio", "fused_conversion_ratio", "torch_conversion_ratio", "step_ratio",
                "plain_tokens_per_s", "pipeline_tokens_per_s", "achieved_tflops"):
        assert _finite_positive(report[key]), (key, report[key])
    assert report["final_save_ok"] is True and report["resume_ok"] is True
    # on a CPU there is no peak to divide by: MFU is null, the achieved rate is still there
    assert report["mfu"] is None and report["peak_bf16_tflops"] is None
    # max |dp| on a CPU: the conversion against the rule's definition summed in float64
    a = report["parts"]["a"]
    assert a["dp_reference"] == "float64 definition" and a["dp_same_support"] is True
    assert 0 <= report["max_abs_dp"] <= 1e-6
    assert a["extra_memory_ratio"] is None or a["extra_memory_ratio"] >= 0
    b = report["parts"]["b"]
    assert b["step_flops"] == 2 * b["teacher_parameters"] * b["teacher_tokens"] \
        + 6 * b["student_parameters"] * b["student_tokens"]
    assert all(math.isfinite(x) for x in b["losses"]["bld_step"] + b["losses"]["ce_step"])
    # Liger's RMSNorm and SwiGLU need CUDA: the Liger step is skipped, saying why
    assert report["liger_speedup"] is None and "bld_step_liger" not in b["losses"] and "CPU" in b["liger_skipped"]
    c = report["parts"]["c"]
    ratio = report["pipeline_tokens_per_s"] / report["plain_tokens_per_s"]
    assert report["pipeline_over_plain"] == pytest.approx(ratio)
    parts = report["pipeline_step_parts_s"]
    assert set(parts) == {"time_data_wait", "time_data_prepare", "time_student", "time_teacher", "time_conversion",
                          "time_optimizer", "time_step"} and all(v >= 0 for v in parts.values())
    assert report["pipeline_mfu"] is None and c["pipeline_tflops"] > 0  # no peak on a CPU
    # the pipeline's TFLOP/s by hand from its token rates and (b)'s parameter counts (the same shapes)
    for r in [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]:
        if r["kind"] == "train":
            flops = (2 * b["teacher_parameters"] * r["teacher_tokens_per_s"]
                     + 6 * b["student_parameters"] * r["tokens_per_s"])
            assert r["tflops"] == pytest.approx(flops / 1e12, rel=1e-9), r
    assert c["final_save"]["weights_compared"] > 0 and c["final_save"]["max_relative_diff"] == 0.0  # fp32 on CPU
    assert set(report["versions"]) >= {"torch", "transformers", "deepspeed", "triton"}
    assert report["versions"]["torch"] == torch.__version__
    assert report["device"] == "cpu" and report["device_name"]
    datetime.datetime.fromisoformat(report["date"])
    assert report["vocabulary"]["source"] == "synthetic" and report["vocabulary"]["ids"] == 2000
    assert "all parts passed" in proc.stdout and "| (c) resume to the next steps" in proc.stdout


@pytest.mark.slow
def test_the_final_save_check_fails_on_a_changed_weight(cpu_run, tools, tmp_path):
    """The check behind final_save_ok can fail: one weight of final/ moved by 1% is caught."""
    import shutil

    from safetensors.torch import load_file, save_file

    proc, _, work = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    run = work / "run"
    final = tmp_path / "final"
    shutil.copytree(run / "final", final)
    weights = load_file(final / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] * 1.01
    save_file(weights, final / "model.safetensors", metadata={"format": "pt"})
    step_dir = run / "checkpoints" / "step-12"  # final/ is the resumed run's now
    tools.pipeline.compare_final_with_checkpoint(run / "final", step_dir)  # the untouched one passes
    with pytest.raises(RuntimeError, match="differs from the checkpoint"):  # another step's weights
        tools.pipeline.compare_final_with_checkpoint(run / "final", run / "checkpoints" / "step-10")
    with pytest.raises(RuntimeError, match="down_proj"):
        tools.pipeline.compare_final_with_checkpoint(final, step_dir)


@pytest.mark.slow
def test_resume_problems_name_what_is_wrong(cpu_run, tools):
    proc, _, work = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    out, log = work / "run", (work / "run2.log").read_text()
    assert tools.pipeline.resume_problems(0, log, out, 10, 12) == []
    problems = tools.pipeline.resume_problems(1, log, out, 11, 13)
    text = "; ".join(problems)
    assert "exit 1" in text and "resumed at step 11" in text and "expected 1..13" in text
    assert "expected step-13" in text and "not at 13 steps" in text


# ---------------------------------------------------------------------- pieces
def test_peak_table_by_device_name(tools):
    peak = tools.assets.peak_bf16_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA H200") == 989.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0 and peak("NVIDIA A100-PCIE-40GB") == 312.0
    assert peak("NVIDIA GeForce RTX 4090") is None and peak("x86_64") is None


def test_step_flops_count_teacher_forward_and_student_training(tools):
    # 2 FLOPs per parameter and token forward; 6 for forward + backward
    assert tools.plain.step_flops(1_500, 10, 1_000, 8) == 2 * 1_500 * 10 + 6 * 1_000 * 8
    from bld_scale.train import throughput

    # one formula and one peak table: the pipeline's metrics and the plain loop's MFU use the same
    assert tools.plain.step_flops is throughput.step_flops
    assert tools.assets.peak_bf16_tflops is throughput.peak_bf16_tflops


def _tiktoken_style_encode(data: bytes, ranks: dict) -> list[int]:
    """Join the adjacent pair whose concatenation has the lowest rank until none is a token."""
    parts = [bytes([b]) for b in data]
    while True:
        best = min(((ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks),
                   default=None)
        if best is None:
            return [ranks[p] for p in parts]
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def test_bpe_folder_from_ranks_encodes_by_tiktoken_rule(tools, tmp_path):
    from transformers import AutoTokenizer

    rng = random.Random(0)
    ranks = {bytes([b]): 1 + b for b in range(256)}
    # tokens over a 3-letter alphabet, each a join of two earlier ones: many tokens have several
    # splits (abc = a+bc = ab+c), and joins of a later part can have lower ranks than the part
    pool = [b"a", b"b", b"c"]
    while len(ranks) < 256 + 40:
        token = rng.choice(pool) + rng.choice(pool)
        if len(token) <= 6 and token not in ranks:
            ranks[token] = 1 + len(ranks)
            pool.append(token)
    vocab = tools.assets.Ranks("test", ranks, {"<|endoftext|>": 0}, "<|endoftext|>", "<|endoftext|>", None, "")
    tools.assets.write_bpe_tokenizer(vocab, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 256 + 40 + 1
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(1, 40)))  # one pre-token: letters only
        assert tok.encode(text, add_special_tokens=False) == _tiktoken_style_encode(text.encode(), ranks), text


@pytest.mark.slow
def test_tekken_folder_is_tekken(tools, tmp_path, heldout_text):
    pytest.importorskip("mistral_common")
    from transformers import AutoTokenizer

    from bld_scale.tokenize.token_bytes import TokenBytes
    from bld_scale.tokenize.zoo import tekken

    ranks = tools.assets.tekken_ranks()
    assert ranks.size == 131_072 and ranks.specials["</s>"] == 2
    tools.assets.write_bpe_tokenizer(ranks, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = heldout_text[:60_000]
    assert hf.encode(text, add_special_tokens=False) == tekken().encode_ordinary(text)
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    rows = 151_936
    assert TokenBytes.from_tokenizer(hf, vocab_size=rows).table == \
        TokenBytes.from_tokenizer(tekken(), vocab_size=rows).table


def test_synthetic_vocabulary_is_trained_then_padded_with_joins(tools, tmp_path, heldout_text):
    from transformers import AutoTokenizer

    from bld_scale.tokenize.token_bytes import TokenBytes

    vocab = tools.assets.synthetic_ranks(700, trained=500, train_chars=3000)
    assert vocab.size == 700 and "500 trained" in vocab.note and "200 random merges" in vocab.note
    assert sorted([*vocab.ranks.values(), *vocab.specials.values()]) == list(range(700))
    assert all(bytes([b]) in vocab.ranks for b in range(256))
    by_id = sorted(vocab.ranks, key=vocab.ranks.get)
    for token in by_id[-200:]:  # each synthetic token joins two tokens made before it
        assert any(token[:i] in vocab.ranks and token[i:] in vocab.ranks
                   and max(vocab.ranks[token[:i]], vocab.ranks[token[i:]]) < vocab.ranks[token]
                   for i in range(1, len(token)))
    tools.assets.write_bpe_tokenizer(vocab, tmp_path)
    tb = TokenBytes.from_tokenizer(AutoTokenizer.from_pretrained(tmp_path), vocab_size=768)
    ids, spans = tb.encode(heldout_text[:5000])  # raises unless the tokens rebuild the text exactly
    assert spans[-1][1] == len(heldout_text[:5000].encode())


def test_cover_reference_agrees_with_the_conversion(tools):
    """The float64 definition behind max |dp| agrees with byte_logprobs (itself tested against a
    brute force in test_byteconv.py) on a vocabulary with shared prefixes and an EOS."""
    from bld_scale.convert import byte_logprobs
    from vocab_tables import SINGLE_BYTES, table_vocab

    vocab = table_vocab(SINGLE_BYTES + ["th", "the", "there", "he", "her", "here", " the", " t", "ere", "é"])
    eos = vocab.vocab_size - 1
    ids, _ = vocab.encode("there, the here é there")
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(len(ids) + 1, vocab.vocab_size, generator=g) * 3, dim=-1)
    ref = tools.plain.cover_reference(lp, ids, vocab, eos)
    got = byte_logprobs(lp, ids, vocab, eos_id=eos)
    assert ref.shape == got.shape
    assert tools.plain.max_abs_dp(got, ref) < 1e-6
    # and it is not blind: without the EOS mass the rows differ
    assert tools.plain.max_abs_dp(got, tools.plain.cover_reference(lp, ids, vocab, None)) > 1e-4


def test_a_failing_part_is_recorded_and_the_others_still_run(tools, tmp_path, monkeypatch, capsys):
    def broken(ws):
        raise ValueError("the conversion exploded")

    def fine(ws):
        return {"step_ratio": 1.5, "plain_tokens_per_s": 10.0, "mfu": None}

    monkeypatch.setattr(tools.check, "part_functions", lambda: {"a": broken, "b": fine, "c": broken})
    out = tmp_path / "report.json"
    code = tools.check.main(["--device", "cpu", "--small", "--parts", "a,b", "--out", str(out),
                             "--workdir", str(tmp_path / "work")])
    assert code == 1
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["parts_run"] == ["a", "b"]
    assert report["parts"]["a"]["ok"] is False
    assert report["parts"]["a"]["error"] == "ValueError: the conversion exploded"
    assert report["parts"]["b"]["ok"] is True and report["step_ratio"] == 1.5
    assert report["conversion_ratio"] is None and report["final_save_ok"] is None
    assert "FAILED: a" in capsys.readouterr().out


def test_bad_arguments_are_refused_with_the_fix(tools, capsys):
    with pytest.raises(SystemExit):
        tools.check.parse_args(["--parts", "a,x"])
    assert "choose among a, b, c" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            tools.check.parse_args(["--device", "cuda"])
        assert "--device cpu --small" in capsys.readouterr().err


def test_a_pipeline_variant_is_launched_with_its_overrides_and_measured_like_the_first_run(tools, tmp_path,
                                                                                          monkeypatch):
    """run_variant without a real launch: the command it builds, and the medians, ratio and loss check
    it reads back from the variant's metrics.jsonl (steps 1-2 are start-up and left out)."""
    launched = []

    def fake_launch(cmd, log, timeout_s):
        launched.append(cmd)
        out = Path(next(a for a in cmd if a.startswith("output_dir="))[len("output_dir="):])
        out.mkdir(parents=True)
        rows = [{"step": s, "kind": "train", "loss": 5.0 - s, "tokens_per_s": 100.0 * s, "time_step": 0.5,
                 "data_position": 8 * s,
                 "time_data_wait": 0.01 * s, "tflops": 2.0} for s in range(1, 5)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return 0, 1.0, "ok"

    monkeypatch.setattr(tools.pipeline, "launch", fake_launch)
    profile = tools.assets.SMALL.__class__(**{**vars(tools.assets.SMALL), "steps": 4})
    ws = type("Ws", (), dict(profile=profile, workdir=tmp_path, log=lambda self, m: None))()
    first = {"pipeline_losses": [4.0, 3.0, 2.0, 0.5], "pipeline_tokens_per_s": 175.0,
             "pipeline_data_positions": [8, 16, 24, 32]}
    got = tools.pipeline.run_variant(ws, tmp_path / "recipe.yaml", ["data.prefetch=0"], first, 0)
    # its own folder, no checkpoints, the overrides last (they win), fresh
    assert launched[0][-4:] == [f"output_dir={tmp_path / 'variant0'}", "checkpoint.interval=0", "data.prefetch=0",
                                "--fresh"]
    assert got["pipeline_tokens_per_s"] == 350.0  # the median of steps 3 and 4
    assert got["step_parts_s"]["time_data_wait"] == pytest.approx(0.035) and got["step_parts_s"]["time_teacher"] is None
    assert got["tokens_per_s_over_first_run"] == 2.0 and got["same_losses"] is False
    assert got["first_step_loss_equal"] is True and got["max_loss_rel_diff"] == 1.0  # |1 - 0.5| / 0.5
    assert got["same_data_positions"] is True
    assert got["pipeline_mfu"] is None and got["pipeline_tflops"] == 2.0
