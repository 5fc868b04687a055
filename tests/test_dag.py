"""End to end: the DVC DAG on the tiny profile, built by the Prefect flow, builds every output, reruns nothing
when nothing changed, and reruns exactly the stages whose params changed."""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusesoup.corpus import SPLITS, read_split
from fusesoup.logits.sparse_store import ALIGNED_EXTRAS, FUSED_EXTRAS, SparseStore
from fusesoup.logits.store import LogitStore
from fusesoup.params import FUSED_ONLY_TRAIN_KEYS, STAGE_PARAMS, load_params
from tests.dvc_project import commit_all, dvc, git_status, make_project, run, set_param

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def flow_built(tmp_path_factory, prefect_api) -> tuple[Path, dict[str, list[str]]]:
    """A tiny-profile copy of the project after one full run of the Prefect flow (each stage a `dvc repro -s`,
    two at a time), and what the flow returned. The product's scheduled path builds it, so the tests below check
    what that path leaves; test_flow.py checks byte for byte that the flow's dvc.lock is `dvc repro`'s."""
    from flows.pipeline import pipeline
    from fusesoup.params import Flow

    repo = make_project(tmp_path_factory.mktemp("dag") / "project")
    return repo, pipeline(str(repo), Flow(retries=0, max_parallel=2))


@pytest.fixture(scope="module")
def built(flow_built) -> Path:
    return flow_built[0]


def bootstrap_names(repo: Path) -> list[str]:
    return sorted(load_params(repo / "params.yaml").bootstrap)


def stage_names(repo: Path) -> list[str]:
    params = load_params(repo / "params.yaml")
    return ["prepare_corpus", *(f"bootstrap@{m}" for m in params.bootstrap), *(f"extract@{m}" for m in params.sources),
            *(f"align@{m}" for m in params.sources), "fuse", "train@clm", "train@fused", "soup", "evaluate"]


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dag_has_the_contract_stage_names(built):
    dag = dvc(built, "dag", "--md").stdout
    for name in stage_names(built):
        assert name in dag


def test_repro_writes_corpus_models_and_metrics(built):
    manifest = json.loads((built / "data/corpus/manifest.json").read_text())
    for split in SPLITS:
        frame = read_split(built / "data/corpus", split)
        assert frame.height == manifest["splits"][split]["chunks"] > 0
        assert set(frame["domain"].unique()) == {"code", "prose"}
    for name in bootstrap_names(built):
        model_dir = built / "data/models" / name
        assert (model_dir / "model.safetensors").is_file()
        assert (model_dir / "tokenizer.json").is_file()
        assert not list(model_dir.glob("*.bin"))
        metrics = json.loads((built / "metrics/bootstrap" / f"{name}.json").read_text())
        for domain in ["code", "prose", "all"]:
            bpb = metrics["domains"][domain]["bpb"]
            assert math.isfinite(bpb) and 0 < bpb < 16
        assert (built / "plots/bootstrap" / f"{name}.csv").read_text().startswith("step,")
    train_rows = manifest["splits"]["train"]["chunks"]
    for name in load_params(built / "params.yaml").sources:
        store = LogitStore(built / "data/logits" / name)
        assert store.k == 10 and len(store.shards("train")) == math.ceil(train_rows / 64)
        first = next(store.iter_batches("train", batch_sequences=2))
        assert [item.sequence for item in first] == [0, 1]
        metrics = json.loads((built / "metrics/extract" / f"{name}.json").read_text())
        assert metrics["splits"]["train"]["sequences"] == train_rows


def test_alignment_and_fusion_outputs(built):
    params = load_params(built / "params.yaml")
    alignment = json.loads((built / "metrics/alignment.json").read_text())
    assert set(alignment) == set(params.sources)
    own = alignment[params.target]["positions"]["train"]["all"]
    assert own["exact"] == 1.0  # the target aligned to itself is the identity
    for name in params.sources:
        for shares in alignment[name]["positions"]["train"].values():
            assert shares["exact"] + shares["mapped"] + shares["span"] + shares["fallback"] == pytest.approx(1.0)
        vocab = alignment[name]["vocab_map"]
        assert vocab["exact"] + vocab["nearest"] + vocab["unmapped"] == pytest.approx(1.0)
    fusion = json.loads((built / "metrics/fusion.json").read_text())
    assert fusion["method"] == "min_ce" and fusion["sources"] == params.sources
    for by_source in fusion["splits"]["train"].values():
        assert sum(v["sequence_wins"] for v in by_source.values()) == pytest.approx(1.0)
        assert sum(v["token_wins"] for v in by_source.values()) == pytest.approx(1.0)

    target = LogitStore(built / "data/logits" / params.target)
    aligned = {name: SparseStore(built / "data/aligned" / name, ALIGNED_EXTRAS) for name in params.sources}
    fused = SparseStore(built / "data/fused", FUSED_EXTRAS)
    batches = zip(target.iter_batches("train", 8), fused.iter_batches("train", 8),
                  *(store.iter_batches("train", 8) for store in aligned.values()))
    for own_batch, fused_batch, *aligned_batches in itertools.islice(batches, 3):
        for stored, item, *sources in zip(own_batch, fused_batch, *aligned_batches):
            assert item.sequence == stored.sequence and item.input_ids.tolist() == stored.logits.input_ids.tolist()
            winner = int(np.argmin([s.extras["ce_codes"].astype(np.int64).sum() for s in sources]))
            assert (item.extras["source"] == winner).all()  # min_ce: the whole sequence from one source
            assert item.rows.ids.tolist() == sources[winner].rows.ids.tolist()
            totals = np.bincount(item.rows.rows_of_entries(), weights=np.exp(item.rows.logprobs.astype(np.float64)))
            np.testing.assert_allclose(totals, 1.0, rtol=1e-5)


def test_continued_training_outputs(built):
    clm_curve = (built / "plots/train/clm.csv").read_text().splitlines()
    fused_curve = (built / "plots/train/fused.csv").read_text().splitlines()
    assert clm_curve[0] == fused_curve[0] == "step,loss,clm,fusion,chunk,uld,lr,tokens"
    steps = load_params(built / "params.yaml").train.steps
    assert len(clm_curve) == len(fused_curve) == steps + 1
    # same tokens in the same order; the fusion term only in train@fused
    assert [row.split(",")[5] for row in clm_curve[1:]] == [row.split(",")[5] for row in fused_curve[1:]]
    assert all(row.split(",")[3] == "" for row in clm_curve[1:]) and float(fused_curve[1].split(",")[3]) > 0
    for variant in ("clm", "fused"):  # wall-clock figures in a log DVC does not track; no MFU on the CPU
        throughput = (built / "data/logs/train" / f"{variant}.csv").read_text().splitlines()
        assert throughput[0] == "step,tok_s,mfu" and len(throughput) == steps + 1
        assert all(float(row.split(",")[1]) > 0 and row.split(",")[2] == "" for row in throughput[1:])
    for variant in ("clm", "fused"):
        model_dir = built / "data/models" / f"target-{variant}"
        assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
        metrics = json.loads((built / "metrics/train" / f"{variant}.json").read_text())
        for split in ("valid", "test"):
            assert set(metrics[split]) == {"code", "prose", "all"}
            assert all(0 < m["bpb"] < 16 for m in metrics[split].values())
    assert not (built / "data/checkpoints/clm").exists()  # removed once the model is saved


def test_a_llava_ingredient_gives_a_multimodal_soup(built, tmp_path):
    """SoupLM's setting in miniature: target-base, target-clm and a LLaVA whose language model is target-clm's (its
    vocabulary grown by <image>), souped by the soup stage into a text soup and a LLaVA soup that generates."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file
    from transformers import (AutoConfig, AutoTokenizer, CLIPVisionConfig, LlamaForCausalLM, LlavaConfig,
                              LlavaForConditionalGeneration)

    models = tmp_path / "models"
    models.mkdir()
    for name in ("target-base", "target-clm"):
        (models / name).symlink_to(built / "data/models" / name)
    tokenizer = AutoTokenizer.from_pretrained(built / "data/models/target-clm")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    text = AutoConfig.from_pretrained(built / "data/models/target-clm")
    rows = text.vocab_size + 1
    text.vocab_size = rows
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text.to_dict(),
                                                      image_token_index=rows - 1, image_seq_length=16))
    clm = LlamaForCausalLM.from_pretrained(built / "data/models/target-clm")
    clm.resize_token_embeddings(rows)
    llava.model.language_model.load_state_dict(clm.model.state_dict())
    llava.lm_head.load_state_dict(clm.lm_head.state_dict())
    llava.save_pretrained(models / "llava")
    tokenizer.save_pretrained(models / "llava")

    raw = yaml.safe_load((built / "params.yaml").read_text())
    raw["models"] = {"llava": {"source": "path", "path": str(models / "llava")}}
    raw["soup"].update(ingredients=["target-base", "target-clm", "llava"], strategies=["vanilla", "learned"],
                       steps=2, probe={"between": ["target-base", "llava"], "points": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "soups"
    subprocess.run([sys.executable, "-m", "stages.soup", "--params", str(tmp_path / "params.yaml"), "--corpus",
                    str(built / "data/corpus"), "--models", str(models), "--out", str(out), "--metrics",
                    str(tmp_path / "soup.json"), "--plots", str(tmp_path / "probe.csv")], cwd=built, check=True)

    for soup in ("soup-vanilla", "soup-learned"):
        recipe = json.loads((out / soup / "soup.json").read_text())
        assert recipe["multimodal"] == {"ingredient": "llava", "directory": "multimodal", "language_model": {
            "language_model.model.": "model.", "language_model.lm_head.": "lm_head."}}
        assert "No mergekit replay" in (out / soup / "mergekit.yaml").read_text()
        mixed = load_file(out / soup / "model.safetensors")
        soup_model = LlavaForConditionalGeneration.from_pretrained(out / soup / "multimodal").eval()
        head = soup_model.lm_head.weight.detach()
        assert torch.equal(head[: rows - 1], mixed["lm_head.weight"])
        assert torch.equal(head[rows - 1], llava.lm_head.weight[rows - 1].detach())  # <image>: LLaVA's own row
        norm = soup_model.model.language_model.norm.weight.detach()
        assert torch.equal(norm, mixed["model.norm.weight"])
    vanilla = load_file(out / "soup-vanilla/model.safetensors")
    parts = [load_file(models / name / "model.safetensors")["model.norm.weight"] for name in ("target-base", "target-clm")]
    torch.testing.assert_close(vanilla["model.norm.weight"], (parts[0] + 2 * parts[1]) / 3, rtol=0, atol=1e-6)
    prompt = tokenizer(" def f(x):", return_tensors="pt", add_special_tokens=False).input_ids
    ids = torch.cat([torch.full((1, 16), rows - 1), prompt], dim=1)  # 16 image features: 32 px in 8 px patches
    generated = soup_model.generate(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32), max_new_tokens=3,
                                    do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3


def test_task_arithmetic_and_ties_soups_relative_to_the_base(built, tmp_path):
    """The opt-in baselines: each lambda of soup.task_vectors scored on valid, the best written as mergekit's
    method would write it, with its mergekit config."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from fusesoup.soup.task_vectors import task_arithmetic, ties

    raw = yaml.safe_load((built / "params.yaml").read_text())
    raw["soup"].update(strategies=["task_arithmetic", "ties"], task_vectors={"weight": 0.5, "density": 0.4,
                                                                             "lambdas": [0.5, 1.0]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "soups"
    subprocess.run([sys.executable, "-m", "stages.soup", "--params", str(tmp_path / "params.yaml"), "--corpus",
                    "data/corpus", "--models", "data/models", "--out", str(out), "--metrics",
                    str(tmp_path / "soup.json"), "--plots", str(tmp_path / "probe.csv")], cwd=built, check=True)
    names = load_params(built / "params.yaml").soup_ingredients()
    states = [load_file(built / "data/models" / name / "model.safetensors") for name in names]
    for method in ("task_arithmetic", "ties"):
        recipe = json.loads((out / f"soup-{method}/soup.json").read_text())
        assert recipe["base"] == names[0] and recipe["weights"] == [0.0, 0.5, 0.5]
        trials = {float(lam): bpb for lam, bpb in recipe["valid_bpb_by_lambda"].items()}
        assert set(trials) == {0.5, 1.0} and recipe["valid_bpb"] == min(trials.values())
        assert trials[recipe["lambda"]] == recipe["valid_bpb"]
        merged = load_file(out / f"soup-{method}/model.safetensors")
        name = "model.layers.0.mlp.down_proj.weight"
        others = [state[name] for state in states[1:]]
        expected = (ties(states[0][name], others, [0.5, 0.5], 0.4, recipe["lambda"]) if method == "ties" else
                    task_arithmetic(states[0][name], others, [0.5, 0.5], recipe["lambda"]))
        assert torch.equal(merged[name], expected)
        config = yaml.safe_load((out / f"soup-{method}/mergekit.yaml").read_text())
        assert config["merge_method"] == method and config["base_model"].endswith(names[0])
        assert [m["parameters"]["weight"] for m in config["models"]] == [0.5, 0.5]
    assert set(json.loads((tmp_path / "soup.json").read_text())["soups"]) == {"soup-task_arithmetic", "soup-ties"}


def test_soups_probe_and_evaluation(built):
    from safetensors.numpy import load_file

    params = load_params(built / "params.yaml")
    names = params.soup_ingredients()
    soups = json.loads((built / "metrics/soup.json").read_text())
    assert set(soups["soups"]) == set(params.soup.soup_names()) and set(soups["ingredients"]) == set(names)
    # greedy starts from the best ingredient and only takes what improves the valid score
    assert soups["soups"]["soup-greedy"]["valid_bpb"] <= min(soups["ingredients"].values())
    ingredients = [load_file(built / "data/models" / name / "model.safetensors") for name in names]
    vanilla = load_file(built / "data/soups/soup-vanilla/model.safetensors")
    for tensor in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
        np.testing.assert_allclose(vanilla[tensor], sum(w[tensor] for w in ingredients) / len(names), atol=1e-6)
    learned = json.loads((built / "data/soups/soup-learned/soup.json").read_text())
    assert learned["ingredients"] == names and "model.layers.0.self_attn.q_proj" in learned["groups"]
    assert all(abs(sum(alpha) - 1) < 1e-5 for alpha in learned["groups"].values())
    assert "merge_method: linear" in (built / "data/soups/soup-learned/mergekit.yaml").read_text()

    probe = (built / "plots/interpolation.csv").read_text().splitlines()
    assert probe[0] == "alpha,model_a,model_b,valid_bpb,test_bpb" and len(probe) == params.soup.probe.points + 1
    first = probe[1].split(",")
    assert float(first[0]) == 0 and math.isclose(float(first[3]), soups["ingredients"][first[1]], rel_tol=1e-6)

    metrics = json.loads((built / "metrics/eval.json").read_text())
    assert metrics["missing_domains"] == {"valid": [], "test": []}
    evaluation = metrics["models"]
    assert set(evaluation) == {*params.sources, "target-clm", "target-fused", *params.soup.soup_names()}
    for model, domains in evaluation.items():
        assert set(domains) == {"code", "prose", "all"}
        assert ("accuracy" in domains["all"]) == (model not in params.sources or model == params.target), model
    trained = json.loads((built / "metrics/train/clm.json").read_text())
    assert math.isclose(evaluation["target-clm"]["all"]["bpb"], trained["test"]["all"]["bpb"], rel_tol=1e-6)
    report = (built / "reports/report.md").read_text()
    for model in evaluation:
        assert f"| {model} |" in report
    assert metrics["bootstrap"]["unit"] == "test documents" and metrics["bootstrap"]["resamples"] == 1000
    fused = metrics["comparisons"]["target-fused vs target-clm"]
    assert set(fused) == {"code", "prose", "all"} and set(metrics["comparisons"]) >= {
        f"{soup} vs {name}" for soup in params.soup.soup_names() for name in names}
    for domain, interval in fused.items():  # the difference is the two bpb's, the interval around it
        # the bpb sums each batch in float32 (as cross_entropy always has), the intervals each text in float64
        assert math.isclose(interval["diff"], evaluation["target-fused"][domain]["bpb"]
                            - evaluation["target-clm"][domain]["bpb"], abs_tol=1e-5)
        assert interval["low"] <= interval["diff"] <= interval["high"]
        verdict = {"better": "win", "worse": "loss", "tie": "tie (CI holds 0)"}[interval["verdict"]]
        assert f"| target-fused | target-clm | {domain} | {interval['diff']:+.4f} |" in report and verdict in report
    for figure in re.findall(r"\(figures/([^)]+\.png)\)", report):
        assert (built / "reports/figures" / figure).read_bytes().startswith(b"\x89PNG")


def test_second_repro_is_a_no_op(built):
    lock_before = (built / "dvc.lock").read_bytes()
    out = dvc(built, "repro").stdout
    assert "Running stage" not in out
    assert "didn't change, skipping" in out
    assert (built / "dvc.lock").read_bytes() == lock_before


@pytest.fixture(scope="module")
def committed(built, tmp_path_factory) -> Path:
    """A copy of the built project with dvc.lock, metrics/ and plots/ committed, as after `make repro` and a commit."""
    repo = tmp_path_factory.mktemp("committed") / "project"
    shutil.copytree(built, repo, symlinks=True)
    commit_all(repo)
    return repo


def test_a_rerun_leaves_every_tracked_output_byte_identical(committed):
    """Two runs of a stage give the same bytes: train@clm and train@fused run again (their plots hold no wall-clock
    figure) leave their models (dvc.lock's hashes), metrics and plots as committed; so does evaluate, whose report
    is a cached output (dvc.lock holds its hash; the repo's .gitignore already names it as DVC writes it)."""
    out = dvc(committed, "repro", "--force", "--single-item", "train@clm", "train@fused", "evaluate").stdout
    assert ran_stages(out) == {"train@clm", "train@fused", "evaluate"}
    lock = yaml.safe_load((committed / "dvc.lock").read_text())
    report = next(out["md5"] for out in lock["stages"]["evaluate"]["outs"] if out["path"] == "reports")
    assert (committed / ".dvc/cache/files/md5" / report[:2] / report[2:]).is_file()  # in DVC's cache: pushed, pulled
    assert run(["git", "check-ignore", "-q", "reports"], committed).returncode == 0
    assert run(["git", "check-ignore", "-q", "dvc.lock"], committed, check=False).returncode == 1  # committed
    assert git_status(committed) == ""
    assert json.loads(dvc(committed, "status", "--json").stdout) == {}


def test_a_pushed_cache_makes_a_fresh_clone_clean(committed, tmp_path):
    """Sharing the cache (README): dvc push from one clone to a local remote, then in a fresh git clone dvc pull
    leaves a clean workspace that `dvc repro` finds up to date; a new teacher there marks only its own stages and
    those downstream of the fusion, so every pulled store is reused."""
    dvc(committed, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    commit_all(committed, "remote")
    dvc(committed, "push")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(committed), str(clone)], tmp_path)
    assert not (clone / "data").exists() and not (clone / "reports").exists()
    dvc(clone, "pull")
    assert (clone / "reports/report.md").read_bytes() == (committed / "reports/report.md").read_bytes()
    assert json.loads(dvc(clone, "status", "--json").stdout) == {}
    out = dvc(clone, "repro").stdout
    assert "Running stage" not in out and "Stage 'train@clm' didn't change, skipping" in out
    assert git_status(clone) == ""

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["bootstrap"]["code-neox-2"] = {**params["bootstrap"]["code-neox"], "architecture": "llama"}
    params["sources"].append("code-neox-2")
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(dvc(clone, "status", "--json").stdout)) == {
        "bootstrap@code-neox-2", "extract@code-neox-2", "align@code-neox-2", "fuse", "evaluate"}


def test_one_specialists_params_mark_only_its_bootstrap_stage(built):
    params_before = (built / "params.yaml").read_text()
    try:
        set_param(built, "bootstrap.code-neox.train.steps", 13)
        status = json.loads(dvc(built, "status", "--json").stdout)
        assert set(status) == {"bootstrap@code-neox"}
        # DVC 3 reports a changed param as a changed dep of params.yaml, naming the key it tracks
        assert status["bootstrap@code-neox"] == [{"changed deps": {"params.yaml": {"bootstrap.code-neox": "modified"}}}]
        # a dry run cannot know that the model will change, so downstream stages show up only in a real run
        # (test_extraction_reruns_for_k_only_and_a_new_teacher_reuses_the_other_stores)
        assert ran_stages(dvc(built, "repro", "--dry").stdout) == {"bootstrap@code-neox"}
    finally:
        (built / "params.yaml").write_text(params_before)
    assert json.loads(dvc(built, "status", "--json").stdout) == {}


def test_corpus_params_mark_the_corpus_stage(built):
    params_before = (built / "params.yaml").read_text()
    try:
        set_param(built, "corpus.max_chunk_bytes", 390)
        status = json.loads(dvc(built, "status", "--json").stdout)
        assert set(status) == {"prepare_corpus"}
        assert ran_stages(dvc(built, "repro", "--dry").stdout) == {"prepare_corpus"}
    finally:
        (built / "params.yaml").write_text(params_before)


def readers(repo: Path, key: str) -> set[str]:
    """The stages of `repo` that read params key `key`, by params.STAGE_PARAMS: an entry of the stage's list is the
    key, or a section above it (`${key}` and `${item}` stand for the stage's foreach item)."""
    found = set()
    for stage in stage_names(repo):
        template, _, item = stage.partition("@")
        entries = STAGE_PARAMS[stage] if stage in STAGE_PARAMS else STAGE_PARAMS[template]
        if any(key == entry or key.startswith(entry + ".")
               for entry in (e.replace("${key}", item).replace("${item}", item) for e in entries)):
            found.add(stage)
    return found


# One key of each stage's section, the fusion terms, a shared train key and the runtime keys not every stage reads,
# each with another valid value; which stages they mark comes from params.STAGE_PARAMS.
PROBES = {**{f"train.{key}": value for key, value in zip(FUSED_ONLY_TRAIN_KEYS, (0.5, "kl", 0.0, 5.0, 0.5))},
          "train.steps": 9, "runtime.peak_tflops": 100.0, "runtime.dtype": "float32", "seed": 1,
          "extract.k": 4, "align.spans": "expand", "fuse.temperature": 2.0, "soup.steps": 3, "soup.l1": [0.01],
          "evaluate.batch_tokens": 4096}


def test_each_key_marks_exactly_the_stages_that_read_it(built):
    """`dvc status` after one key changed names exactly its readers: a fusion term train@fused and not train@clm,
    a shared train key both (dvc status runs nothing, so each probe costs one status)."""
    assert set(FUSED_ONLY_TRAIN_KEYS) <= {key.removeprefix("train.") for key in PROBES}
    params_before = (built / "params.yaml").read_text()
    try:
        for key, value in PROBES.items():
            set_param(built, key, value)
            status = json.loads(dvc(built, "status", "--json").stdout)
            assert set(status) == readers(built, key), key
            (built / "params.yaml").write_text(params_before)
    finally:
        (built / "params.yaml").write_text(params_before)
    assert json.loads(dvc(built, "status", "--json").stdout) == {}
    assert readers(built, "train.lambda") == {"train@fused"}
    assert readers(built, "train.steps") == {"train@clm", "train@fused"}


def test_a_bad_param_stops_the_stage_with_one_line(built, tmp_path):
    repo = make_project(tmp_path / "bad")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpus"]["max_chunk_bytes"] = -1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = dvc(repo, "repro", "-s", "prepare_corpus", check=False)
    assert done.returncode != 0
    assert "error: params.yaml: corpus.max_chunk_bytes: Input should be greater than 0, got -1" in done.stderr + done.stdout
    assert not (repo / "data/corpus").exists()


def test_the_prefect_flow_runs_every_stage_once_and_leaves_what_dvc_repro_would(flow_built):
    repo, ran = flow_built
    assert sorted(ran) == sorted(stage_names(repo))
    assert list(ran)[0] == "prepare_corpus"
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}  # the lock agrees with every dep and out
    # entries in the order `dvc repro` writes them (its run order), whatever order the flow's stages finished in
    planned = re.findall(r"Running stage '([^']+)'", dvc(repo, "repro", "--dry", "--force").stdout)
    assert list(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == planned


def test_a_change_to_the_loss_marks_the_stages_that_run_it(built, tmp_path):
    repo = tmp_path / "copy"
    shutil.copytree(built, repo, symlinks=True)
    with (repo / "fusesoup/train/loss.py").open("a") as loss:
        loss.write("\n# changed\n")
    assert set(json.loads(dvc(repo, "status", "--json").stdout)) == {"train@clm", "train@fused", "soup"}


def test_extraction_reruns_for_k_only_and_a_new_teacher_reuses_the_other_stores(built, tmp_path):
    """Cached teacher logits across experiments: a new teacher (as a `dvc exp run` on the changed params) extracts
    only its own store; a fusion change downstream of extraction extracts nothing."""
    repo = tmp_path / "copy"
    shutil.copytree(built, repo, symlinks=True)
    set_param(repo, "extract.k", 4)
    status = json.loads(dvc(repo, "status", "--json").stdout)
    assert set(status) == {f"extract@{m}" for m in load_params(repo / "params.yaml").sources}
    set_param(repo, "extract.k", 10)
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}
    commit_all(repo)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["bootstrap"]["code-neox-2"] = {**params["bootstrap"]["code-neox"], "architecture": "llama"}
    params["sources"].append("code-neox-2")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(repo, "exp", "run").stdout
    # soup reruns only if target-fused changed: on the tiny profile the new teacher may win no sequence at all
    assert ran_stages(out) - {"soup"} == {"bootstrap@code-neox-2", "extract@code-neox-2",
                                          "align@code-neox-2", "fuse", "train@fused", "evaluate"}
    for name in load_params(built / "params.yaml").sources:
        assert f"Stage 'extract@{name}' didn't change, skipping" in out
    assert LogitStore(repo / "data/logits/code-neox-2").k == 10
    out = dvc(repo, "exp", "run", "-S", "fuse.method=avg_ce").stdout  # downstream of extraction: no extract reruns
    assert ran_stages(out) == {"fuse", "train@fused", "soup", "evaluate"}  # train@clm reads the target's own tokens
    assert json.loads((repo / "metrics/fusion.json").read_text())["method"] == "avg_ce"


def test_a_prefect_overrides_run_trains_train_fused_alone_and_dvc_exp_show_has_it(committed, prefect_api):
    """The flow's `overrides` (a `dvc exp run --temp`) reuse what a lambda does not change as `dvc repro` does:
    train@fused retrains, train@clm, fuse, extract@ and align@ do not; the workspace stays as committed and
    `dvc exp show` lists the experiment with its lambda and train@fused's figures."""
    from flows.pipeline import pipeline
    from fusesoup.params import Flow

    lines = pipeline(str(committed), Flow(retries=0, max_parallel=2), overrides=["train.lambda=0.6"])["experiment"]
    ran = ran_stages("\n".join(lines))
    assert "train@fused" in ran and ran <= {"train@fused", "soup", "evaluate"}
    assert git_status(committed) == ""
    rows = list(csv.DictReader(io.StringIO(dvc(committed, "exp", "show", "--csv").stdout)))
    [row] = [row for row in rows if row["params.yaml:train.lambda"] == "0.6"]
    baseline = next(row for row in rows if row["typ"] == "baseline")
    assert row["Experiment"] and row["metrics/train/fused.json:train.lambda"] == "0.6"
    assert row["metrics/train/fused.json:train.final_loss"] != baseline["metrics/train/fused.json:train.final_loss"]
    assert row["metrics/train/clm.json:train.final_loss"] == baseline["metrics/train/clm.json:train.final_loss"]


def test_a_queued_lambda_sweep_trains_train_fused_alone(committed):
    """A fusion sweep as queued DVC experiments: two lambdas run train@fused twice, and train@clm, fuse, extract@
    and align@ never; a swept lambda set again is restored from the run cache, not trained (runs last: it leaves
    the workspace at that lambda)."""
    for lam in ("0.5", "0.7"):
        dvc(committed, "exp", "run", "--queue", "-S", f"train.lambda={lam}")
    ran = re.findall(r"Running stage '([^']+)'", dvc(committed, "exp", "run", "--run-all").stdout)
    assert ran.count("train@fused") == 2 and set(ran) <= {"train@fused", "soup", "evaluate"}
    out = dvc(committed, "exp", "run", "-S", "train.lambda=0.5").stdout
    assert "Stage 'train@fused' is cached - skipping run" in out and "Running stage" not in out
    assert "metrics/train/fused.json" in dvc(committed, "metrics", "diff").stdout
