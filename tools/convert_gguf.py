"""Convert a GGUF file (llama.cpp's format) into a Hugging Face model folder.

    python tools/convert_gguf.py SRC.gguf OUT_DIR [--dtype fp32|bf16]

OUT_DIR receives `model.safetensors`, `config.json`, `generation_config.json` and the tokenizer
files (tokenizer.json, tokenizer_config.json) with the BOS / EOS ids the GGUF metadata names.
transformers reads the file through the `gguf` package (`pip install gguf`) and dequantises every
tensor to fp32: with --dtype fp32 (the default) the folder holds exactly those weights, so its
logits equal the GGUF-loaded model's; bf16 rounds them (half the size). Only architectures
transformers can read from GGUF convert (Llama, Mistral, Qwen2, ...). A recipe may also name the
.gguf file as teacher.path directly: the run converts it once (bld_scale.model.gguf).

A missing file, a file that is not GGUF, or one transformers cannot read is refused in one line
(exit status 2).
"""
from __future__ import annotations

import argparse
import sys

from bld_scale.model.gguf import DTYPES, GGUFError, convert_gguf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="the .gguf file")
    ap.add_argument("out", help="folder to write the Hugging Face model into")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights' dtype (default fp32: exact)")
    args = ap.parse_args(argv)
    try:
        out = convert_gguf(args.src, args.out, args.dtype)
    except (GGUFError, OSError) as err:
        print(f"bld_scale: {err}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
