"""The Markdown report: table marks, findings read off the numbers, PNG figures, byte-stable output, clear errors."""
from __future__ import annotations

import copy
import re

import polars as pl
import pytest

from fusesoup.errors import StageError
from fusesoup.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def evaluation() -> dict:
    """A teacher, the three targets and two soups; target-fused has the lowest `all` bpb, but not on `prose`."""
    return {
        "code-neox": {"code": {"bpb": 0.900}, "prose": {"bpb": 1.500}, "all": {"bpb": 1.200}},
        "target-base": {"code": {"bpb": 1.400, "accuracy": 0.300}, "prose": {"bpb": 1.300, "accuracy": 0.350},
                        "all": {"bpb": 1.350, "accuracy": 0.325}},
        "target-clm": {"code": {"bpb": 1.100, "accuracy": 0.400}, "prose": {"bpb": 1.000, "accuracy": 0.450},
                       "all": {"bpb": 1.050, "accuracy": 0.425}},
        "target-fused": {"code": {"bpb": 0.950, "accuracy": 0.450}, "prose": {"bpb": 1.080, "accuracy": 0.440},
                         "all": {"bpb": 1.015, "accuracy": 0.445}},
        "soup-vanilla": {"all": {"bpb": 1.030, "accuracy": 0.430}},
        "soup-learned": {"all": {"bpb": 1.010, "accuracy": 0.450}},
    }


def interval(diff: float, half: float) -> dict:
    verdict = "better" if diff + half < 0 else "worse" if diff - half > 0 else "tie"
    return {"diff": diff, "low": diff - half, "high": diff + half, "verdict": verdict}


def comparisons(evaluation: dict) -> dict:
    """As compare.compare writes them: the differences of `evaluation`, each with an interval of +-0.01 (+-0.025 for
    soup-vanilla against target-clm, so that that one holds zero))."""
    bpb = lambda model, domain: evaluation[model][domain]["bpb"]  # noqa: E731
    out = {f"target-fused vs {other}": {domain: interval(bpb("target-fused", domain) - bpb(other, domain), 0.01)
                                         for domain in ("code", "prose", "all")}
           for other in ("target-clm", "target-base")}
    for soup in ("soup-learned", "soup-vanilla"):
        for other in ("target-clm", "target-fused"):
            half = 0.025 if (soup, other) == ("soup-vanilla", "target-clm") else 0.01
            out[f"{soup} vs {other}"] = {"all": interval(bpb(soup, "all") - bpb(other, "all"), half)}
    return out


def module_alphas() -> dict:
    groups = {f"model.layers.{layer}.{part}": [0.2 + 0.1 * layer, 0.8 - 0.1 * layer]
              for layer in range(2)
              for part in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "input_layernorm")}
    groups |= {"model.embed_tokens": [0.25, 0.75], "model.norm": [0.5, 0.5], "lm_head": [0.125, 0.875]}
    return {"ingredients": ["target-clm", "target-fused"], "granularity": "module", "groups": groups}


def interpolation() -> pl.DataFrame:
    alpha = [0.0, 0.25, 0.5, 0.75, 1.0]
    return pl.DataFrame({"alpha": alpha, "model_a": ["target-clm"] * 5, "model_b": ["target-fused"] * 5,
                         "valid_bpb": [1.05, 1.03, 1.02, 1.01, 1.015], "test_bpb": [1.06, 1.04, 1.03, 1.02, 1.02]})


def training() -> dict[str, pl.DataFrame]:
    steps = list(range(0, 50, 10))
    clm = [3.0, 2.5, 2.2, 2.1, 2.05]
    fusion = [2.0, 1.6, 1.4, 1.3, 1.25]
    frame = {"step": steps, "lr": [1e-4] * 5, "tokens": [s * 512 for s in steps]}
    return {"clm": pl.DataFrame(frame | {"loss": clm, "clm": clm, "fusion": [0.0] * 5}),
            "fused": pl.DataFrame(frame | {"loss": [0.9 * c + 0.1 * f for c, f in zip(clm, fusion)], "clm": clm,
                                           "fusion": fusion})}


def report(tmp_path, **changes) -> str:
    scores = changes.get("evaluation", evaluation())
    inputs = {"evaluation": scores, "interpolation": interpolation(), "training": training(),
              "alphas": {"soup-learned": module_alphas()}, "missing": {"valid": [], "test": []}} | changes
    if "comparisons" not in inputs:
        inputs["comparisons"] = comparisons(scores)
    return write_report(tmp_path / "report", **inputs, target="target-base").read_text()


def row(text: str, model: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {model} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def header(text: str) -> list[str]:
    return row(text, "model")


def test_table_has_a_row_per_model_in_order_with_best_values_bold_and_dashes_for_absent(tmp_path):
    text = report(tmp_path)
    assert header(text) == ["model", "bpb code", "bpb prose", "bpb all", "acc code", "acc prose", "acc all"]
    baselines = text.split("## Baselines")[1].split("## Findings")[0]
    models = [line.split("|")[1].strip() for line in baselines.splitlines() if line.startswith("| ")][2:]
    assert models == ["code-neox", "target-base", "target-clm", "target-fused", "soup-learned", "soup-vanilla"]
    assert row(text, "code-neox") == ["code-neox", "**0.900**", "1.500", "1.200", "—", "—", "—"]
    assert row(text, "target-clm") == ["target-clm", "1.100", "**1.000**", "1.050", "0.400", "**0.450**", "0.425"]
    assert row(text, "target-fused") == ["target-fused", "0.950", "1.080", "1.015", "**0.450**", "0.440", "0.445"]
    # soup-learned is measured on `all` only, where both its bpb and its accuracy are the best
    assert row(text, "soup-learned") == ["soup-learned", "—", "—", "**1.010**", "—", "—", "**0.450**"]
    assert "lower bpb (bits per byte) is better, higher acc" in text.lower()


def test_findings_call_a_win_only_when_the_interval_excludes_zero(tmp_path):
    text = report(tmp_path)
    assert "- Lowest `all` bpb: soup-learned (1.010)." in text
    assert "- On `code`, target-fused beats target-clm by 0.1500 bpb (CI [-0.1600, -0.1400]) (0.950 vs 1.100)." in text
    assert ("- On `prose`, target-fused does not beat target-clm: 0.0800 bpb worse (CI [+0.0700, +0.0900]) "
            "(1.080 vs 1.000).") in text
    assert "- On `all`, target-fused beats target-base by 0.3350 bpb (CI [-0.3450, -0.3250]) (1.015 vs 1.350)." in text
    # soup-learned is 0.005 better than target-fused, inside +-0.01: no win
    assert ("- soup-learned (1.010 `all` bpb) beats target-clm by 0.0400 (CI [-0.0500, -0.0300]) but not "
            "target-fused (-0.0050, CI [-0.0150, +0.0050]).") in text
    assert ("- soup-vanilla (1.030 `all` bpb) beats none of its ingredients: target-clm (-0.0200, CI [-0.0450, "
            "+0.0050]), target-fused (+0.0150, CI [+0.0050, +0.0250]).") in text
    assert ("95% paired bootstrap confidence interval (CI): the resampling unit is the test document (all chunks of "
            "a document together), 1000 resamples with replacement") in text


def test_the_comparisons_table_shows_every_interval_and_verdict(tmp_path):
    text = report(tmp_path)
    section = text.split("## Comparisons")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0] == "| model | vs | domain | bpb difference | 95% CI | verdict |"
    assert len(table) == 2 + 2 * 3 + 4  # heading, rule, target-fused against 2 models on 3 domains, 2 soups x 2
    assert "| target-fused | target-clm | prose | +0.0800 | [+0.0700, +0.0900] | loss |" in table
    assert "| target-fused | target-base | all | -0.3350 | [-0.3450, -0.3250] | win |" in table
    assert "| soup-learned | target-fused | all | -0.0050 | [-0.0150, +0.0050] | tie (CI holds 0) |" in table


def test_findings_flip_when_fused_loses(tmp_path):
    worse = evaluation()
    worse["target-fused"]["code"]["bpb"] = 1.25
    worse["target-fused"]["all"]["bpb"] = 1.1
    text = report(tmp_path, evaluation=worse)
    assert "- On `code`, target-fused does not beat target-clm: 0.1500 bpb worse (CI [+0.1400, +0.1600])" in text
    assert "- On `code`, target-fused beats target-base by 0.1500 bpb" in text
    assert "- On `all`, target-fused does not beat target-clm: 0.0500 bpb worse" in text


def test_domains_a_held_out_split_lacks_are_named_above_the_table(tmp_path):
    assert "no test documents" not in report(tmp_path)
    text = report(tmp_path, missing={"valid": ["web"], "test": ["legal", "web"]})
    baselines = text.split("## Baselines")[1].split("| model |")[0]
    assert ("**Domain `legal` has no test documents**: trained on but not scored: no column below. "
            "**Domain `web` has no test documents**: trained on but not scored: no column below. "
            "**Domain `web` has no valid documents**: the soups were tuned without it.") in baselines


def test_figures_are_pngs_and_every_one_is_linked(tmp_path):
    text = report(tmp_path)
    pngs = sorted(p.name for p in (tmp_path / "report" / "figures").iterdir())
    assert pngs == ["alphas-soup-learned.png", "interpolation.png", "training.png"]
    for name in pngs:
        data = (tmp_path / "report" / "figures" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert sorted(re.findall(r"\]\(figures/([^)]+)\)", text)) == pngs
    # the non-layer groups are listed with their alphas, the per-layer ones are only drawn
    assert "| group | target-clm | target-fused |" in text
    assert "| `model.embed_tokens` | 0.250 | 0.750 |" in text and "| `lm_head` | 0.125 | 0.875 |" in text
    assert "model.layers.0" not in text


def test_layer_and_model_granularity_and_absent_inputs(tmp_path):
    layer = {"ingredients": ["a", "b"], "granularity": "layer",
             "groups": {"model.layers.0": [0.3, 0.7], "model.layers.1": [0.6, 0.4], "model.norm": [0.5, 0.5]}}
    whole = {"ingredients": ["a", "b"], "granularity": "model", "groups": {"model": [0.4, 0.6]}}
    text = report(tmp_path, interpolation=interpolation().clear(), training={},
                  alphas={"soup-learned": layer, "soup-l1-0.001": whole})
    pngs = sorted(p.name for p in (tmp_path / "report" / "figures").iterdir())
    assert pngs == ["alphas-soup-l1-0.001.png", "alphas-soup-learned.png"]
    assert sorted(re.findall(r"\]\(figures/([^)]+)\)", text)) == pngs
    assert "| `model` | 0.400 | 0.600 |" in text and "| `model.norm` | 0.500 | 0.500 |" in text


def test_writing_twice_gives_identical_bytes(tmp_path):
    def snapshot() -> dict[str, bytes]:
        report(tmp_path)
        return {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted((tmp_path / "report").rglob("*"))
                if p.is_file()}
    first = snapshot()
    assert len(first) == 4
    assert snapshot() == first


def test_a_different_input_changes_the_figure(tmp_path):
    report(tmp_path)
    before = (tmp_path / "report" / "figures" / "alphas-soup-learned.png").read_bytes()
    changed = module_alphas()
    changed["groups"]["model.layers.1.mlp.down_proj"] = [0.9, 0.1]
    report(tmp_path, alphas={"soup-learned": changed})
    assert (tmp_path / "report" / "figures" / "alphas-soup-learned.png").read_bytes() != before


def test_errors_name_the_file_and_the_key(tmp_path):
    with pytest.raises(StageError, match=r"plots/interpolation\.csv: missing column\(s\) 'test_bpb'"):
        report(tmp_path, interpolation=interpolation().drop("test_bpb"))
    broken = evaluation()
    del broken["target-clm"]["prose"]["bpb"]
    with pytest.raises(StageError, match=r"metrics/eval\.json: model 'target-clm', domain 'prose' has no 'bpb'"):
        report(tmp_path, evaluation=broken, comparisons={})
    odd = comparisons(evaluation())
    odd["target-fused vs target-clm"]["code"]["low"] = "n/a"
    with pytest.raises(StageError, match=r"metrics/eval\.json: comparisons: 'target-fused vs target-clm', domain "
                                         r"'code': 'low' is 'n/a', not a number"):
        report(tmp_path, comparisons=odd)
    with pytest.raises(StageError, match=r"plots/train/fused\.csv: missing column\(s\) 'fusion'"):
        report(tmp_path, training={"fused": training()["fused"].drop("fusion")})
    short = copy.deepcopy(module_alphas())
    short["groups"]["lm_head"] = [1.0]
    with pytest.raises(StageError, match=r"alphas of 'soup-learned': group 'lm_head' has 1 alphas for 2 ingredients"):
        report(tmp_path, alphas={"soup-learned": short})
    assert not (tmp_path / "report").exists()
