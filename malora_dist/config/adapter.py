"""The adapter configuration: which method, its ranks, and where it is injected (docs/ARCHITECTURE.md
§1 (math))."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from malora_dist.config.loading import from_dict, load_yaml

METHODS = ("lora", "molora", "malora", "hydralora")
# Methods with a shared down-projection S_A before routing. HydraLoRA (one shared A, N B's) is the
# same layer with d = r̄ = r and every P_t fixed at the identity.
SHARED_METHODS = ("malora", "hydralora")
# Parts that ``adapter.freeze`` can hold at their initial values (AsyLoRA, MoAsyLoRA, Table 3's
# fixed S_A and frozen P_t): still saved and loaded, never trained.
FREEZABLE_PARTS = ("shared_A", "expert_down")
# ``expert_kernel: auto`` computes local experts densely up to this many experts: the dense kernel's
# cost grows with N·T, the sparse one's with T·k plus a small per-expert cost. Measured (one process,
# MALoRA, 576×576, fwd+bwd; benchmarks/README.md): dense faster at N ≤ 32, sparse from N = 64
# (1024 tokens: 30 vs 40 ms; N = 256: 48 vs 129 ms).
DENSE_KERNEL_MAX_EXPERTS = 32
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    """Adapter hyper-parameters. Every key has an effect; unknown keys are rejected.

    method: ``lora`` | ``molora`` | ``malora`` | ``hydralora`` (one shared A of rank r, N
        up-projections B_t and a router over all of them).
    rank: r, the LoRA rank (lora) or the per-expert rank of MoLoRA; for MALoRA the MoLoRA rank
        from which d and r̄ are derived.
    num_experts: N (molora/malora).
    top_k: experts per token (molora/malora).
    lam: λ, MALoRA's budget split: d = λ·r·N, r̄ = (2−λ)·r.
    shared_dim: explicit d (MALoRA), overrides λ.
    expert_rank: explicit r̄ (MALoRA), overrides λ.
    alpha: scaling numerator; default 2 × the expert rank (r for lora/molora, r̄ for malora).
    beta: MALoRA's weight balance scale β, applied to the initial S_A and P_t only.
    dropout: dropout on the adapter's input (after the router, which sees x itself).
    target_modules: names of the linear layers to adapt.
    balance_loss_coef: coefficient of the Switch load-balancing loss N Σ_i f_i P̄_i, taken over each
        micro-batch (``train.micro_batch_size`` sequences, the same at every layout) and averaged
        over the MoE layers and the step's micro-batches (``gating.balance_loss``).
    router_z_loss_coef: coefficient of the router z-loss (mean squared logsumexp of the logits
        over a micro-batch's tokens, averaged as the balance loss).
    normalize_gates: renormalise the top-k gates to sum to one (the paper does not).
    capacity_factor: None for dropless routing; else each expert takes at most
        ceil(capacity_factor · slots / N) slots per source rank and drops the rest (counted).
    expert_kernel: how experts that sit on this rank are computed: ``sparse`` (rows gathered per
        expert), ``dense`` (every expert for every token, masked by the gates: two matmuls and no
        gather, cheap because the ranks are tiny), or ``auto`` (dense when all experts are local,
        routing is dropless and N ≤ DENSE_KERNEL_MAX_EXPERTS, else sparse).
    kernel: ``auto`` (default: the fused layer — base product, router, adapter and a hand-written
        backward in one autograd Function — wherever it implements the layer, else the reference
        parts), ``fused`` (an error where it cannot run: tensor-parallel bases, experts split over
        ranks, the sparse experts kernel, normalize_gates) or ``reference`` (the parts, always).
    dora: DoRA (lora only): a trained magnitude per output feature times the direction
        ``W0 + scaling·B A`` normalised per output feature, the norm detached as PEFT does.
    freeze: parts kept at their initial values: ``expert_down`` (A, A_t or P_t: AsyLoRA,
        MoAsyLoRA, frozen P_t) and ``shared_A`` (malora: a fixed S_A). Frozen parts are not
        trained, not counted as trainable, and still saved.
    identical_init: every expert's down-projection (A_t for molora, P_t for malora) starts from
        expert 0's draw (Table 3's identical A_t initialisation).
    subspace: ``shared`` (MALoRA's one S_A per adapted linear) or ``per_expert`` (malora: each
        expert its own S_t of dimension d, Table 3's "no shared S_A"; x travels to the experts).
    shared_side: ``down`` (MALoRA: the shared subspace S_A on the input side) or ``up`` (malora:
        Table 3's "shared subspace on B": y = W x + Σ_t g_t·(α/r̄)·S_B P_t Ā_t x with one shared
        up-projection S_B (m×d), per-expert P_t (d×r̄) and Ā_t (r̄×n); x travels to the experts and
        d numbers per slot come back, S_B applies once per token after the experts are combined).
    """

    method: str = "malora"
    rank: int = 8
    num_experts: int = 8
    top_k: int = 2
    lam: float = 0.5
    shared_dim: Optional[int] = None
    expert_rank: Optional[int] = None
    alpha: Optional[float] = None
    beta: float = 1.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    balance_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    normalize_gates: bool = False
    capacity_factor: Optional[float] = None
    expert_kernel: str = "auto"
    kernel: str = "auto"
    dora: bool = False
    freeze: list = field(default_factory=list)
    identical_init: bool = False
    subspace: str = "shared"
    shared_side: str = "down"

    def __post_init__(self):
        self.target_modules = list(self.target_modules)
        if isinstance(self.freeze, (list, tuple)):
            self.freeze = list(self.freeze)
        self._validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.method != "lora"

    @property
    def has_subspace(self) -> bool:
        """Experts factored through a subspace of dimension d: ``B̄_t P_t S x``."""
        return self.method in SHARED_METHODS

    @property
    def has_shared_projection(self) -> bool:
        """One S_A shared by the experts, applied before routing."""
        return self.has_subspace and self.subspace == "shared" and self.shared_side == "down"

    @property
    def has_shared_up(self) -> bool:
        """One S_B shared by the experts, applied after they are combined (``shared_side: up``)."""
        return self.method == "malora" and self.shared_side == "up"

    @property
    def frozen_parts(self) -> set:
        """Parts not trained: ``freeze``, plus HydraLoRA's identity P_t."""
        return set(self.freeze) | ({"expert_down"} if self.method == "hydralora" else set())

    @property
    def d(self) -> int:
        """The shared subspace dimension (MALoRA's d; HydraLoRA's rank)."""
        if self.method == "hydralora":
            return self.rank
        if self.shared_dim is not None:
            return self.shared_dim
        return _integral(self.lam * self.rank * self.num_experts, "d = lam·rank·num_experts", "shared_dim")

    @property
    def r_bar(self) -> int:
        """The per-expert up-projection rank (MALoRA's r̄; HydraLoRA's rank)."""
        if self.method == "hydralora":
            return self.rank
        if self.expert_rank is not None:
            return self.expert_rank
        return _integral((2 - self.lam) * self.rank, "r̄ = (2−lam)·rank", "expert_rank")

    @property
    def adapter_rank(self) -> int:
        """The rank of one expert's update: r̄ for MALoRA, r otherwise."""
        return self.r_bar if self.has_subspace else self.rank

    @property
    def scaling(self) -> float:
        alpha = self.alpha if self.alpha is not None else 2.0 * self.adapter_rank
        return alpha / self.adapter_rank

    @property
    def dense_by_default(self) -> bool:
        """What ``expert_kernel: auto`` picks for experts that are all on this rank."""
        return self.capacity_factor is None and self.num_experts <= DENSE_KERNEL_MAX_EXPERTS

    def ineffective_keys(self, experts_split: bool = False) -> list[str]:
        """Keys set away from their defaults that have no effect for this method or layout, each with
        the reason. They are reported once in the log, not refused: a config is meant to switch
        methods with one ``--set adapter.method=...``."""
        defaults = AdapterConfig.__dataclass_fields__
        moe_keys = ("num_experts", "top_k", "balance_loss_coef", "router_z_loss_coef", "normalize_gates",
                    "capacity_factor", "expert_kernel")
        malora_keys = ("lam", "shared_dim", "expert_rank", "beta")
        unused = [k for k in (moe_keys if not self.is_moe else ()) + (malora_keys if self.method != "malora" else ())
                  if getattr(self, k) != defaults[k].default]
        notes = [f"adapter.{k} has no effect for method {self.method}" for k in unused]
        if self.is_moe and experts_split and self.expert_kernel == "dense":
            notes.append("adapter.expert_kernel=dense has no effect where experts are split over ranks "
                         "(placement ep): they receive rows and run the sparse (grouped) kernel")
        return notes

    def check_fits(self, in_features: int, name: str = "", out_features: Optional[int] = None) -> None:
        """MALoRA's SVD initialisation needs r̄ ≤ d ≤ n (HydraLoRA's shared A: r ≤ n); mirrored on the
        up side (``shared_side: up``), d ≤ m."""
        if self.has_shared_up and out_features is not None and self.d > out_features:
            raise ValueError(
                f"adapter.shared_dim d={self.d} exceeds the output size m={out_features} of "
                f"{name or 'the adapted layer'}; shared_side: up initialises S_B (m×d) from an SVD that "
                f"needs d ≤ m: lower adapter.shared_dim, adapter.lam or adapter.rank"
            )
        if self.has_subspace and not self.has_shared_up and self.d > in_features:
            raise ValueError(
                f"adapter.shared_dim d={self.d} exceeds the input size n={in_features} of "
                f"{name or 'the adapted layer'}; the SVD initialisation needs d ≤ n: lower "
                f"adapter.shared_dim, adapter.lam or adapter.rank"
            )

    # ---- validation ----------------------------------------------------------------------
    def _validate(self):
        if self.method not in METHODS:
            raise ValueError(f"adapter.method must be one of {METHODS}, got {self.method!r}")
        for key in ("rank", "num_experts", "top_k"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"adapter.{key} must be a positive integer, got {value!r}")
        for key in ("shared_dim", "expert_rank"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"adapter.{key} must be a positive integer or null, got {value!r}")
        if self.is_moe and self.top_k > self.num_experts:
            raise ValueError(
                f"adapter.top_k={self.top_k} exceeds adapter.num_experts={self.num_experts}: "
                f"set top_k ≤ num_experts"
            )
        if not 0.0 < self.lam < 2.0:
            raise ValueError(f"adapter.lam must lie in (0, 2), got {self.lam!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout must lie in [0, 1), got {self.dropout!r}")
        if self.beta <= 0:
            raise ValueError(f"adapter.beta must be positive, got {self.beta!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"adapter.alpha must be positive or null, got {self.alpha!r}")
        for key in ("balance_loss_coef", "router_z_loss_coef"):
            if getattr(self, key) < 0:
                raise ValueError(f"adapter.{key} must be ≥ 0, got {getattr(self, key)!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"adapter.capacity_factor must be positive or null, got {self.capacity_factor!r}")
        if self.expert_kernel not in ("auto", "dense", "sparse"):
            raise ValueError(f"adapter.expert_kernel must be auto, dense or sparse, got {self.expert_kernel!r}")
        if self.kernel not in ("auto", "fused", "reference"):
            raise ValueError(f"adapter.kernel must be auto, fused or reference, got {self.kernel!r}")
        if self.expert_kernel == "dense" and self.capacity_factor is not None:
            raise ValueError("adapter.expert_kernel=dense computes every slot, so it cannot drop slots: "
                             "use expert_kernel: sparse (or auto) with capacity_factor")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError("adapter.target_modules must be a non-empty list of module names")
        self._validate_variants()
        if self.method == "malora":
            d, r_bar = self.d, self.r_bar  # raise if not integral
            if r_bar > d:
                raise ValueError(
                    f"MALoRA needs r̄ ≤ d for its SVD initialisation, got r̄={r_bar} > d={d} "
                    f"(rank={self.rank}, num_experts={self.num_experts}, lam={self.lam}): raise "
                    f"adapter.lam or adapter.num_experts, or set adapter.shared_dim/expert_rank"
                )

    def _validate_variants(self):
        """The baseline and ablation keys: each must change something for this method."""
        for key in ("dora", "identical_init"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"adapter.{key} must be true or false, got {getattr(self, key)!r}")
        if self.dora and self.method != "lora":
            raise ValueError(f"adapter.dora applies to method lora (DoRA's magnitude rescales one weight "
                             f"update), not {self.method}: set adapter.method=lora or adapter.dora=false")
        if not isinstance(self.freeze, list) or not all(isinstance(p, str) for p in self.freeze):
            raise ValueError(f"adapter.freeze must be a list of part names from {FREEZABLE_PARTS}, "
                             f"got {self.freeze!r}")
        for part in self.freeze:
            if part not in FREEZABLE_PARTS:
                raise ValueError(f"adapter.freeze: unknown part {part!r}; the parts are {FREEZABLE_PARTS}")
        if len(set(self.freeze)) != len(self.freeze):
            raise ValueError(f"adapter.freeze lists a part twice: {self.freeze}")
        if self.subspace not in ("shared", "per_expert"):
            raise ValueError(f"adapter.subspace must be shared or per_expert, got {self.subspace!r}")
        if self.subspace == "per_expert" and self.method != "malora":
            raise ValueError(f"adapter.subspace=per_expert gives each MALoRA expert its own S_t: method "
                             f"{self.method} has no subspace to split (use malora, or subspace: shared)")
        if self.shared_side not in ("down", "up"):
            raise ValueError(f"adapter.shared_side must be down or up, got {self.shared_side!r}")
        if self.shared_side == "up":
            self._validate_shared_up()
        if "shared_A" in self.freeze and not self.has_shared_projection:
            raise ValueError(f"adapter.freeze: method {self.method} (subspace {self.subspace}) has no shared_A "
                             f"to freeze (only malora with subspace: shared has a trainable S_A that can be fixed)")
        if self.method == "hydralora" and "expert_down" in self.freeze:
            raise ValueError("adapter.freeze: hydralora's expert_down is always the fixed identity; "
                             "remove expert_down from adapter.freeze")
        if self.method == "hydralora" and (self.shared_dim is not None or self.expert_rank is not None):
            raise ValueError("hydralora's shared A and its up-projections have rank adapter.rank: "
                             "remove adapter.shared_dim / adapter.expert_rank")
        if self.identical_init and self.method not in ("molora", "malora"):
            raise ValueError(f"adapter.identical_init starts every expert's down-projection from one draw: "
                             f"method {self.method} has no per-expert down-projections drawn at random "
                             f"(use molora or malora, or set identical_init: false)")

    def _validate_shared_up(self):
        """``shared_side: up`` is one configuration of MALoRA; the keys that would change its other
        parts are refused rather than half applied."""
        if self.method != "malora":
            raise ValueError(f"adapter.shared_side=up moves MALoRA's shared subspace to the up side: method "
                             f"{self.method} has none (use method: malora, or shared_side: down)")
        if self.subspace != "shared":
            raise ValueError("adapter.shared_side=up shares one S_B across experts; subspace: per_expert gives "
                             "each expert its own S_t on the down side: use one of the two")
        if self.freeze:
            # expert_down is Ā_t, which starts at zero: frozen, the adapter would stay zero for ever
            raise ValueError(f"adapter.freeze={self.freeze} is not supported with shared_side=up (its Ā_t start "
                             f"at zero and there is no shared_A): remove adapter.freeze")
        if self.identical_init:
            raise ValueError("adapter.identical_init draws every expert's down-projection alike, but with "
                             "shared_side=up the Ā_t start at zero: set identical_init: false")

    # ---- io ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        return from_dict(cls, data, "adapter")

    @classmethod
    def from_yaml(cls, path: str) -> "AdapterConfig":
        """Read the adapter keys at the top level, or from an ``adapter:`` section of a training config."""
        data = load_yaml(path)
        return cls.from_dict(data["adapter"] if "adapter" in data else data)


def _integral(value: float, formula: str, override_key: str) -> int:
    if abs(value - round(value)) > 1e-9:
        raise ValueError(
            f"{formula} = {value:g} is not an integer: choose lam/rank/num_experts that give one, "
            f"or set adapter.{override_key} explicitly"
        )
    return int(round(value))
