"""params.yaml: one validated schema for every knob of the pipeline.

Every stage loads the whole file through `load_params`, so a typo stops the pipeline at its first stage with
one line naming the file, the key path and what was expected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

# Names become DVC stage names (`bootstrap@<name>`) and directory names (`data/models/<name>`).
ModelName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
DomainName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
PositiveInt = Annotated[int, Field(gt=0)]


def _float_from_string(value: Any) -> Any:
    """A string that spells a number, as that float: DVC writes `-S train.lr=1e-5` as `lr: 1e-05`, which YAML 1.1
    reads as a string. Everything else goes on to strict validation (no bool or other string becomes a float)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# Models validate strictly (12.0 is no int, true no int, 1 no bool); floats alone also take a numeric string.
Real = Annotated[float, BeforeValidator(_float_from_string)]
NonNegative = Annotated[Real, Field(ge=0)]
PositiveFloat = Annotated[Real, Field(gt=0)]
Fraction = Annotated[Real, Field(ge=0, le=1)]
# Processes over a store's shards: 0 = one per CPU core (extract: one per GPU on CUDA). Not part of any key.
Workers = Annotated[int, Field(ge=0)]

# The method families, each named here once. Each module dispatches through one table keyed by these names
# (tests/test_registries.py checks that every table holds exactly its family), and errors.lookup's message lists them.
Architecture = Literal["llama", "gpt_neox", "gpt2"]  # bootstrap.ARCHITECTURES
VocabMethod = Literal["exact", "min_ed", "prefix"]  # align/vocab_map.VOCAB_MAPS
FuseMethod = Literal["min_ce", "avg_ce", "min_ce_token", "avg_ce_token"]  # fusion.FUSE_METHODS
FusionLoss = Literal["ce", "kl", "topk"]  # train/loss.FUSION_LOSSES
Engine = Literal["ddp", "fsdp"]  # train/engine.ENGINES
# soup/recipes.STRATEGIES
SoupStrategy = Literal["vanilla", "greedy", "learned", "regularized", "task_arithmetic", "ties", "sce"]
Granularity = Literal["model", "layer", "module"]  # soup/learn.GROUPINGS

# Tokens a bootstrapped tokenizer may add beyond one per byte: a word-start marker, BOS and EOS.
TOKENS_OVER_BYTES = 3


class ParamsError(ValueError):
    """A params file that does not fit the schema; the message is one line naming file and key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Runtime(Strict):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: Annotated[int, Field(ge=0)] = 0  # torch CPU threads; 0 keeps torch's default
    peak_tflops: PositiveFloat | None = None  # one GPU's bf16 peak for the MFU column; None: by its name if known


class PathRef(Strict):
    source: Literal["path"]
    path: str
    trust_remote_code: bool = False


class HubRef(Strict):
    source: Literal["hub"]
    id: Annotated[str, Field(pattern=r"^[\w.-]+(/[\w.-]+)?$")]
    revision: str = "main"
    trust_remote_code: bool = False


class GgufRef(Strict):
    """A local GGUF checkpoint (llama.cpp, Ollama, LM Studio), dequantised once by pin@ into safetensors + tokenizer."""

    source: Literal["gguf"]
    path: str  # the .gguf file itself, or the directory that holds `file`
    file: Annotated[str, Field(pattern=r"^[^/\\]+$")] | None = None  # the file's name inside `path` (a directory)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # what the dequantised weights are written in

    @property
    def trust_remote_code(self) -> bool:
        """Always False: a GGUF file holds tensors and metadata, never code."""
        return False


# A model the pipeline does not build; pin@<name> links (path, hub) or dequantises (gguf) it into data/models/<name>
# (fusesoup/pin.py, fusesoup/gguf.py).
ModelRef = Annotated[Union[PathRef, HubRef, GgufRef], Field(discriminator="source")]


class BuiltinCodeSource(Strict):
    kind: Literal["builtin_code"]
    domain: DomainName = "code"


class BuiltinProseSource(Strict):
    kind: Literal["builtin_prose"]
    domain: DomainName = "prose"


class FilesSource(Strict):
    """Local .txt (one document per file), .jsonl, .jsonl.zst or .parquet files (glob patterns)."""

    kind: Literal["files"]
    paths: Annotated[list[str], Field(min_length=1)]
    text_field: str = "text"
    domain: DomainName | None = None
    domain_field: str | None = None  # dotted path into each record, e.g. meta.pile_set_name

    @model_validator(mode="after")
    def _one_domain_rule(self) -> "FilesSource":
        if (self.domain is None) == (self.domain_field is None):
            raise ValueError("give exactly one of 'domain' or 'domain_field'")
        return self


class HubSource(Strict):
    """A `datasets` dataset, streamed: a hub id (e.g. JeanKaddour/minipile) or a builder such as `json`."""

    kind: Literal["hub"]
    dataset: str
    config: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    text_field: str = "text"
    domain: DomainName | None = None
    domain_field: str | None = None
    max_docs: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_domain_rule(self) -> "HubSource":
        if (self.domain is None) == (self.domain_field is None):
            raise ValueError("give exactly one of 'domain' or 'domain_field'")
        return self


CorpusSource = Annotated[
    Union[BuiltinCodeSource, BuiltinProseSource, FilesSource, HubSource], Field(discriminator="kind")
]


class Split(Strict):
    valid: Fraction = 0.05
    test: Fraction = 0.05

    @model_validator(mode="after")
    def _leaves_training_data(self) -> "Split":
        if self.valid + self.test >= 1:
            raise ValueError("valid + test must be below 1")
        return self


class Corpus(Strict):
    sources: Annotated[list[CorpusSource], Field(min_length=1)]
    max_chunk_bytes: PositiveInt = 1024  # longer documents are cut at line boundaries
    split: Split = Split()
    domain_max_bytes: dict[DomainName, PositiveInt] = {}  # per-domain cap on the cleaned corpus
    on_error: Literal["fail", "skip"] = "fail"  # bad records: stop, or skip and count in the manifest


class TokenizerSpec(Strict):
    kind: Literal["sentencepiece_bpe", "byte_level_bpe", "unigram"]
    vocab_size: Annotated[int, Field(ge=300)]
    # the train split's domains it is learnt from; null = the model's. Same kind, size and domains as another
    # bootstrap model: the same tokenizer (a teacher that shares the target's vocabulary)
    domains: Annotated[list[DomainName], Field(min_length=1)] | None = None


class ModelSpec(Strict):
    hidden_size: PositiveInt
    layers: PositiveInt
    heads: PositiveInt
    intermediate_size: PositiveInt
    context: PositiveInt  # max positions; must hold the longest corpus chunk

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "ModelSpec":
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        return self


class TrainSpec(Strict):
    """A training budget (bootstrap and continued training): each step is batch_tokens / block_size packed rows of
    block_size tokens (fusesoup/train/packing.py)."""

    steps: PositiveInt
    batch_tokens: PositiveInt  # tokens per optimizer step
    block_size: PositiveInt = 512  # tokens per packed row; at most the model's context
    lr: PositiveFloat
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    weight_decay: NonNegative = 0.1

    @model_validator(mode="after")
    def _blocks_divide_the_batch(self) -> "TrainSpec":
        if self.batch_tokens % self.block_size:
            raise ValueError(f"batch_tokens {self.batch_tokens} is not a multiple of block_size {self.block_size}")
        return self


class Bootstrap(Strict):
    architecture: Architecture
    tokenizer: TokenizerSpec
    domains: Annotated[dict[DomainName, PositiveFloat], Field(min_length=1)]  # sampling weights
    model: ModelSpec
    train: TrainSpec

    @model_validator(mode="after")
    def _blocks_fit_the_context(self) -> "Bootstrap":
        if self.train.block_size > self.model.context:
            raise ValueError(f"train.block_size {self.train.block_size} is longer than model.context "
                             f"{self.model.context}")
        return self


class Extract(Strict):
    """Teacher logit extraction (stages/extract.py); every key but batch_tokens and workers is part of the store's
    key."""

    k: Annotated[int, Field(ge=1, le=255)] = 10  # entries kept per position: the top k, or k draws
    targets: Literal["topk", "sample"] = "topk"  # the k most likely ids, or k ids drawn (logits/sampling.py)
    sample_temperature: PositiveFloat = 1.0  # draws from softmax(logits / T), weighted p / q (1: unbiased, uniform)
    splits: Annotated[list[Literal["train", "valid", "test"]], Field(min_length=1)] = ["train"]
    batch_tokens: PositiveInt = 8192  # padded tokens per forward pass (count x longest)
    shard_sequences: PositiveInt = 512  # sequences per shard: the unit of resumption and of parallel workers
    workers: Workers = 0  # processes filling one store, one GPU or CPU core each


class Align(Strict):
    """Cross-tokenizer alignment (stages/align.py): every key but workers is part of the aligned store's key."""

    vocab: VocabMethod = "exact"  # teacher id -> target id: same bytes only, or else nearest (min_ed) or prefix
    method: Literal["offsets", "dtw"] = "offsets"  # shared byte offsets (exact), or FuseLLM's DTW on token bytes
    spans: Literal["onehot", "expand"] = "onehot"  # target rows inside a span: FuseLLM's one-hot, or spans.py
    tail: bool = False  # keep the mass beyond the teacher's top k as one more outcome (rows not renormalised)
    workers: Workers = 0


class Fuse(Strict):
    """Distribution fusion (stages/fuse.py)."""

    method: FuseMethod = "min_ce"
    temperature: PositiveFloat = 1.0  # each source's softmax(logprob / T) before choosing or averaging
    workers: Workers = 0


class ContinuedTraining(TrainSpec):
    """train@clm and train@fused (stages/train.py): same budget and schedule; only the loss differs."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)
    lam: Annotated[Fraction, Field(alias="lambda")] = 0.9  # weight of CLM in train@fused (FuseLLM: 0.9)
    fusion_loss: FusionLoss = "ce"  # soft-label cross-entropy, KL, or cross-entropy within the targets' ids (topk)
    chunk_weight: NonNegative = 1.0  # mu: + mu * chunk likelihood matching (train/loss.py); 0 = off
    chunk_temperature: PositiveFloat = 10.0  # tau: each chunk's likelihood read as a Bernoulli exp(logp / tau)
    uld_weight: NonNegative = 0.0  # nu: + nu * rank matching (ULD) where rows fell back; 0 = off
    checkpoint_every: PositiveInt = 50  # steps between atomic checkpoints (resume point of a killed run)
    micro_batch_tokens: PositiveInt | None = None  # padded tokens per forward pass (gradients accumulated); None: all
    distributed: Engine = "ddp"  # the engine on several processes (fusesoup/train/engine.py)
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in backward
    window_shards: PositiveInt = 16  # train-split shards in memory at once (documents shuffled within a window)


TRAINED_VARIANTS = ("clm", "fused")  # train@clm (lambda 1) and train@fused
TRAINED_MODELS = tuple(f"target-{variant}" for variant in TRAINED_VARIANTS)  # what they write to data/models/
# The train keys only train@fused reads (its loss terms); train@clm reads every other one. A key added to
# ContinuedTraining is shared unless it is named here.
FUSED_ONLY_TRAIN_KEYS = ("lambda", "fusion_loss", "chunk_weight", "chunk_temperature", "uld_weight")


def train_keys(variant: str) -> list[str]:
    """The train keys (params.yaml's names) train@<variant> reads: all of them for fused, the shared ones for clm."""
    names = [field.alias or name for name, field in ContinuedTraining.model_fields.items()]
    return [name for name in names if variant == "fused" or name not in FUSED_ONLY_TRAIN_KEYS]


# Who reads what: each DVC stage -> the params.yaml keys its outputs depend on (a section: every key in it), which
# dvc.yaml's `params` cover exactly (tests/test_stage_params.py; tests/test_dag.py: changing a key marks exactly its
# readers in `dvc status`).
# Reads that change no output are left out: models.<name>.trust_remote_code only decides whether a model may load
# (pin@ tracks it), extract@ and evaluate draw nothing random from the seed torch_runtime sets, and
# runtime.peak_tflops feeds only train@'s throughput log (the MFU column), which DVC does not track.
_DEVICE = ["runtime.device", "runtime.dtype", "runtime.threads"]
STAGE_PARAMS: dict[str, list[str]] = {
    "prepare_corpus": ["corpus", "models"],  # path and hub models' tokenizers cap the chunk length
    "pin": ["models.${key}"],
    "bootstrap": ["seed", "runtime.device", "runtime.threads", "bootstrap.${key}"],  # float32 whatever runtime.dtype
    "extract": [*_DEVICE, "extract"],
    "align": ["target", "align"],
    "fuse": ["sources", "fuse"],
    "train@clm": ["seed", *_DEVICE, "target", *(f"train.{key}" for key in train_keys("clm"))],
    "train@fused": ["seed", *_DEVICE, "target", "train"],
    "soup": ["seed", *_DEVICE, "target", "soup"],
    "evaluate": [*_DEVICE, "target", "sources", "soup.ingredients", "soup.strategies", "soup.l1", "evaluate"],
}


class Probe(Strict):
    """The interpolation probe: the metric at evenly spaced points of the straight line between two ingredients."""

    between: Annotated[list[ModelName], Field(min_length=2, max_length=2)] = ["target-clm", "target-fused"]
    points: Annotated[int, Field(ge=2)] = 5


class TaskVectors(Strict):
    """The task_arithmetic, ties and sce soups: the other ingredients' task vectors relative to the first (the base)."""

    weight: PositiveFloat = 1.0  # of each non-base ingredient (mergekit's `weight`; not sce's)
    density: Annotated[Real, Field(gt=0, le=1)] = 0.5  # ties: the share of each task vector kept (trim)
    lambdas: Annotated[list[PositiveFloat], Field(min_length=1)] = [0.5, 1.0]  # scalings tried; the best on valid
    # sce: the share of elements (by variance across the task vectors) kept; 1 (mergekit's default) keeps all
    select_topk: Annotated[Real, Field(gt=0, le=1)] = 1.0


class Soup(Strict):
    """Soups of the target's variants (stages/soup.py): which ingredients, which strategies, how alphas are learned."""

    ingredients: list[ModelName] = []  # models of one architecture; empty = [target, target-clm, target-fused]
    strategies: Annotated[list[SoupStrategy], Field(min_length=1)] = ["vanilla", "greedy", "learned", "regularized"]
    granularity: Granularity = "module"  # one alpha vector per model, layer or mapping
    l1: Annotated[list[PositiveFloat], Field(min_length=1)] = [1e-4, 1e-3]  # regularized: lambda * sum |alpha - 1/N|
    steps: PositiveInt = 50  # optimizer steps on the valid split per learned soup
    lr: PositiveFloat = 0.2  # Adam on the alpha logits
    batch_tokens: PositiveInt = 4096  # padded tokens per batch, for learning and for scoring
    recompute: bool = False  # learned soups: mix each decoder layer again in backward (one layer's mixed weights)
    probe: Probe = Probe()
    task_vectors: TaskVectors = TaskVectors()

    @model_validator(mode="after")
    def _distinct(self) -> "Soup":
        for key, names in (("ingredients", self.ingredients), ("probe.between", self.probe.between)):
            if len(set(names)) != len(names):
                raise _KeyProblem(f"soup.{key}", f"lists a model twice: {names}")
        return self

    def soup_names(self) -> list[str]:
        """The models this block makes, in order: soup-<strategy>, and soup-l1-<lambda> per regularized lambda."""
        names = [f"soup-{s}" for s in self.strategies if s != "regularized"]
        return names + ([f"soup-l1-{lam:g}" for lam in self.l1] if "regularized" in self.strategies else [])


class Evaluate(Strict):
    """The evaluate stage: every model on the test split, per domain and overall."""

    batch_tokens: PositiveInt = 8192  # padded tokens per forward pass
    # lm-evaluation-harness on the models of the target's tokenizer (metrics/harness.json); no tasks = off
    harness_tasks: list[str] = []  # lm-eval task, group or tag names
    harness_include: str | None = None  # a directory of the user's own task YAMLs, relative to the project root
    harness_limit: PositiveInt | None = None  # examples per task (quick runs); None = all
    harness_batch_size: PositiveInt = 8  # sequences per forward pass


class Schedule(Strict):
    cron: str = "0 3 * * *"
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _five_fields(self) -> "Schedule":
        if len(self.cron.split()) != 5:
            raise ValueError(f"cron must have 5 fields, got {self.cron!r}")
        return self


class Flow(Strict):
    retries: Annotated[int, Field(ge=0)] = 1
    retry_delay_seconds: NonNegative = 10
    stage_timeout_seconds: PositiveFloat = 3600
    max_parallel: PositiveInt = 2
    schedule: Schedule = Schedule()


class Params(Strict):
    seed: int = 0
    runtime: Runtime = Runtime()
    models: dict[ModelName, ModelRef] = {}  # path, hub and GGUF models; bootstrapped ones are named under `bootstrap`
    target: ModelName
    sources: Annotated[list[ModelName], Field(min_length=1)]
    corpus: Corpus
    bootstrap: dict[ModelName, Bootstrap] = {}
    extract: Extract = Extract()
    align: Align = Align()
    fuse: Fuse = Fuse()
    train: ContinuedTraining = ContinuedTraining(steps=165, batch_tokens=4096, lr=1e-3, warmup_steps=10)
    soup: Soup = Soup()
    evaluate: Evaluate = Evaluate()
    flow: Flow = Flow()

    @model_validator(mode="before")
    @classmethod
    def _no_bootstrap_refs(cls, raw: Any) -> Any:
        for name, ref in ((raw or {}).get("models") or {}).items() if isinstance(raw, dict) else ():
            if isinstance(ref, dict) and ref.get("source") == "bootstrap":
                raise _KeyProblem(f"models.{name}", "source 'bootstrap' is not a models entry: a bootstrapped model "
                                  f"is defined by its bootstrap.{name} section alone; delete models.{name}")
        return raw

    @model_validator(mode="after")
    def _references_resolve(self) -> "Params":
        both = sorted(set(self.models) & set(self.bootstrap))
        if both:
            raise _KeyProblem(f"models.{both[0]}", "is also under 'bootstrap': a model is either built (bootstrap) "
                              "or given (models: path, hub or gguf), not both")
        known = self.model_names()
        for key, name in [("target", self.target)] + [(f"sources.{i}", n) for i, n in enumerate(self.sources)]:
            if name not in known:
                raise _KeyProblem(key, f"model {name!r} is defined neither under 'models' nor under 'bootstrap' "
                                  f"(defined: {known})")
        if self.target not in self.sources:
            raise _KeyProblem("sources", f"must include the target {self.target!r}: its own logits are fused too")
        if self.extract.targets == "sample" and self.train.uld_weight > 0:
            raise _KeyProblem("train.uld_weight", "rank matching (ULD) needs each teacher's top k by rank; "
                              "extract.targets 'sample' stores draws: set extract.targets: topk or uld_weight: 0")
        trained, ingredients = set(TRAINED_MODELS), self.soup_ingredients()
        if len(ingredients) < 2:
            raise _KeyProblem("soup.ingredients", f"a soup needs at least 2 ingredients, got {ingredients}")
        for i, name in enumerate(ingredients):
            if name not in known and name not in trained:
                raise _KeyProblem(f"soup.ingredients.{i}", f"model {name!r} is neither defined under 'models' or "
                                  f"'bootstrap' nor one the pipeline trains ({', '.join(TRAINED_MODELS)})")
        for i, name in enumerate(self.soup.probe.between):
            if name not in ingredients:
                raise _KeyProblem(f"soup.probe.between.{i}", f"{name!r} is not one of soup.ingredients")
        for name, spec in self.bootstrap.items():
            needed = self.corpus.max_chunk_bytes + TOKENS_OVER_BYTES
            if spec.model.context < needed:
                raise _KeyProblem(
                    f"bootstrap.{name}.model.context",
                    f"must be >= corpus.max_chunk_bytes + {TOKENS_OVER_BYTES} = {needed}, got {spec.model.context}",
                )
            for key, domains in (("domains", spec.domains), ("tokenizer.domains", spec.tokenizer.domains or [])):
                unknown = set(domains) - self.corpus_domains()
                if unknown:
                    raise _KeyProblem(
                        f"bootstrap.{name}.{key}",
                        f"domains {sorted(unknown)} come from no corpus source with a fixed domain "
                        f"(known: {sorted(self.corpus_domains())})",
                    )
        return self

    def corpus_domains(self) -> set[str]:
        """Domains fixed by the corpus sources (sources with `domain_field` may add more at run time)."""
        return {s.domain for s in self.corpus.sources if s.domain is not None}

    def soup_ingredients(self) -> list[str]:
        """soup.ingredients, or by default the target base and its two continued-training variants."""
        return list(self.soup.ingredients) or [self.target, *TRAINED_MODELS]

    def evaluated_models(self) -> list[str]:
        """The models (not soups) the evaluate stage scores, in report order: the target, the other sources, then the
        trained variants."""
        return [self.target, *(name for name in self.sources if name != self.target), *TRAINED_MODELS]

    def model_names(self) -> list[str]:
        """Every model the params define: bootstrapped ones first, then path, hub and GGUF models, in file order."""
        return [*self.bootstrap, *self.models]


class _KeyProblem(ValueError):
    """Raised inside cross-key validation to report an exact key path instead of the model's root."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def _key_path(loc: tuple[Any, ...]) -> str:
    """('corpus', 'sources', 0, 'files', 'paths') -> 'corpus.sources.0.paths': drops the union tag pydantic adds."""
    parts = [str(part) for part in loc]
    for prefix, tag_index, tags in _UNION_TAGS:
        if parts[: len(prefix)] == prefix and len(parts) > tag_index and parts[tag_index] in tags:
            del parts[tag_index]
    return ".".join(parts) or "(top level)"


_UNION_TAGS = [
    (["corpus", "sources"], 3, {"builtin_code", "builtin_prose", "files", "hub"}),
    (["models"], 2, {"path", "hub", "gguf"}),
]


def _one_line(path: Path, error: ValidationError) -> str:
    first = error.errors()[0]
    ctx_error = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _KeyProblem):
        return f"{path}: {ctx_error.key}: {ctx_error.message}{_at_line(path, ctx_error.key)}"
    key = _key_path(tuple(first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif "input" in first and not isinstance(first["input"], (dict, list)):
        msg += f", got {first['input']!r}"
    more = len(error.errors()) - 1
    others = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
    return f"{path}: {key}: {msg}{_at_line(path, key)}{others}"


def _at_line(path: Path, key: str) -> str:
    """` (line N)`: where `path` spells the dotted `key`; empty when it does not (a default, a merged profile's key,
    a mapping given in code)."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return ""
    for part in key.split("."):
        if isinstance(node, yaml.MappingNode):
            node = next((value for name, value in node.value if str(name.value) == part), None)
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
        else:
            return ""
        if node is None:
            return ""
    return f" (line {node.start_mark.line + 1})"


def parse_params(raw: Any, path: Path | str = "params.yaml") -> Params:
    """Validate an already-parsed params mapping; errors name `path`."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_one_line(Path(path), error)) from None


def _no_duplicate_keys(node: yaml.Node | None, path: Path, prefix: str = "") -> None:
    """ParamsError naming the file, the key path and both lines where a mapping gives a key twice (YAML loaders
    silently keep the last one)."""
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in lines:
                raise ParamsError(f"{path}: {prefix}{key}: given twice (line {lines[key]} and line {line})")
            lines[key] = line
            _no_duplicate_keys(value_node, path, f"{prefix}{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _no_duplicate_keys(item, path, f"{prefix}{index}.")


def read_mapping(path: Path | str) -> dict:
    """A YAML file's top-level mapping; ParamsError naming the file otherwise (missing, not YAML, not a mapping)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        _no_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        raw = yaml.safe_load(text)
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate a params file."""
    return parse_params(read_mapping(path), path)


def deep_merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied recursively (mappings merge; anything else, and an empty mapping, replaces)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and value and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
