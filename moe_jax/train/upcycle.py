"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055): a MoE train workdir from a trained dense one.

    moe-jax upcycle --from=workdirs/dense_tiny --model=deepseekmoe_tiny --gin_file=runs/proxy_cpu.gin \\
        --workdir=workdirs/ds_upcycled [--init=copy|exact] [--gin.KEY=VALUE ...]
    moe-jax train --workdir=workdirs/ds_upcycled          # continues from the upcycled step 0

Attention, norms, embeddings and the LM head are copied; every routed and shared expert starts from the
dense FFN; the router (and anything else the dense model lacks) is freshly initialised with the MoE run's
seed; the optimizer state is fresh. The workdir gets `config.gin` (the MoE run's configuration, as `train`
writes it), a step-0 checkpoint with no data position (training reads the data from its beginning) and
`upcycled_from.json`.

Expert numbering follows the fine-grained segmentation of arXiv:2401.06066 §3.1-§3.2: the dense FFN of
width F (wi [d, 2, F], wo [F, d]) is upcycled into N copies, each split into m = F / f slices along its
hidden dimension (slice j: wi[..., j*f:(j+1)*f] and wo[j*f:(j+1)*f]); fine-grained expert p in [0, mN) is
slice p mod m, the first K_s of them are the shared experts and routed expert i is p = K_s + i. SwiGLU
is separable over hidden units, so the m slices of one copy sum to the dense FFN exactly.

Inits (`init`):
  "copy" (default; the paper's plain copy, with a fresh router): every expert is its slice. The MoE's
    output  sum_{s<K_s} FFN_s(u) + sum_{i in top-k} g_i FFN_{K_s+i}(u)  equals the dense FFN(u) only when
    m = 1, K_s = 0, the gates sum to 1 (`MoEConfig.renormalize_topk = True`, greedy second choices) and no
    token is dropped (a dropless dispatch): GShard-style copies with renormalised gates. With the raw
    softmax gates of arXiv:2401.06066 Eq 10 the routed part is scaled by sum of the top-k gates (< 1), so
    the initial output differs from the dense one.
  "exact": the K_s shared experts are the whole dense FFN (requires K_s * f = F, i.e. K_s = m) and the
    routed experts start from their slices in wi with wo = 0, so their output is exactly 0 for any router,
    gates and dispatch: the upcycled model computes the dense model's function (up to float rounding of
    the reordered sums). The routed experts' wo are trained from step 0 (their wi receive gradients once
    wo is non-zero, after the first step).

Equality is of the logits (hence the cross-entropy and held-out loss); the MoE's training loss adds its
auxiliary balance losses on top. tests/train/test_upcycle.py measures, on float32 CPU: "exact" logits
identical to the dense model's, the renormalised plain copy within 3e-7 (asserted: rtol = atol = 1e-5).

Layers the MoE model keeps dense (`first_k_dense`, `moe_layer_freq`) copy the dense FFN unchanged.
Host memory holds one copy of the dense and of the MoE parameters (single-process only).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.config import TrainConfig
from moe_jax.train.restore import TrainedModel, load_trained
from moe_jax.train.state import ShardedTrainState, build_train_state
from moe_jax.train.workdir import committed_steps, write_config

UPCYCLE_INITS = ("copy", "exact")
TRUNK_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim")


class UpcycleError(ValueError):
    """A dense model and a MoE target that cannot be upcycled into each other, or a target workdir in use;
    the message names the fix."""


def granularity(dense_cfg: ModelConfig, moe_cfg: ModelConfig, init: str = "copy") -> int:
    """m = F / f after checking that `moe_cfg` can be upcycled from `dense_cfg` with `init` (UpcycleError)."""
    if init not in UPCYCLE_INITS:
        raise UpcycleError(f"init={init!r} is not one of {UPCYCLE_INITS}")
    if dense_cfg.moe is not None:
        raise UpcycleError("the --from workdir holds a MoE model: upcycling starts from a dense model (moe = None)")
    if moe_cfg.moe is None:
        raise UpcycleError("the target model is dense: give a MoE model (--model=NAME of a MoE gin model)")
    diff = [f"{n}: dense {getattr(dense_cfg, n)}, MoE {getattr(moe_cfg, n)}" for n in TRUNK_FIELDS]
    diff = [d for d, n in zip(diff, TRUNK_FIELDS) if getattr(dense_cfg, n) != getattr(moe_cfg, n)]
    if diff:
        raise UpcycleError(f"the MoE trunk differs from the dense model's ({'; '.join(diff)}): bind the MoE's to match")
    big_f, f, k_s = dense_cfg.ffn_dim, moe_cfg.moe.expert_dim, moe_cfg.moe.num_shared_experts
    if big_f % f:
        raise UpcycleError(
            f"the MoE expert width f={f} times the granularity m must equal the dense FFN width F={big_f}, and f "
            f"does not divide F: set BASE_EXPERT_DIM={big_f} (= FFN_DIM) and GRANULARITY to a divisor of {big_f}"
        )
    dense_layers = [l for l in range(moe_cfg.num_layers) if not moe_cfg.is_moe_layer(l)]
    if dense_layers and moe_cfg.ffn_dim != big_f:
        raise UpcycleError(
            f"the MoE model's dense layers {dense_layers} have ffn_dim={moe_cfg.ffn_dim}, the dense model "
            f"{big_f}: set FFN_DIM={big_f}"
        )
    m = big_f // f
    if init == "exact" and k_s * f != big_f:
        raise UpcycleError(
            f"init='exact' needs the shared experts to cover the dense FFN (K_s * f = F), got K_s={k_s}, "
            f"f={f}, F={big_f}: set NUM_SHARED={m} (= the granularity m), or use init='copy'"
        )
    return m


def _layers(pure: dict, cfg: ModelConfig) -> list[dict]:
    """Per-layer block parameters {attn, attn_norm, ffn, ffn_norm} (numpy) of a model's pure state dict."""
    out = []
    for i, (_, _, count) in enumerate(cfg.layer_segments()):
        blocks = pure["stacks"][i]["blocks"]
        out += [jax.tree.map(lambda a, j=j: np.asarray(a[j]), blocks) for j in range(count)]
    return out


def expert_slices(wi: np.ndarray, wo: np.ndarray, m: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Experts p = first..first+count-1 of the segmentation: slice p mod m of the dense wi [d, 2, F] and
    wo [F, d]. Returns wi [count, d, 2, F/m], wo [count, F/m, d]."""
    f = wi.shape[-1] // m
    js = [p % m for p in range(first, first + count)]
    return (
        np.stack([wi[..., j * f : (j + 1) * f] for j in js]),
        np.stack([wo[j * f : (j + 1) * f] for j in js]),
    )


def upcycled_ffn(dense_ffn: dict, fresh_ffn: dict, moe_cfg: ModelConfig, m: int, init: str) -> dict:
    """One MoE layer's FFN parameters from the dense FFN {wi, wo}; the router stays as `fresh_ffn` has it."""
    moe = moe_cfg.moe
    out = dict(fresh_ffn)
    wi, wo = dense_ffn["wi"], dense_ffn["wo"]
    if moe.num_shared_experts:
        swi, swo = expert_slices(wi, wo, m, 0, moe.num_shared_experts)  # fused: concatenated along f
        out["shared"] = {"wi": np.concatenate(list(swi), axis=-1), "wo": np.concatenate(list(swo), axis=0)}
    if moe.num_experts:
        rwi, rwo = expert_slices(wi, wo, m, moe.num_shared_experts, moe.num_experts)
        out["wi"], out["wo"] = rwi, (np.zeros_like(rwo) if init == "exact" else rwo)
    return out


def upcycled_params(dense: TrainedModel, built: ShardedTrainState, init: str = "copy") -> nnx.State:
    """The MoE parameters of `built` (fresh, seeded by its train_cfg) with the dense model's copied in."""
    moe_cfg = built.model_cfg
    m = granularity(dense.model_cfg, moe_cfg, init)
    src = nnx.to_pure_dict(dense.params)
    fresh = jax.jit(lambda: nnx.state(built.make_model(), nnx.Param), out_shardings=built.shardings.params)()
    dst = jax.tree.map(np.asarray, nnx.to_pure_dict(fresh))
    dense_layers, fresh_layers = _layers(src, dense.model_cfg), _layers(dst, moe_cfg)
    layers = []
    for l, (d, f) in enumerate(zip(dense_layers, fresh_layers)):
        ffn = upcycled_ffn(d["ffn"], f["ffn"], moe_cfg, m, init) if moe_cfg.is_moe_layer(l) else d["ffn"]
        layers.append({**d, "ffn": ffn})
    new = {k: np.asarray(src[k]) for k in ("embed", "lm_head")}
    new["final_norm"] = jax.tree.map(np.asarray, src["final_norm"])
    new["stacks"] = {
        i: {"blocks": jax.tree.map(lambda *a: np.stack(a), *layers[first : first + count])}
        for i, (_, first, count) in enumerate(moe_cfg.layer_segments())
    }
    _check_same_shapes(new, dst)
    new = jax.tree.map(lambda a, ref: jnp.asarray(a, ref.dtype), new, dst)
    nnx.replace_by_pure_dict(fresh, new)
    return fresh


def _check_same_shapes(new: dict, target: dict) -> None:
    got = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.shape, new))[0]
    want = dict(jax.tree_util.tree_flatten_with_path(jax.tree.map(np.shape, target))[0])
    if len(got) != len(want):
        raise UpcycleError(f"the upcycled parameters have {len(got)} arrays, the MoE model {len(want)}")
    bad = [f"{jax.tree_util.keystr(p)}: {s} vs {want.get(p)}" for p, s in got if want.get(p) != s]
    if bad:
        raise UpcycleError(f"upcycled shapes differ from the MoE model's: {bad[:5]}; check the trunk bindings")


@dataclasses.dataclass
class UpcycleResult:
    workdir: Path
    dense_step: int
    init: str
    granularity: int


def upcycle(
    dense_workdir: str | Path,
    workdir: str | Path,
    gin_files: Sequence[str],
    bindings: Sequence[str] = (),
    *,
    init: str = "copy",
    dense_step: int | None = None,
) -> UpcycleResult:
    """Write a `moe-jax train` workdir at step 0 holding the MoE of `gin_files` + `bindings` upcycled from
    the dense model of `dense_workdir` (its latest checkpoint, or `dense_step`). Everything is checked
    (target workdir free, shapes) before anything is written."""
    import gin
    from moe_jax.configs.gin_utils import parse_gin
    from moe_jax.parallel import MeshConfig, build_mesh

    workdir = Path(workdir)
    if committed_steps(workdir):
        raise UpcycleError(
            f"{workdir} already has checkpoints (steps {committed_steps(workdir)}); nothing was written: "
            f"upcycle into a new --workdir (or continue that run with `moe-jax train --workdir={workdir}`)"
        )
    dense = load_trained(dense_workdir, step=dense_step)
    parse_gin(gin_files, bindings, modules=("moe_jax.train.config", "moe_jax.parallel.mesh"))
    moe_cfg, train_cfg = ModelConfig(), TrainConfig()
    gin_text = gin.config_str()
    m = granularity(dense.model_cfg, moe_cfg, init)
    built = build_train_state(moe_cfg, train_cfg, build_mesh(MeshConfig()))
    state = built.from_params(upcycled_params(dense, built, init), 0)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(workdir, keep=train_cfg.keep_checkpoints, async_save=False)
    ckpt.save(0, state, {})  # no data position: `moe-jax train` reads the data from its beginning
    ckpt.close()
    write_config(workdir, gin_text)
    record = {
        "from": str(Path(dense_workdir).resolve()),
        "dense_step": dense.step,
        "init": init,
        "granularity": m,
        "gin_files": list(gin_files),
        "bindings": list(bindings),
    }
    (workdir / "upcycled_from.json").write_text(json.dumps(record, indent=2) + "\n")
    return UpcycleResult(workdir=workdir, dense_step=dense.step, init=init, granularity=m)


def main(argv: list[str] | None = None) -> int:
    """`moe-jax upcycle`: see the module docstring."""
    import argparse
    import sys

    from moe_jax.configs.gin_utils import GinConfigError, command_gin_args
    from moe_jax.train.checkpoint import CheckpointError

    gin_args = command_gin_args("moe-jax upcycle", argv)
    if gin_args is None:
        return 2
    p = argparse.ArgumentParser(
        prog="moe-jax upcycle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--from", dest="dense", required=True, help="workdir of the trained dense model")
    p.add_argument("--workdir", required=True, help="the new MoE workdir (must hold no checkpoint)")
    p.add_argument("--init", choices=UPCYCLE_INITS, default="copy", help="expert init (see above; default copy)")
    p.add_argument("--from_step", type=int, default=None, help="dense checkpoint step (default: latest)")
    args = p.parse_args(list(gin_args.rest))
    if not gin_args.gin_files:
        print(
            "moe-jax upcycle: give the MoE model (--model=NAME) and usually a run file (--gin_file=...)",
            file=sys.stderr,
        )
        return 2
    try:
        result = upcycle(
            args.dense, args.workdir, gin_args.gin_files, gin_args.bindings, init=args.init, dense_step=args.from_step
        )
    except (UpcycleError, CheckpointError, GinConfigError) as err:
        print(f"moe-jax upcycle: {err}", file=sys.stderr)
        return 1
    print(
        f"upcycled step {result.dense_step} of {args.dense} into {result.workdir} (init {result.init}, "
        f"m={result.granularity}); continue with `moe-jax train --workdir={result.workdir}`"
    )
    return 0
