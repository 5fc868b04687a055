"""Benchmark of the streaming soup (`write_linear_merge`) against an in-memory merge and mergekit; prints JSON.

Two random Llama-shaped checkpoints (default: TinyLlama's 1.1B shape in fp16) are written shard by shard, as
save_pretrained shards them, into a temp dir; then each method merges them 0.5/0.5 in a fresh child process:
- ours: plan_linear + write_linear_merge (inside atomic_dir, default 2 GiB shards);
- naive: safetensors.torch.load_file of every file of both models, the weighted sum per tensor, one save_file;
- mergekit: `mergekit-yaml` (from PATH or --mergekit) on the config mergekit_config exports, on the CPU.
Reported per method: wall seconds of the child and its peak RSS (wait4's ru_maxrss), with the startup floor
(interpreter + imports) measured apart; ratios ours/naive and ours/mergekit; and whether the outputs are
identical tensor by tensor. The inputs sit in the page cache (just written) and dirty pages are synced before
each child, so the methods compete on equal terms; the load average says whether other work shared the CPUs.

    python bench/soup.py [--hidden 2048 --intermediate 5632 --layers 22 --vocab 32000] [--mergekit PATH] [--dir D]

With `--learned N` it measures a learned per-module soup instead (fusesoup/soup/learn.py, as the soup stage runs
it): N random checkpoints of the shape, a fresh child that maps them, learns the alphas for --steps on one batch of
--tokens, and reports its peak RSS (which counts the mapped files' pages) and peak anonymous memory, against N x
float32 of one model:

    python bench/soup.py --learned 3 --dtype bfloat16 [--steps 2 --tokens 256] [--recompute]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.llama_shape import add_shape_arguments  # noqa: E402
from fusesoup.soup.learn import learn_alphas, mapped_ingredients, memory_plan, release_weights  # noqa: E402
from fusesoup.soup.checkpoint import INDEX_NAME, compare_checkpoints  # noqa: E402
from fusesoup.soup.merge import check_ingredients, plan_linear, write_linear_merge  # noqa: E402
from fusesoup.soup.mergekit import mergekit_config  # noqa: E402
from fusesoup.storage import atomic_dir  # noqa: E402

HALF = (0.5, 0.5)


def llama_shapes(args) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes, untied head, in save order."""
    hidden, inner, kv = args.hidden, args.intermediate, args.kv_heads * (args.hidden // args.heads)
    layer = [("input_layernorm.weight", (hidden,)), ("self_attn.q_proj.weight", (hidden, hidden)),
             ("self_attn.k_proj.weight", (kv, hidden)), ("self_attn.v_proj.weight", (kv, hidden)),
             ("self_attn.o_proj.weight", (hidden, hidden)), ("post_attention_layernorm.weight", (hidden,)),
             ("mlp.gate_proj.weight", (inner, hidden)), ("mlp.up_proj.weight", (inner, hidden)),
             ("mlp.down_proj.weight", (hidden, inner))]
    return ([("model.embed_tokens.weight", (args.vocab, hidden))]
            + [(f"model.layers.{i}.{name}", shape) for i in range(args.layers) for name, shape in layer]
            + [("model.norm.weight", (hidden,)), ("lm_head.weight", (args.vocab, hidden))])


def write_random_model(directory: Path, args, seed: int) -> None:
    """A sharded save_pretrained-style checkpoint of N(0, 0.02) tensors; one shard in memory at a time."""
    from bench.llama_shape import llama_config  # here, not at the top: the measured children need not import it

    dtype = getattr(torch, args.dtype)
    directory.mkdir(parents=True)
    llama_config(args, dtype=args.dtype, architectures=["LlamaForCausalLM"]).save_pretrained(directory)
    shards, size, limit = [[]], 0, args.in_shard_mb * 1e6
    for name, shape in llama_shapes(args):
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    generator, weight_map = torch.Generator().manual_seed(seed), {}
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: (torch.randn(shape, generator=generator) * 0.02).to(dtype) for name, shape in shard},
                  directory / file, metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in shard})
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


class PeakAnonymous(threading.Thread):
    """The peak of this process's anonymous resident memory (RssAnon), sampled every 10 ms: the memory a run needs,
    without the file pages of memory-mapped checkpoints, which the OS reads on use and can drop."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0

    def run(self) -> None:
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(0.01)


def learned_child(work: Path, count: int, steps: int, tokens: int, recompute: bool) -> None:
    """A learned per-module soup of `count` ingredients as the soup stage runs it (a float32 working model, the
    checkpoints memory-mapped), `steps` Adam steps on one batch of `tokens` random ids; prints what it measured: the
    peak anonymous memory of the whole child (the working model's load included) and of the learning alone, from the
    moment the working model's weights are released."""
    from transformers import AutoModelForCausalLM

    sampler = PeakAnonymous()
    sampler.start()
    started = time.perf_counter()
    dirs = [work / f"ingredient-{index}" for index in range(count)]
    model = AutoModelForCausalLM.from_pretrained(dirs[0], dtype=torch.float32, use_safetensors=True).eval()
    ingredients = mapped_ingredients(dirs, model, torch.device("cpu"))
    print(memory_plan(ingredients, model, "module", recompute), flush=True)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    release_weights(model)  # as learn_alphas does first: learning's own peak is measured from here
    time.sleep(0.05)  # one more sample of the load
    loading_peak, sampler.peak = sampler.peak, 0
    learning_started = time.perf_counter()
    fit = learn_alphas(model, ingredients, [(ids, torch.ones_like(ids))], "module", 0.0, steps, 0.05, recompute)
    print(json.dumps({"seconds_to_learn": time.perf_counter() - learning_started,
                      "learn_seconds": time.perf_counter() - started,
                      "peak_anonymous_mb": max(loading_peak, sampler.peak) / 2**20,
                      "learning_peak_anonymous_mb": sampler.peak / 2**20,
                      "loss": [round(row["loss"], 4) for row in fit.log]}))


def child(method: str, work: Path) -> None:
    """Run one method in this (fresh) process; print its merge seconds, imports excluded, as the last line."""
    if method == "idle":  # the startup floor: interpreter and imports only
        return
    dirs, started = [work / "a", work / "b"], time.perf_counter()
    if method == "ours":
        with atomic_dir(work / "out-ours") as tmp:
            write_linear_merge(plan_linear(dirs, lambda _: HALF), dirs, tmp)
    elif method == "naive":
        models = [{} for _ in dirs]
        for model, directory in zip(models, dirs):
            for file in sorted(directory.glob("*.safetensors")):
                model.update(load_file(file))
        merged = {name: (HALF[0] * models[0][name].float() + HALF[1] * models[1][name].float()).to(tensor.dtype)
                  for name, tensor in models[0].items()}
        (work / "out-naive").mkdir()
        save_file(merged, work / "out-naive" / "model.safetensors", metadata={"format": "pt"})
    print(json.dumps({"merge_seconds": time.perf_counter() - started}))


# Forks and execs the command from a bare interpreter (about 10 MB): Linux carries the forking process's peak RSS
# into the child's ru_maxrss, so the bench process itself must not fork the measured command.
LAUNCHER = """import json, os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"status": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - started,
               "maxrss_kb": usage.ru_maxrss}, out)
"""


def measured(command: list[str], log: Path) -> dict:
    """Wall seconds and peak RSS (MB) of `command` run as a child process, its output in `log`."""
    os.sync()  # the previous child's dirty pages must not be flushed on this one's time
    report = log.with_suffix(".json")
    with open(log, "wb") as out:
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(report), *command], stdout=out,
                       stderr=subprocess.STDOUT, check=True)
    launched = json.loads(report.read_text())
    if launched["status"] != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    result = {"seconds": round(launched["seconds"], 2), "peak_rss_mb": round(launched["maxrss_kb"] / 1024, 1)}
    last = log.read_text().strip().splitlines()[-1:]
    if last and last[0].startswith("{"):  # what the child reports of itself
        result.update({key: round(value, 2) if isinstance(value, float) else value
                       for key, value in json.loads(last[0]).items()})
    return result


def ratio(ours: dict, other: dict) -> dict:
    return {"time": round(ours["seconds"] / other["seconds"], 3),
            "memory": round(ours["peak_rss_mb"] / other["peak_rss_mb"], 3)}


def bench_learned(args) -> None:
    """The learned-soup case: N random checkpoints, then learned_child in a fresh measured process."""
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="soup-bench-") as scratch:
        work = Path(scratch)
        for index in range(args.learned):
            write_random_model(work / f"ingredient-{index}", args, seed=index + 1)
        specs = check_ingredients([work / f"ingredient-{index}" for index in range(args.learned)])
        me = [sys.executable, __file__, "--work", str(work), "--learned", str(args.learned), "--steps",
              str(args.steps), "--tokens", str(args.tokens)] + (["--recompute"] if args.recompute else []) + ["--child"]
        startup = measured(me + ["idle"], work / "idle.log")
        learned = measured(me + ["learned"], work / "learned.log")
        plan = next(line for line in (work / "learned.log").read_text().splitlines() if "memory plan" in line)
    parameters = sum(math.prod(shape) for shape, _ in specs.values())
    float32_gb = args.learned * parameters * 4 / 1e9
    print(json.dumps({
        "shape": {key: getattr(args, key) for key in ("hidden", "intermediate", "layers", "heads", "kv_heads",
                                                       "vocab", "dtype")},
        "ingredients": args.learned, "parameters": parameters, "steps": args.steps, "tokens": args.tokens,
        "recompute": args.recompute,
        "learned": learned, "startup": startup, "plan": plan,
        "n_x_float32_gb": round(float32_gb, 3),
        "ratios": {"peak_rss/n_x_float32": round(learned["peak_rss_mb"] * 2**20 / 1e9 / float32_gb, 3),
                   "peak_anonymous/n_x_float32": round(learned["peak_anonymous_mb"] * 2**20 / 1e9 / float32_gb, 3),
                   "learning_peak_anonymous/n_x_float32":
                       round(learned["learning_peak_anonymous_mb"] * 2**20 / 1e9 / float32_gb, 3)},
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--in-shard-mb", type=float, default=1000, help="input shard size (MB), as save_pretrained")
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="path of mergekit-yaml")
    parser.add_argument("--dir", default=None, help="where the temp dir goes (default: the system's)")
    parser.add_argument("--learned", type=int, metavar="N", help="instead: a learned soup of N ingredients (peak "
                                                                      "memory against N x float32 of one model)")
    parser.add_argument("--steps", type=int, default=2, help="learned: Adam steps (default: 2)")
    parser.add_argument("--tokens", type=int, default=256, help="learned: tokens of the batch (default: 256)")
    parser.add_argument("--recompute", action="store_true", help="learned: soup.recompute (one layer's mixed weights)")
    parser.add_argument("--child", choices=["ours", "naive", "idle", "learned"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "learned":
        return learned_child(Path(args.work), args.learned, args.steps, args.tokens, args.recompute)
    if args.child:
        return child(args.child, Path(args.work))
    if args.learned:
        return bench_learned(args)
    loadavg_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="soup-bench-") as scratch:
        work = Path(scratch)
        for name, seed in (("a", 1), ("b", 2)):
            write_random_model(work / name, args, seed)
        specs = check_ingredients([work / "a", work / "b"])
        me = [sys.executable, __file__, "--work", str(work), "--child"]
        startup = {"ours": measured(me + ["idle"], work / "idle.log")}
        methods = {"ours": measured(me + ["ours"], work / "ours.log"),
                   "naive": measured(me + ["naive"], work / "naive.log")}
        outputs = {"ours": work / "out-ours", "naive": work / "out-naive"}
        if args.mergekit and Path(args.mergekit).exists():
            config = mergekit_config([str(work / "a"), str(work / "b")], lambda _: HALF, list(specs), args.layers,
                                     dtype=next(iter(specs.values()))[1])
            (work / "mergekit.yml").write_text(yaml.safe_dump(config, sort_keys=False))
            startup["mergekit"] = measured([args.mergekit, "--help"], work / "mergekit-help.log")
            methods["mergekit"] = measured([args.mergekit, str(work / "mergekit.yml"), str(work / "out-mergekit"),
                                            "--no-cuda", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                                           work / "mergekit.log")
            outputs["mergekit"] = work / "out-mergekit"
        else:
            methods["mergekit"] = "not installed"
        identical = {f"ours~{other}": compare_checkpoints(outputs["ours"], outputs[other])
                     for other in outputs if other != "ours"}
    print(json.dumps({
        "shape": {key: getattr(args, key) for key in ("hidden", "intermediate", "layers", "heads", "kv_heads",
                                                       "vocab", "dtype")},
        "parameters": sum(math.prod(shape) for shape, _ in specs.values()),
        "gb_per_model": round(sum(math.prod(shape) for shape, _ in specs.values())
                              * getattr(torch, args.dtype).itemsize / 1e9, 3),
        "methods": methods, "startup": startup,
        "ratios": {f"ours/{other}": ratio(methods["ours"], methods[other])
                   for other in ("naive", "mergekit") if isinstance(methods[other], dict)},
        "identical": identical,
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg_before_after": [round(loadavg_before[0], 2), round(os.getloadavg()[0], 2)],
    }, indent=2))


if __name__ == "__main__":
    main()
