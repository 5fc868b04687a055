"""Replay proven: mergekit run on the mergekit.yaml of a learned per-module soup gives our soup's tensors; prints JSON.

Three random Llama checkpoints are saved with save_pretrained; alphas are learned per module for --steps on random
tokens (fusesoup.soup.learn, as the soup stage runs it), so every module of every layer has its own weights; our
streaming merge writes the soup and mergekit_config exports its config. Then `mergekit-yaml` (mergekit 0.1.5, a
test dependency in requirements.lock, beside this interpreter) merges the same checkpoints from that config, and the
two outputs are compared tensor by tensor (bit-identical count, largest absolute difference). With --method
task_arithmetic, ties or sce the same is done for those merges relative to ingredient 0 (weights 0.7 and 0.4, TIES
density --density; sce takes no weights, its select_topk is --select-topk).

    .venv/bin/python bench/mergekit_replay.py [--mergekit PATH] [--dtype bfloat16 --layers 4]
                                              [--method linear|task_arithmetic|ties|sce --density 0.5 --select-topk 0.5]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusesoup.soup.checkpoint import compare_checkpoints  # noqa: E402
from fusesoup.soup.learn import group_of, learn_alphas, mapped_ingredients  # noqa: E402
from fusesoup.soup.merge import (check_ingredients, checked_sources, plan_linear, write_linear_merge,  # noqa: E402
                                 write_merge)
from fusesoup.soup.mergekit import mergekit_config, task_vector_config  # noqa: E402
from fusesoup.soup.relative import TASK_VECTOR_METHODS, Settings, task_vector_combine  # noqa: E402

TASK_WEIGHTS = (0.7, 0.4)  # of ingredients 1 and 2 relative to ingredient 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    beside = Path(sys.executable).with_name("mergekit-yaml")
    parser.add_argument("--mergekit", default=str(beside) if beside.exists() else shutil.which("mergekit-yaml"),
                        help="path of mergekit-yaml")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="Adam steps of the per-module alphas")
    parser.add_argument("--method", default="linear", choices=["linear", *TASK_VECTOR_METHODS])
    parser.add_argument("--density", type=float, default=0.5, help="ties: the share of each task vector kept")
    parser.add_argument("--select-topk", type=float, default=0.5, help="sce: the share of elements kept by variance")
    args = parser.parse_args()
    if not args.mergekit or not Path(args.mergekit).exists():
        raise SystemExit(f"mergekit-yaml not found ({args.mergekit}); `make install` puts it in .venv/bin")
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    with tempfile.TemporaryDirectory(prefix="mergekit-replay-") as scratch:
        work = Path(scratch)
        dirs = []
        for seed in range(3):
            torch.manual_seed(seed)
            dirs.append(work / f"ingredient-{seed}")
            LlamaForCausalLM(config).to(dtype).save_pretrained(dirs[-1])
        specs = check_ingredients(dirs)
        stored = next(iter(specs.values()))[1]
        if args.method == "linear":
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).to(dtype)
            ingredients = mapped_ingredients(dirs, model, torch.device("cpu"))
            batches = [(torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(i)),
                        torch.ones(4, 32, dtype=torch.long)) for i in range(4)]
            fit = learn_alphas(model, ingredients, batches, "module", l1=0.0, steps=args.steps, lr=0.5)
            lookup = lambda name: fit.alphas[group_of(name, "module")]  # noqa: E731
            write_linear_merge(plan_linear(dirs, lookup), dirs, work / "ours")
            exported = mergekit_config([str(d) for d in dirs], lookup, list(specs), args.layers, dtype=stored)
            distinct = len({tuple(alpha) for alpha in fit.alphas.values()})
            learned = {"groups": len(fit.alphas), "distinct_alpha_vectors": distinct,
                       "loss_first_last": [round(fit.log[0]["loss"], 4), round(fit.log[-1]["loss"], 4)]}
        else:
            plan = plan_linear(dirs, lambda name: (0.0, *TASK_WEIGHTS))
            settings = Settings(density=args.density, select_topk=args.select_topk)
            write_merge(plan, checked_sources(plan, dirs), work / "ours",
                        combine=task_vector_combine(args.method, 0, settings))
            exported = task_vector_config(args.method, str(dirs[0]), [str(d) for d in dirs[1:]], TASK_WEIGHTS,
                                          settings, dtype=stored)
            learned = {"weights": TASK_WEIGHTS, "density": args.density if args.method == "ties" else None,
                       "select_topk": args.select_topk if args.method == "sce" else None}
        (work / "mergekit.yaml").write_text(yaml.safe_dump(exported, sort_keys=False))
        done = subprocess.run([args.mergekit, str(work / "mergekit.yaml"), str(work / "theirs"), "--no-cuda",
                               "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"mergekit-yaml failed:\n{done.stderr[-3000:]}")
        print(json.dumps({"method": args.method, "dtype": args.dtype, "layers": args.layers, **learned,
                          "ours~mergekit": compare_checkpoints(work / "ours", work / "theirs")}, indent=2))


if __name__ == "__main__":
    main()
