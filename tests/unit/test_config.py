"""Recipe loading: every bad recipe is refused up front with a message naming the key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bld_scale.config import (Recipe, load_recipe, recipe_from_dict, save_resolved)
from bld_scale.parallel.engines import build_ds_config, teacher_ds_config, warmup_cosine

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "launch" / "recipes" / "demo.yaml"
CLUSTER = REPO / "launch" / "recipes" / "llama8b_to_1b.yaml"


@pytest.fixture
def recipe_dir(tmp_path):
    """A minimal valid recipe with real files, in its own folder (relative paths)."""
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{}")
    (tmp_path / "tok").mkdir()
    (tmp_path / "student.json").write_text("{}")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello")
    raw = {"teacher": {"path": "teacher"}, "student": {"config": "student.json", "tokenizer": "tok"},
           "data": {"train": ["corpus/*.txt"], "heldout": "corpus/a.txt"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


def _write(tmp_path, raw) -> Path:
    p = tmp_path / "x.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_valid_recipe_relative_paths_resolve_against_recipe_folder(recipe_dir, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    r = load_recipe(recipe_dir / "r.yaml")
    assert r.teacher.path == str(recipe_dir / "teacher")
    assert r.student.config == str(recipe_dir / "student.json")
    assert r.data.train == [str(recipe_dir / "corpus" / "*.txt")]
    assert r.data.heldout == [str(recipe_dir / "corpus" / "a.txt")]  # a bare string is a 1-list
    assert r.output_dir == str(Path.cwd() / "runs" / "default")  # outputs: launch directory
    assert r.ds_config_path() == REPO / "ds_configs" / "zero3.json"


@pytest.mark.parametrize("raw, words", [
    ({"trian": {}}, ["unknown key 'trian'", "did you mean 'train'", "valid keys at top level"]),
    ({"train": {"lrr": 1e-3}}, ["unknown key 'train.lrr'", "'lr'", "valid keys at train", "max_steps"]),
    ({"student": {"kk": 3}}, ["unknown key 'student.kk'", "valid keys at student"]),
])
def test_unknown_yaml_keys(tmp_path, raw, words):
    with pytest.raises(ValueError) as e:
        load_recipe(_write(tmp_path, raw), check_paths=False)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("raw, words", [
    ({"train": {"max_steps": "many"}}, ["train.max_steps", "expected int", "'many'"]),
    ({"train": {"max_steps": 2.5}}, ["train.max_steps", "expected int", "2.5"]),
    ({"train": {"lr": [1]}}, ["train.lr", "expected float", "[1]"]),
    ({"data": {"streaming": "yes please"}}, ["data.streaming", "expected bool"]),
    ({"seed": True}, ["seed", "expected int", "True"]),
    ({"output_dir": 3}, ["output_dir", "expected str", "3"]),
    ({"train": 5}, ["train", "expected a mapping", "5"]),
    ({"student": {"config": 7}}, ["student.config", "expected str or dict", "7"]),
])
def test_wrong_types(tmp_path, raw, words):
    with pytest.raises(ValueError) as e:
        load_recipe(_write(tmp_path, raw), check_paths=False)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("key, value, choices", [
    ("distill.method", "bldd", "ce, token_kd, uld, mined, dskd, alm, bld"),
    ("distill.divergence", "kl", "forward_kl, reverse_kl, jsd, tvd"),
    ("distill.conversion", "covers", "cover, within_token, exact"),
    ("student.head", "mlp", "linear, causal"),
    ("student.attn_implementation", "flash", "auto, sdpa, eager, flash_attention_2"),
    ("train.precision", "fp16", "auto, fp32, bf16"),
    ("data.format", "csv", "text, jsonl, parquet"),
])
def test_bad_enums_in_yaml_and_overrides(tmp_path, key, value, choices):
    section, name = key.split(".")
    for load in (lambda: load_recipe(_write(tmp_path, {section: {name: value}}), check_paths=False),
                 lambda: load_recipe(None, [f"{key}={value}"], check_paths=False)):
        with pytest.raises(ValueError) as e:
            load()
        assert key in str(e.value) and repr(value) in str(e.value) and choices in str(e.value)


def test_range_checks():
    with pytest.raises(ValueError, match=r"train.micro_batch_size: must be >= 1"):
        load_recipe(None, ["train.micro_batch_size=0"], check_paths=False)
    with pytest.raises(ValueError, match=r"distill.beta: must be in \[0, 1\]"):
        load_recipe(None, ["distill.beta=2"], check_paths=False)


def test_overrides(recipe_dir):
    r = load_recipe(recipe_dir / "r.yaml", [
        "train.lr=1e-4",  # YAML 1.1 reads 1e-4 as a string: still a float here
        "train.max_steps=1e3", "data.streaming=true", "distill.method=uld", "seed=7",
        "logging.wandb_project=2024",  # string fields take the text verbatim
        "teacher.bos_token=null", "deepspeed.config=zero2", "data.format=jsonl",
    ])
    assert (r.train.lr, r.train.max_steps, r.data.streaming, r.distill.method, r.seed) == \
        (1e-4, 1000, True, "uld", 7)
    assert r.logging.wandb_project == "2024" and r.teacher.bos_token is None
    assert r.ds_config_path().name == "zero2.json"


def test_bad_overrides():
    for item, words in [("train.lrr=1", ["unknown key 'train.lrr'", "'lr'"]),
                        ("nokey", ["key=value"]),
                        ("train=3", ["'train' is a section", "max_steps"]),
                        ("train.lr.x=3", ["'train.lr' is a value"]),
                        ("train.lr=fast", ["train.lr", "expected float", "'fast'"])]:
        with pytest.raises(ValueError) as e:
            load_recipe(None, [item], check_paths=False)
        for w in words:
            assert w in str(e.value), (item, w, str(e.value))


def test_override_paths_resolve_against_cwd(recipe_dir, monkeypatch):
    monkeypatch.chdir(recipe_dir / "corpus")
    (recipe_dir / "corpus" / "ds.json").write_text("{}")
    r = load_recipe(recipe_dir / "r.yaml", ["data.train=a.txt", "deepspeed.config=ds.json"])
    assert r.data.train == [str(recipe_dir / "corpus" / "a.txt")]
    assert r.deepspeed.config == str(recipe_dir / "corpus" / "ds.json")


@pytest.mark.parametrize("override, key", [
    ("teacher.path=/nonexistent/teacher", "teacher.path"),
    ("student.tokenizer=/nonexistent/tok", "student.tokenizer"),
    ("student.config=/nonexistent/c.json", "student.config"),
    ("data.train=[/nonexistent/*.txt]", "data.train[0]"),
    ("data.heldout=[builtin:nope]", "data.heldout[0]"),
    ("deepspeed.config=/nonexistent/ds.json", "deepspeed.config"),
])
def test_missing_files(recipe_dir, override, key):
    with pytest.raises(ValueError) as e:
        load_recipe(recipe_dir / "r.yaml", [override])
    msg = str(e.value)
    assert msg.startswith(key + ":") and ("/nonexistent" in msg or "builtin:nope" in msg), msg


def test_teacher_folder_needs_config_json(recipe_dir):
    (recipe_dir / "teacher" / "config.json").unlink()
    with pytest.raises(ValueError, match="teacher.path: no config.json"):
        load_recipe(recipe_dir / "r.yaml")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ValueError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_round_trip(recipe_dir, tmp_path):
    r = load_recipe(recipe_dir / "r.yaml", ["train.lr=2e-4", "student.K=4"])
    save_resolved(r, tmp_path / "out" / "resolved.yaml")
    again = load_recipe(tmp_path / "out" / "resolved.yaml")
    assert again == r and again.to_dict() == r.to_dict()
    assert recipe_from_dict(yaml.safe_load((tmp_path / "out" / "resolved.yaml").read_text())) == r


def test_shipped_recipes_parse():
    demo = load_recipe(DEMO, check_paths=False)
    assert demo.student.tokenizer.endswith("bld_scale/assets/demo/student_tokenizer")
    assert demo.data.train == ["builtin:train"]
    cfg = json.loads(Path(demo.student.config).read_text())
    assert "vocab_size" not in cfg  # filled from the tokenizer at build time
    cluster = load_recipe(CLUSTER, check_paths=False)
    assert cluster.train.precision == "bf16" and cluster.deepspeed.config == "zero3"
    assert isinstance(cluster.student.config, dict)


def test_demo_recipe_paths_exist():
    if not (REPO / "bld_scale/assets/demo/teacher/config.json").is_file():
        pytest.skip("demo teacher weights not built yet (tools/train_demo_teacher.py)")
    load_recipe(DEMO)


@pytest.mark.parametrize("name", ["zero3", "zero3_offload", "zero2"])
def test_ds_config_filled_from_recipe(name):
    r = load_recipe(None, [f"deepspeed.config={name}", "train.micro_batch_size=3",
                           "train.grad_accum=5", "train.grad_clip=0.5", "train.precision=fp32"],
                    check_paths=False)
    cfg = build_ds_config(r, world_size=4)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"],
            cfg["train_batch_size"], cfg["gradient_clipping"]) == (3, 5, 60, 0.5)
    assert cfg["bf16"] == {"enabled": False}
    assert "auto" not in json.dumps(cfg)
    t = teacher_ds_config(cfg, "fp32")
    assert t["zero_optimization"]["stage"] == 3 and "optimizer" not in t
    assert t["train_batch_size"] == 12 and t["gradient_accumulation_steps"] == 1


def test_warmup_cosine():
    f = [warmup_cosine(s, 4, 14, 0.1) for s in range(16)]
    assert f[0] == 0.25 and f[3] == 1.0 and f[4] == 1.0
    assert f[9] == pytest.approx(0.55) and f[14] == pytest.approx(0.1) and f[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_defaults_are_a_valid_recipe():
    assert isinstance(load_recipe(None, check_paths=False), Recipe)
