"""How much of the teachers' edge continued training carries (issue 16): method x domain over seeds; prints JSON.

On a `make repro` project (--project), nothing of which is changed: every stage script runs as a subprocess on a
params file of its own under --work, so each run is exactly what the DVC stage would do with those params.
- The oracle (`--oracle code-neox`): a teacher on the target's own tokenizer, trained like that specialist (its
  bootstrap entry with the target's tokenizer, learnt from the target's domains: the same vocabulary), extracted,
  aligned (an identity) and fused in the specialist's place with the other sources: the same fusion, with the
  code teacher's distributions reaching every position as same-tokenizer distillation would.
  `live` runs distil from the oracle itself, run beside the student, over its whole vocabulary (train@fused's
  --live-teacher): the dense ceiling, with nothing lost in storage.
- `--build NAME=OVERRIDES` aligns and fuses the project's sources again with params overrides (JSON, e.g.
  '{"align": {"vocab": "exact"}}'; with "extract" overrides every source is extracted again) into a store NAME
  under --work; `--oracle-build NAME=OVERRIDES` the same with the oracle in its specialist's place; `--store
  NAME=PATH` names one built elsewhere.
- Each run NAME=STORE[:LAMBDA[:LOSS]][:KEY=VALUE,...] trains the target base with train@fused on STORE (`fused`:
  the project's fused store, `oracle`: the oracle's, `live`, or one of --build / --oracle-build / --store) at
  train.lambda LAMBDA,
  train.fusion_loss LOSS and any other train.KEY (default: the project's), or with train@clm (`clm`), once per seed
  (train order).
- Per run, split and domain: the bpb (mean over the seeds), its relative gain over the seed-matched train@clm run
  of the same train.steps (`NAME=clm:steps=N` adds one; mean and min..max over the seeds: the seed moves every
  run's bpb far more than fusion does, so runs compare with the same seed), and the captured share of the domain teacher's edge, (bpb_clm - bpb_run) /
  (bpb_clm - bpb_teacher). The domain teacher is the oracle for runs on its store, else `--teachers`. Decide on
  valid; report test.

    python bench/fusion_table.py --project R --work R/exp --oracle code-neox --seeds 0 1 2 \\
        --oracle-build sampled='{"extract": {"targets": "sample", "k": 12}}' \\
        --runs clm=clm dense=live:0.5 top10=oracle:0.5 sampled=sampled:0.5 [--report table.md]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusesoup.params import deep_merge, parse_params, read_mapping  # noqa: E402
from fusesoup.storage import read_json, write_json  # noqa: E402

ORACLE = "oracle"
LIVE = "live"  # the store name of runs that distil from the oracle run live (the dense ceiling)
SPLITS = ("valid", "test")


def stage(module: str, *args: str) -> None:
    """One stage script, as DVC would run it (its own process, this interpreter)."""
    subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=ROOT, check=True)


def write_params(path: Path, base: dict, overrides: dict) -> Path:
    merged = deep_merge(base, overrides)
    parse_params(merged, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return path


def oracle_entry(base: dict, like: str, steps: int | None) -> dict:
    """bootstrap entry `like` (e.g. the code specialist) with the target's tokenizer, learnt from the target's
    domains, and `steps` steps if given."""
    target, entry = base["bootstrap"][base["target"]], base["bootstrap"][like]
    tokenizer = {**target["tokenizer"], "domains": sorted(target["domains"])}
    return {**entry, "tokenizer": tokenizer, "train": {**entry["train"], "steps": steps or entry["train"]["steps"]}}


def link_project(project: Path, kind: str, folder: Path, names: list[str]) -> None:
    """folder/NAME -> the project's data/KIND/NAME (KIND: models, logits), for each name not there yet."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (folder / name).exists():
            (folder / name).symlink_to((project / "data" / kind / name).resolve())


def align_and_fuse(project: Path, work: Path, params: Path, sources: list[str], logits: Path) -> Path:
    """align@ every source in `sources` (their logit stores under `logits`, models under work/../../models) not
    aligned under work/aligned yet, then fuse them into work/fused (each step skipped once done), as the stages
    would with `params`; returns the fused store."""
    corpus, p = str(project / "data/corpus"), str(params)
    models, aligned = work.parent.parent / "models", work / "aligned"
    for name in sources:
        if not (aligned / name / "manifest.json").exists():
            stage("align", name, "--params", p, "--corpus", corpus, "--models", str(models), "--logits",
                  str(logits), "--out", str(aligned / name), "--metrics", str(work / "metrics/align" / f"{name}.json"))
    if not (work / "fused" / "manifest.json").exists():
        stage("fuse", "--params", p, "--corpus", corpus, "--aligned", str(aligned), "--out", str(work / "fused"),
              "--metrics", str(work / "metrics"))
    return work / "fused"


def bootstrap_oracle(project: Path, work: Path, base: dict, entry: dict) -> Path:
    """The oracle model (bootstrap entry `entry`) under work/oracle-model/ (skipped once done); returns its folder."""
    folder = work / "oracle-model"
    if not (folder / ORACLE / "model.safetensors").exists():
        params = write_params(folder / "params.yaml", base, {"bootstrap": {ORACLE: entry}})
        stage("bootstrap", ORACLE, "--params", str(params), "--corpus", str(project / "data/corpus"),
              "--out", str(folder / ORACLE), "--metrics", str(folder / "bootstrap.json"),
              "--plots", str(folder / "bootstrap.csv"))
    return folder / ORACLE


def build_store(project: Path, work: Path, name: str, base: dict, overrides: dict,
                oracle: tuple[str, dict, Path] | None = None) -> Path:
    """The project's sources aligned and fused with these params overrides (e.g. {"align": {"vocab": "exact"}})
    into work/stores/NAME, each step skipped once done; with `oracle` (LIKE, its bootstrap entry, its model folder)
    the oracle takes the place of source LIKE. Logit stores are shared by every build with the same "extract"
    overrides (work/logits/<those overrides>): the project's own where there are none, else extracted there.
    Returns the fused store."""
    target, store = base["target"], work / "stores" / name
    sources, setup = list(base["sources"]), {}
    if oracle is not None:
        like, entry, model = oracle
        sources = [ORACLE if s == like else s for s in sources]
        setup = {"bootstrap": {ORACLE: entry}, "sources": sources}
    params = write_params(store / "params.yaml", base, deep_merge(overrides, setup))
    models = work / "models"
    link_project(project, "models", models, [target, *(s for s in sources if s != ORACLE)])
    if oracle is not None and not (models / ORACLE).exists():
        (models / ORACLE).symlink_to(model.resolve())
    extraction = overrides.get("extract", {})
    logits = work / "logits" / (json.dumps(extraction, sort_keys=True) if extraction else "project")
    needed = list(dict.fromkeys([target, *sources]))
    link_project(project, "logits", logits, [] if extraction else [s for s in needed if s != ORACLE])
    for source in needed:
        if not (logits / source / "manifest.json").exists():
            stage("extract", source, "--params", str(params), "--corpus", str(project / "data/corpus"),
                  "--models", str(models), "--out", str(logits / source),
                  "--metrics", str(store / "metrics/extract" / f"{source}.json"), "--no-progress")
    return align_and_fuse(project, store, params, sources, logits)


def parse_run(how: str) -> tuple[str, dict]:
    """STORE[:LAMBDA[:LOSS]][:KEY=VALUE,...] -> (store, train overrides)."""
    store, *parts = how.split(":")
    train, plain = {}, ["lambda", "fusion_loss"]
    for part in parts:
        if "=" in part:
            train |= {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in part.split(","))}
        else:
            train[plain.pop(0)] = yaml.safe_load(part)
    return store, train


def teacher_scores(project: Path, work: Path, names: list[str], base: dict) -> dict:
    """valid and test bpb per domain of each teacher (cached in work/teachers.json)."""
    from fusesoup.corpus import read_split
    from fusesoup.evaluate import score_by_domain
    from fusesoup.models import load_model

    cache = work / "teachers.json"
    scores = read_json(cache) if cache.exists() else {}
    for name in names:
        if name in scores:
            continue
        models = work / "oracle-model" if name == ORACLE else project / "data/models"
        model, tokenizer = load_model(name, parse_params(base), models)
        scores[name] = {split: {d: r.bpb for d, r in score_by_domain(model.float().eval(), tokenizer,
                                                                    read_split(project / "data/corpus", split),
                                                                    base["evaluate"]["batch_tokens"]).items()}
                        for split in SPLITS}
        write_json(cache, scores)
    return scores


def train_run(project: Path, work: Path, base: dict, name: str, store: Path | str | None, train: dict,
              seed: int) -> dict:
    """One train@ run (clm when `store` is None, the oracle live when it is LIVE) with these train params and seed;
    its metrics (cached)."""
    run = f"{name}-s{seed}"
    metrics = work / "metrics" / f"{run}.json"
    if not metrics.exists():
        overrides = {"seed": seed} | ({"train": train} if train else {})  # an empty mapping would replace train
        params = write_params(work / "params" / f"{run}.yaml", base, overrides)
        live = store == LIVE
        stage("train", "clm" if store is None else "fused", *(["--live-teacher", ORACLE] if live else []),
              "--params", str(params), "--corpus", str(project / "data/corpus"),
              "--models", str(work / "models" if live else project / "data/models"),
              "--fused", str(project / "data/fused" if live or store is None else store),
              "--logits", str(project / "data/logits"),
              "--out", str(work / "runs" / run), "--checkpoints", str(work / "checkpoints" / run),
              "--metrics", str(metrics), "--plots", str(work / "plots" / f"{run}.csv"),
              "--throughput", str(work / "logs" / f"{run}.csv"), "--no-progress")
    return read_json(metrics)


def summarise(runs: dict, baselines: dict, teachers: dict, teacher_of: dict) -> dict:
    """Per run and split and domain: the bpb (mean over seeds), its relative gain over the seed-matched train@clm
    run of the same train.steps (mean, min, max over seeds) and the captured share of the domain teacher's edge
    (mean over seeds)."""
    table = {}
    for name, (by_seed, store, steps) in runs.items():
        clm = baselines[steps]
        table[name] = {}
        for split in SPLITS:
            rows = {}
            for domain in by_seed[0][split]:
                bpb = np.array([m[split][domain]["bpb"] for m in by_seed])
                base = np.array([m[split][domain]["bpb"] for m in clm])
                gain = (base - bpb) / base
                row = {"bpb": float(bpb.mean()), "gain": float(gain.mean()), "gain_min": float(gain.min()),
                       "gain_max": float(gain.max())}
                teacher = teacher_of.get((store, domain))
                if teacher is not None:
                    edge = base - teachers[teacher][split][domain]
                    row |= {"teacher": teacher,
                            "share": float(((base - bpb) / edge).mean()) if (edge > 0).all() else None}
                rows[domain] = row
            table[name][split] = rows
    return table


def markdown(table: dict, split: str) -> str:
    """One split's table: per domain the bpb, the relative gain over clm in % (min..max over seeds), the share."""
    domains = list(next(iter(table.values()))[split])
    lines = [f"| {split} | " + " | ".join(f"{d} bpb | {d} gain % (min..max) | {d} share" for d in domains) + " |",
             "|---|" + "---|---|---|" * len(domains)]
    for name, splits in table.items():
        cells = []
        for d in domains:
            row = splits[split][d]
            cells += [f"{row['bpb']:.4f}",
                      f"{100 * row['gain']:+.2f} ({100 * row['gain_min']:+.2f}..{100 * row['gain_max']:+.2f})",
                      "" if row.get("share") is None else f"{row['share']:.3f} ({row['teacher']})"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True, help="a make-repro project (its params.yaml, data/)")
    parser.add_argument("--work", type=Path, required=True, help="where the oracle, params and runs go")
    parser.add_argument("--oracle", help="build the oracle like this bootstrap entry (e.g. code-neox)")
    parser.add_argument("--oracle-steps", type=int, help="its training steps (default: the specialist's)")
    parser.add_argument("--teachers", nargs="*", default=["code=code-neox", "prose=prose-gpt2"],
                        help="DOMAIN=MODEL: the teacher each domain's share is measured against")
    parser.add_argument("--store", nargs="*", default=[], help="NAME=PATH: another fused store (same corpus)")
    parser.add_argument("--build", nargs="*", default=[], help="NAME=JSON: a fused store built with these overrides")
    parser.add_argument("--oracle-build", nargs="*", default=[],
                        help="NAME=JSON: an oracle store (the oracle in its specialist's place) with these overrides")
    parser.add_argument("--runs", nargs="+", required=True,
                        help="NAME=clm or NAME=STORE[:LAMBDA[:LOSS]][:KEY=VALUE,...] (module docstring)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--report", type=Path, help="also write the tables as Markdown here")
    args = parser.parse_args()
    project, work = args.project.resolve(), args.work.resolve()
    base = read_mapping(project / "params.yaml")
    stores: dict[str, Path | str | None] = {"clm": None, "fused": project / "data/fused"}
    stores |= {name: Path(path).resolve() for name, path in (s.split("=", 1) for s in args.store)}
    stores |= {name: build_store(project, work, name, base, json.loads(overrides))
               for name, overrides in (s.split("=", 1) for s in args.build)}
    teacher_of = {(store, d): m for store in stores if store != "clm" for d, m in (t.split("=") for t in args.teachers)}
    if args.oracle:
        entry = oracle_entry(base, args.oracle, args.oracle_steps)
        oracle = (args.oracle, entry, bootstrap_oracle(project, work, base, entry))
        for name, overrides in (spec.split("=", 1) for spec in [f"{ORACLE}={{}}", *args.oracle_build]):
            stores[name] = build_store(project, work, name, base, json.loads(overrides), oracle)
            teacher_of[(name, "code")] = ORACLE
        stores[LIVE] = LIVE
        base = deep_merge(base, {"bootstrap": {ORACLE: entry}})  # so that its scores and live runs can load it
        teacher_of[(LIVE, "code")] = ORACLE
    steps = base["train"]["steps"]
    baselines = {steps: [train_run(project, work, base, "clm", None, {}, seed) for seed in args.seeds]}
    runs = {}
    for spec in args.runs:
        name, _, how = spec.partition("=")
        store, train = parse_run(how)
        by_seed = [train_run(project, work, base, name, stores[store], train, seed) for seed in args.seeds]
        if store == "clm":
            baselines.setdefault(train.get("steps", steps), by_seed)
        runs[name] = (by_seed, store, train.get("steps", steps))
    teachers = teacher_scores(project, work, sorted(set(teacher_of.values())), base)
    table = summarise(runs, baselines, teachers, teacher_of)
    result = {"seeds": args.seeds, "teachers": teachers, "runs": table}
    if args.report:
        args.report.write_text("\n\n".join(markdown(table, split) for split in SPLITS) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
