"""One rank, ZeRO-3 student engines: activation checkpointing and engine.compile (aot_eager), and
student.liger_fused_ce (Liger's fused linear CE, under TRITON_INTERPRET=1 on CPU), against plain:
same losses and full gradients for two optimizer steps. Prints one JSON line.
Run by tests/unit/test_student_levers.py in a subprocess (it joins a process group)."""
import copy
import json
import sys

import torch
from deepspeed.utils import safe_get_full_grad

from bld_scale.config import load_recipe
from bld_scale.model.recompute import enable_activation_checkpointing
from bld_scale.model.student import build_student
from bld_scale.parallel.engines import build_ds_config, build_student_engine, init_distributed

init_distributed()
torch.manual_seed(0)
cfg = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
plain = build_student(cfg, head_kind="causal", K=4, attn_implementation="sdpa", head_size={"width": 16, "layers": 1})
levers = copy.deepcopy(plain)
fused = copy.deepcopy(plain)
wanted = sys.argv[1:] or ["checkpointing", "compile", "fused"]
if "checkpointing" in wanted:
    enable_activation_checkpointing(levers)
base = ["train.warmup_steps=1", "train.max_steps=2"]
compiled = ["train.compile=true", "train.compile_backend=aot_eager"] if "compile" in wanted else []
engines = {}
variants = [("plain", plain, []), ("levers", levers, compiled)]
if "fused" in wanted:  # the token head's weight is read outside its own forward: it must be gathered
    variants.append(("fused", fused, ["student.liger_fused_ce=true"]))
for name, model, more in variants:
    recipe = load_recipe(None, base + more, check_paths=False)
    ds_config = build_ds_config(recipe, 1)
    # every parameter partitioned, released after use and gathered again (the tiny model's would all
    # stay resident under the shipped threshold), so the recomputation must gather them itself
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engines[name] = build_student_engine(model, recipe, ds_config)
gen = torch.Generator().manual_seed(1)
result = {"loss": {k: [] for k in engines}, "compiled": engines["levers"].is_compiled,
          "checkpointed": engines["levers"].module.lm.model.layers[0].gradient_checkpointing}
for step in range(2):
    ids = torch.randint(0, 97, (2, 10 + 3 * step), generator=gen)  # two lengths: a recompilation too
    prev = torch.randint(0, 256, (2, ids.shape[1], 4), generator=gen)
    grads = {}
    for name, engine in engines.items():
        mask = torch.ones_like(ids)
        if name == "fused":  # the mean CE against the next tokens, the head fused in
            labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
            ce, byte_logits = engine(input_ids=ids, attention_mask=mask, prev_bytes=prev, token_labels=labels)
        else:
            token_logits, byte_logits = engine(input_ids=ids, attention_mask=mask, prev_bytes=prev)
            ce = torch.nn.functional.cross_entropy(token_logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
        loss = ce + byte_logits.float().logsumexp(-1).mean()
        engine.backward(loss)
        grads[name] = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.step()
        result["loss"][name].append(loss.item())
    for name in grads:
        if name != "plain":
            result.setdefault("grad_max_diff_" + name, []).append(
                max((grads["plain"][n] - grads[name][n]).abs().max().item() for n in grads["plain"]))
print("RESULT " + json.dumps(result), flush=True)
