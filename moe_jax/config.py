"""Model configuration: two frozen, gin-configurable dataclasses.

`ModelConfig` describes the decoder trunk (paper §3, §4.1.3, §5.1.2, §7.1) and `MoEConfig` the FFN of
its MoE layers (paper §3.1-§3.3). Every model of the paper is one binding of these two: there are no
model classes per paper. Gin files under `gin/` bind them; see `gin/architectures/decoder.gin`.

Vocabulary used below: N' = `num_experts` routed experts, K' = `top_k` activated routed experts,
K_s = `num_shared_experts`, f = `expert_dim` (the expert FFN's intermediate width). Fine-grained
segmentation with factor m is `num_experts = m*N - K_s`, `top_k = m*K - K_s`, `expert_dim = F/m`
(`fine_grained_sizes`); the gin models are written as (N, K, m, K_s, F) through `fine_grained_size`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import gin

# The names MoEConfig.router and MoEConfig.dispatch accept. Their implementations are registries in
# moe_jax.moe (router.ROUTER_CLASSES, dispatch.DISPATCH_SPECS) keyed by these names; each checks itself
# against them at import (`check_registry`). The names live here, not there, because this module is
# the bottom of the import graph: validating a config must not import the model code.
ROUTERS = ("softmax", "hash", "expert_choice")
DISPATCHES = ("dropless", "capacity", "reference")
ROUTER_SCORES = ("softmax", "sigmoid")
SECOND_EXPERT_POLICIES = ("greedy", "random")
BALANCE_SCOPES = ("sequence", "global")
GROUP_SCORES = ("max", "top2_sum")  # group scores of group-limited routing (moe_jax.moe.gating.group_scores)
HASH_TABLES = ("random", "balanced")
EXPERT_CHOICE_SCOPES = ("sequence", "batch")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
EXPERT_PARALLEL_SCHEMES = ("ring", "all_to_all")


def check_registry(field: str, registry) -> None:
    """Raise unless `registry` (name -> implementation) implements exactly the names MoEConfig.<field>
    accepts (ROUTERS for "router", DISPATCHES for "dispatch"), so the two cannot drift apart."""
    names = {"router": ROUTERS, "dispatch": DISPATCHES}[field]
    if tuple(registry) != names:
        raise RuntimeError(
            f"MoEConfig.{field} accepts {names} but its registry implements {tuple(registry)}: add or remove "
            f"the name in moe_jax/config.py and the implementation in the registry together"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The MoE FFN (paper Eq 9-17).

    Attributes:
      num_experts: N', routed experts per MoE layer. 0 gives a layer of shared experts only
        (Dense x4 / Dense x16 of paper Tab 2/9).
      num_shared_experts: K_s, always-on experts with gate weight 1, fused into one SwiGLU MLP of
        width `num_shared_experts * expert_dim` as in DeepSeek's code.
      expert_dim: f, intermediate width of one expert (routed or shared).
      top_k: K', routed experts activated per token.
      router: "softmax" (learned softmax over the routed experts, top-k; Switch is k=1, GShard k=2),
        "hash" (a fixed token-id -> expert table, Roller et al. 2021; k must be 1) or "expert_choice"
        (each expert takes its top-C tokens, Zhou et al. 2022, arXiv:2202.09368; `top_k` is then the
        average number of experts per token, see `expert_choice_capacity_factor`, docs/routing.md;
        balanced by construction, so `expert_balance_alpha` and `device_balance_alpha` are ignored).
      router_score: the learned router's score function s_{i,t} of u_t^T e_i: "softmax" over the
        routed experts (the paper, Eq 11) or "sigmoid" per expert (DeepSeek-V3, arXiv:2412.19437
        §2.1.2 Eq 15; V3 renormalises the selected gates, Eq 13: set `renormalize_topk` too, and
        `top_k` >= 2, since a single renormalised gate is always 1). router="softmax" only.
      routed_scaling_factor: a constant multiplying the routed experts' summed output,
        sum_i g_{i,t} FFN_i(u_t) (DeepSeek-V2/V3's released `routed_scaling_factor`: 16.0 in
        V2, 2.5 in V3); 1.0 (the paper) changes nothing.
      second_expert_policy: for k >= 2, how choices after the first are kept: "greedy" (always) or
        "random" (GShard: keep choice j with probability min(1, 2 g_j / (g_1 + g_j))).
      renormalize_topk: divide the selected gates by their sum. Off in the paper (Eq 10) and in
        DeepSeekMoE 16B (`norm_topk_prob: false`).
      expert_balance_alpha: alpha_1 of the expert-level balance loss (Eq 12). Paper: 0.01 at 2B,
        0.001 at 16B, 0.003 at 145B.
      device_balance_alpha: alpha_2 of the device-level balance loss (Eq 15); 0.05 at 145B.
      num_device_groups: D, groups of routed experts for the device-level loss; 0 means "the size of
        the mesh's expert axis" (1 on a single device).
      balance_loss_scope: "sequence" (Eq 12-14 per sequence, then averaged over the batch, as the
        paper and DeepSeek's `seq_aux=True`) or "global" (f and P over all tokens of the batch).
      router_z_loss_alpha: weight of the router z-loss mean(logsumexp(logits)^2); 0 disables it.
      dispatch: "dropless" (sort by expert + grouped matmul; the paper's setting), "capacity"
        (fixed expert capacity, overflow dropped, first choices outrank second choices as in
        GShard) or "reference" (naive per-expert loop; the test oracle).
      capacity_factor: for dispatch="capacity": capacity = ceil(capacity_factor * T * K' / N') slots
        per expert for T tokens.
      gmm_backend: grouped-matmul kernel of the dropless dispatch: "auto" (fastest measured for the
        platform), or a name registered in `moe_jax.moe.dispatch.gmm`.
      hash_table: for router="hash": "random" (uniform random token -> expert map from `hash_seed`)
        or "balanced" (greedy bin packing of token frequencies read from `hash_frequencies`).
      hash_seed: seed of the hash table.
      hash_frequencies: path of a `.npy` file of token counts [vocab] for hash_table="balanced".
      expert_parallel: how the dispatch exchanges tokens when a device mesh is set (see
        `moe_jax.moe.dispatch.expert_parallel` and docs/parallelism.md): "ring" (all-gather tokens over
        the expert axis, local experts, reduce-scatter; exactly dropless) or "all_to_all" (fixed-size
        buffers per device pair).
      ep_buffer_factor: for expert_parallel="all_to_all": 0 sizes the buffers for the worst case
        (dropless); f > 0 gives ceil(f * T_local * K' / EP) rows per device pair and drops (and
        counts) the overflow.
      disable_top_experts: inference-time analysis (paper §4.5, Fig 4): per token, mask this many
        routed experts with the highest routing probability, then take the top-k from the remaining
        ones (gates stay the original probabilities). 0 = normal routing. Softmax routers only.
      disable_shared: inference-time analysis (paper §4.5): drop the shared experts' output (the
        paper then activates one more routed expert: set `top_k` one higher too).
      expert_choice_capacity_factor: for router="expert_choice": every routed expert takes
        C = min(T, ceil(expert_choice_capacity_factor * T * top_k / num_experts)) of the T tokens of
        its selection group (`expert_choice_scope`), so a token gets 0..num_experts experts and on
        average about expert_choice_capacity_factor * top_k. The paper's capacity factor c (average
        experts per token, arXiv:2202.09368 §3.1) is expert_choice_capacity_factor * top_k; 1.0 matches
        the compute of token-choice top-k.
      expert_choice_scope: for router="expert_choice", the tokens an expert chooses among: "sequence"
        (each sequence of the batch separately: a sequence's output never depends on the other
        sequences, the batch size, the mesh or gradient accumulation) or "batch" (all B*S tokens of the
        (micro-)batch the layer sees; the paper's setting). Either way a token's routing depends on the
        later tokens of its group (causal leakage; docs/routing.md).
      topk_groups: M of group-limited routing, the expert groups a token may use; 0 (the default, the
        paper) disables it. Each token keeps its M best groups and takes its top-k among their experts
        only (DeepSeek-V2's device-limited routing, arXiv:2405.04434 §2.1.3: M = 3 of D = 8 devices;
        DeepSeek-V3's node-limited routing, arXiv:2412.19437 §2.1.2: `topk_group` = 4 of 8). Needs
        router='softmax' (either `router_score`), second_expert_policy='greedy', disable_top_experts=0
        and top_k <= M * num_experts / G.
      num_expert_groups: G, the groups of group-limited routing: group g is experts [g*E/G, (g+1)*E/G),
        the experts device g holds under expert parallelism (V2: D = 8 devices; V3: `n_group` = 8).
        0 (the default) means "the size of the mesh's expert axis", read when the layer runs: the
        routing then follows the mesh (a token's experts live on at most M devices) and changes with
        it (one device: G = 1, no restriction); a G > 0 gives the same routing on every mesh, and
        equals device-limited routing where G is the expert-parallel size. With G <= M every group
        is kept (no restriction). Must divide num_experts; needs topk_groups.
      group_score: the score of a group for group-limited routing: "max" (the highest affinity of its
        experts, V2) or "top2_sum" (the sum of its two highest, V3: the highest K_r/M = 8/4 scores;
        needs >= 2 experts per group).
      comm_balance_alpha: alpha_3 of DeepSeek-V2's communication balance loss (arXiv:2405.04434
        §2.1.4, Eq 29-31) over the G groups of group-limited routing (V2: 0.02); needs topk_groups.
      selection_bias: DeepSeek-V3's auxiliary-loss-free load balancing (arXiv:2412.19437 §2.1.2,
        Eq 16): the learned router keeps a per-expert bias b_i that is added to the scores for the
        top-k *selection only*; the gates stay the un-biased scores s_{i,t}. The bias is not a
        parameter (no gradient, no optimizer): it is carried in the train state, checkpointed, and
        moved by `bias_update_speed` after every step. V3 uses it with router_score="sigmoid"; with
        "softmax" scores (about 1/E each) it works the same but wants a smaller speed. False (the
        paper) leaves the model and its checkpoints as they were.
      bias_update_speed: gamma of V3's bias update, after every optimizer step from that step's load
        c_i (tokens that selected expert i, over the whole global batch and every micro-batch):
        b_i <- b_i + gamma * sign(mean_j c_j - c_i), i.e. overloaded experts lose gamma, underloaded
        ones gain it. V3: 0.001 for the first 14.3T tokens, then 0 (the bias frozen). Needs
        `selection_bias`; 0 keeps the bias as it is.
    """

    num_experts: int = 16
    num_shared_experts: int = 0
    expert_dim: int = 512
    top_k: int = 2
    router: str = "softmax"
    router_score: str = "softmax"
    routed_scaling_factor: float = 1.0
    second_expert_policy: str = "greedy"
    renormalize_topk: bool = False
    expert_balance_alpha: float = 0.01
    device_balance_alpha: float = 0.0
    num_device_groups: int = 0
    balance_loss_scope: str = "sequence"
    router_z_loss_alpha: float = 0.0
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    gmm_backend: str = "auto"
    hash_table: str = "random"
    hash_seed: int = 0
    hash_frequencies: str = ""
    expert_parallel: str = "ring"
    ep_buffer_factor: float = 0.0
    disable_top_experts: int = 0
    disable_shared: bool = False
    expert_choice_capacity_factor: float = 1.0
    expert_choice_scope: str = "sequence"
    topk_groups: int = 0
    num_expert_groups: int = 0
    group_score: str = "max"
    comm_balance_alpha: float = 0.0
    selection_bias: bool = False
    bias_update_speed: float = 0.0

    def __post_init__(self):
        _check_choice("MoEConfig.router", self.router, ROUTERS)
        _check_choice("MoEConfig.dispatch", self.dispatch, DISPATCHES)
        _check_choice("MoEConfig.router_score", self.router_score, ROUTER_SCORES)
        self._check_expert_choice()
        self._check_score()
        self._check_selection_bias()
        _check_choice("MoEConfig.second_expert_policy", self.second_expert_policy, SECOND_EXPERT_POLICIES)
        _check_choice("MoEConfig.balance_loss_scope", self.balance_loss_scope, BALANCE_SCOPES)
        _check_choice("MoEConfig.hash_table", self.hash_table, HASH_TABLES)
        _check_choice("MoEConfig.expert_parallel", self.expert_parallel, EXPERT_PARALLEL_SCHEMES)
        if not self.capacity_factor > 0:
            raise ValueError(
                f"MoEConfig.capacity_factor={self.capacity_factor} must be > 0 (capacity = "
                f"ceil(capacity_factor * tokens * top_k / num_experts) slots per expert; 1.0-2.0 is usual)"
            )
        if self.ep_buffer_factor < 0:
            raise ValueError(f"MoEConfig.ep_buffer_factor={self.ep_buffer_factor} must be >= 0 (0 = dropless)")
        if self.num_experts < 0 or self.num_shared_experts < 0:
            raise ValueError("MoEConfig: num_experts and num_shared_experts must be >= 0")
        if self.num_experts == 0 and self.num_shared_experts == 0:
            raise ValueError("MoEConfig: a layer needs routed or shared experts (both are 0)")
        if self.num_experts > 0 and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.router == "hash" and self.num_experts > 0 and self.top_k != 1:
            raise ValueError(f"MoEConfig: hash routing is top-1; got top_k={self.top_k}")
        if self.hash_table == "balanced" and self.router == "hash" and not self.hash_frequencies:
            raise ValueError(
                "MoEConfig.hash_table='balanced' needs MoEConfig.hash_frequencies (a .npy of token counts)"
            )
        if self.disable_top_experts:
            if self.disable_top_experts < 0 or self.router != "softmax" or not self.num_experts:
                raise ValueError(
                    f"MoEConfig.disable_top_experts={self.disable_top_experts} must be >= 0 and "
                    f"needs softmax routing over routed experts (router={self.router!r}, "
                    f"num_experts={self.num_experts})"
                )
            if self.disable_top_experts + self.top_k > self.num_experts:
                raise ValueError(
                    f"MoEConfig.disable_top_experts={self.disable_top_experts} + top_k={self.top_k} "
                    f"must be <= num_experts={self.num_experts}"
                )
        if self.num_device_groups and self.num_experts % self.num_device_groups:
            raise ValueError(
                f"MoEConfig.num_device_groups={self.num_device_groups} must divide num_experts={self.num_experts}"
            )
        self._check_groups()

    def _check_groups(self) -> None:
        """Group-limited routing (DeepSeek-V2/V3) and V2's communication balance loss."""
        _check_choice("MoEConfig.group_score", self.group_score, GROUP_SCORES)
        m, g, e = self.topk_groups, self.num_expert_groups, self.num_experts
        if m < 0 or g < 0 or self.comm_balance_alpha < 0:
            raise ValueError(
                f"MoEConfig.topk_groups={m}, num_expert_groups={g} and comm_balance_alpha={self.comm_balance_alpha} "
                f"must be >= 0 (0 disables group-limited routing / uses the mesh's expert axis / disables the loss)"
            )
        if not m:
            if g or self.comm_balance_alpha:
                raise ValueError(
                    f"MoEConfig.num_expert_groups={g} / comm_balance_alpha={self.comm_balance_alpha} belong to "
                    f"group-limited routing: set topk_groups (M, e.g. 3 as DeepSeek-V2) or unbind them"
                )
            return
        fix = "set topk_groups=0 or"
        if self.router != "softmax" or not e:
            raise ValueError(
                f"MoEConfig.topk_groups={m} limits a learned router over routed experts (router={self.router!r}, "
                f"num_experts={e}): {fix} router='softmax' with num_experts > 0"
            )
        if self.second_expert_policy != "greedy" or self.disable_top_experts:
            raise ValueError(
                f"MoEConfig.topk_groups={m} selects greedily: {fix} second_expert_policy='greedy' and "
                f"disable_top_experts=0"
            )
        if g and (e % g or m > g):
            raise ValueError(
                f"MoEConfig.num_expert_groups={g} must divide num_experts={e} and be >= topk_groups={m} "
                f"(or 0: the mesh's expert-axis size)"
            )
        if g and self.top_k > m * (e // g):
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} exceeds the {m * (e // g)} experts of topk_groups={m} groups of "
                f"{e // g}: raise topk_groups or lower top_k"
            )
        if g and self.group_score == "top2_sum" and e // g < 2:
            raise ValueError(
                f"MoEConfig.group_score='top2_sum' needs >= 2 experts per group ({e} in {g} groups): "
                f"use group_score='max' or fewer num_expert_groups"
            )

    def _check_score(self) -> None:
        """The sigmoid score and the routed scaling factor (DeepSeek-V3) against the other options."""
        if not 0 < self.routed_scaling_factor < float("inf"):
            raise ValueError(
                f"MoEConfig.routed_scaling_factor={self.routed_scaling_factor} must be a finite number > 0 "
                f"(1.0 leaves the routed output as it is; DeepSeek-V3 uses 2.5)"
            )
        if self.router_score != "sigmoid" or not self.num_experts:
            return
        fix = "set router_score='softmax' or"
        if self.router != "softmax":
            raise ValueError(f"MoEConfig.router_score='sigmoid' scores a learned router: {fix} router='softmax'")
        if self.second_expert_policy != "greedy":
            raise ValueError(
                f"MoEConfig.second_expert_policy={self.second_expert_policy!r} is GShard's softmax policy: "
                f"{fix} second_expert_policy='greedy'"
            )
        if self.disable_top_experts:
            raise ValueError(
                f"MoEConfig.disable_top_experts (paper §4.5) is for softmax gates: {fix} disable_top_experts=0"
            )
        if self.renormalize_topk and self.top_k == 1:
            raise ValueError(
                "MoEConfig: sigmoid gates renormalised over top_k=1 expert are always 1 and give the router no "
                "gradient: set top_k >= 2 or renormalize_topk=False"
            )

    def _check_expert_choice(self) -> None:
        """Expert-choice routing (arXiv:2202.09368) against the token-choice options it cannot take."""
        _check_choice("MoEConfig.expert_choice_scope", self.expert_choice_scope, EXPERT_CHOICE_SCOPES)
        if not 0 < self.expert_choice_capacity_factor < float("inf"):
            raise ValueError(
                f"MoEConfig.expert_choice_capacity_factor={self.expert_choice_capacity_factor} must be a finite "
                f"number > 0 (1.0: on average top_k experts per token)"
            )
        if self.router != "expert_choice":
            return
        fix = "or set router='softmax' for token-choice top-k"
        if not self.num_experts:
            raise ValueError(
                f"MoEConfig.router='expert_choice' routes to routed experts, but num_experts=0 (shared experts "
                f"only): set num_experts > 0, {fix}"
            )
        refused = {
            "router_score": (self.router_score != "softmax", "router_score='softmax' (the paper's S = softmax(X W_g))"),
            "renormalize_topk": (
                self.renormalize_topk,
                "renormalize_topk=False (a token may get 0..E experts: one chosen expert renormalised is a gate "
                "of 1 and no router gradient)",
            ),
            "second_expert_policy": (
                self.second_expert_policy != "greedy",
                "second_expert_policy='greedy' (GShard's policy drops a token's second choice; experts choose here)",
            ),
            "router_z_loss_alpha": (
                self.router_z_loss_alpha != 0,
                "router_z_loss_alpha=0 (the MoE layer applies no auxiliary loss to expert-choice routers)",
            ),
        }
        for name, (bad, setting) in refused.items():
            if bad:
                raise ValueError(
                    f"MoEConfig.{name}={getattr(self, name)!r} does not apply to router='expert_choice': set "
                    f"{setting}, {fix}"
                )

    @property
    def routed_per_token(self) -> float:
        """Routed experts a token activates: top_k, or for expert choice the nominal average
        min(expert_choice_capacity_factor * top_k, num_experts) (before C is rounded up to whole tokens)."""
        if self.router != "expert_choice":
            return float(self.top_k)
        return min(self.expert_choice_capacity_factor * self.top_k, float(self.num_experts))

    def _check_selection_bias(self) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing (selection bias and its update speed) against the rest."""
        if not 0 <= self.bias_update_speed < float("inf"):
            raise ValueError(
                f"MoEConfig.bias_update_speed={self.bias_update_speed} must be a finite number >= 0 "
                f"(0 freezes the selection bias; DeepSeek-V3 uses 0.001)"
            )
        if not self.selection_bias:
            if self.bias_update_speed:
                raise ValueError(
                    f"MoEConfig.bias_update_speed={self.bias_update_speed} moves the selection bias, which this "
                    f"model does not have: set MoEConfig.selection_bias=True (DeepSeek-V3's auxiliary-loss-free "
                    f"balancing) or bias_update_speed=0"
                )
            return
        fix = "or selection_bias=False"
        if self.router != "softmax" or not self.num_experts:
            raise ValueError(
                f"MoEConfig.selection_bias biases a learned router's top-k choice of routed experts (router="
                f"{self.router!r}, num_experts={self.num_experts}): set router='softmax' with routed experts {fix}"
            )
        if self.second_expert_policy != "greedy":
            raise ValueError(
                f"MoEConfig.selection_bias selects the biased top-k; second_expert_policy="
                f"{self.second_expert_policy!r} (GShard) drops choices by their gates: set "
                f"second_expert_policy='greedy' {fix}"
            )
        if self.disable_top_experts:
            raise ValueError(
                f"MoEConfig.disable_top_experts (paper §4.5) masks the top experts of the un-biased scores: "
                f"set disable_top_experts=0 {fix}"
            )

    @classmethod
    def fine_grained(
        cls, num_experts: int, top_k: int, granularity: int, num_shared: int, ffn_dim: int, **kwargs
    ) -> "MoEConfig":
        """The paper's parametrisation (§3.1-§3.2, Eq 3-5): N experts of width F with top-K, each split
        into m experts of width F/m, K_s of the mN isolated as shared (see `fine_grained_sizes`). GShard
        is (16, 2, 1, 0, F); DeepSeekMoE 2B is (16, 2, 4, 1, F): 63 routed of width F/4, top-7, 1 shared."""
        return cls(**fine_grained_sizes(num_experts, top_k, granularity, num_shared, ffn_dim), **kwargs)

    @property
    def activated_dim(self) -> int:
        """Intermediate width a token activates: (K_s + K') * f."""
        return (self.num_shared_experts + (self.top_k if self.num_experts else 0)) * self.expert_dim


def fine_grained_sizes(num_experts: int, top_k: int, granularity: int, num_shared: int, ffn_dim: int) -> dict:
    """MoEConfig sizes of fine-grained segmentation and shared-expert isolation (paper §3.1-§3.2, Eq 3-5).

    A layer of N experts of width F with top-K is split into m*N experts of width F/m, top-m*K
    (fine-grained segmentation, Eq 3-5); K_s of them are always-on shared experts (isolation, Eq 9):
        num_experts = m*N - K_s    top_k = m*K - K_s    num_shared_experts = K_s    expert_dim = F/m
    Dense x4 is (4, 4, 1, 4, F): every expert shared, none routed.
    """
    n, k, m, k_s, f = num_experts, top_k, granularity, num_shared, ffn_dim
    if m < 1 or n < 1 or not 1 <= k <= n or f < 1:
        raise ValueError(
            f"fine-grained segmentation needs N >= 1, 1 <= K <= N, m >= 1, F >= 1; got N={n}, K={k}, m={m}, F={f}"
        )
    if f % m:
        divisors = [d for d in range(1, min(f, 64) + 1) if f % d == 0]
        raise ValueError(f"F={f} is not divisible by granularity m={m}; divisors of F up to 64: {divisors}")
    if not 0 <= k_s <= m * k:
        raise ValueError(
            f"K_s={k_s} shared experts must be in [0, m*K={m * k}]: they are taken from the m*K activated ones"
        )
    return {"num_experts": m * n - k_s, "top_k": m * k - k_s, "num_shared_experts": k_s, "expert_dim": f // m}


@gin.configurable
def fine_grained_size(
    quantity: str,
    num_experts: Optional[int] = None,
    top_k: Optional[int] = None,
    granularity: int = 1,
    num_shared: int = 0,
    ffn_dim: Optional[int] = None,
) -> int:
    """One MoEConfig size (`quantity`: a key of `fine_grained_sizes`) from (N, K, m, K_s, F), for gin.

    Gin cannot do arithmetic; gin/architectures/moe.gin binds the macros NUM_EXPERTS, TOP_K and
    EXPERT_DIM to `@<quantity>/fine_grained_size()`, so a model file states (N, K, m, K_s, F) and a
    sweep over m is one binding (--gin.GRANULARITY=2).
    """
    if num_experts is None or top_k is None or ffn_dim is None:
        raise ValueError(
            "a MoE model needs (N, K, m, K_s, F): bind BASE_EXPERTS (N) and BASE_TOP_K (K) (GRANULARITY m, "
            "NUM_SHARED K_s and BASE_EXPERT_DIM F have defaults), or NUM_EXPERTS, TOP_K and EXPERT_DIM directly"
        )
    sizes = fine_grained_sizes(num_experts, top_k, granularity, num_shared, ffn_dim)
    if quantity not in sizes:
        raise ValueError(f"fine_grained_size.quantity={quantity!r} is not one of {tuple(sizes)}")
    return sizes[quantity]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Transformer as DeepSeek's models are built (pre-norm RMSNorm, RoPE, MHA, SwiGLU).

    Attributes:
      vocab_size: vocabulary size (8K at 2B, 102400 at 16B/145B).
      d_model: hidden size d.
      num_layers: number of Transformer blocks.
      num_heads: attention heads (multi-head attention; no GQA in the paper).
      head_dim: per-head width.
      ffn_dim: intermediate width of the dense SwiGLU FFN (dense models and the first `first_k_dense`
        layers of MoE models).
      moe: the MoE FFN; None for a dense model.
      first_k_dense: the first this many layers use the dense FFN (16B/145B: 1; 2B: 0).
      moe_layer_freq: layer l >= first_k_dense is MoE iff l % moe_layer_freq == 0 (DeepSeek's rule).
      init_std: std of the normal initialisation of every weight matrix (paper: 0.006).
      rope_theta: RoPE base.
      norm_eps: RMSNorm epsilon.
      dtype: compute dtype ("float32" or "bfloat16"); parameters stay in `param_dtype`.
      param_dtype: parameter dtype.
      scan_layers: run identical consecutive layers with jax.lax.scan (one compiled body).
      remat: rematerialisation of each block in the backward pass: "none", "full", or "dots"
        (save matmul outputs only).
      attention_impl: implementation passed to jax.nn.dot_product_attention (None picks one).
    """

    vocab_size: int = 8192
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 64
    ffn_dim: int = 688
    moe: Optional[MoEConfig] = None
    first_k_dense: int = 0
    moe_layer_freq: int = 1
    init_std: float = 0.006
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: Optional[str] = None

    def __post_init__(self):
        _check_choice("ModelConfig.dtype", self.dtype, DTYPES)
        _check_choice("ModelConfig.param_dtype", self.param_dtype, DTYPES)
        _check_choice("ModelConfig.remat", self.remat, REMAT_POLICIES)
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "moe_layer_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be >= 1")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek's placement rule: MoE iff a MoE is configured, l >= first_k_dense, l % freq == 0."""
        return self.moe is not None and layer >= self.first_k_dense and layer % self.moe_layer_freq == 0

    def layer_segments(self) -> list[tuple[bool, int, int]]:
        """Runs of consecutive layers of the same kind: [(is_moe, first_layer, count), ...]."""
        segments: list[tuple[bool, int, int]] = []
        for layer in range(self.num_layers):
            kind = self.is_moe_layer(layer)
            if segments and segments[-1][0] == kind:
                segments[-1] = (kind, segments[-1][1], segments[-1][2] + 1)
            else:
                segments.append((kind, layer, 1))
        return segments

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(layer) for layer in range(self.num_layers))

    def replace(self, **kwargs) -> "ModelConfig":
        return dataclasses.replace(self, **kwargs)

    def replace_moe(self, **kwargs) -> "ModelConfig":
        if self.moe is None:
            raise ValueError("replace_moe on a dense model (ModelConfig.moe is None)")
        return dataclasses.replace(self, moe=dataclasses.replace(self.moe, **kwargs))
