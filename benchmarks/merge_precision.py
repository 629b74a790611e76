"""How much of a merge verification's difference is the merge, and how much the precision it is computed in (CPU).

    python benchmarks/merge_precision.py                          # 4 and 16 layers, each compute x merge dtype
    python benchmarks/merge_precision.py --layers 32 --compute bfloat16 --merge bfloat16 float32 --verify-in float32

A random-weight model of the Llama-3.1-8B family's width (hidden 1,024 here, 4,096 on the GPU suite; no download:
qlora_kit/bench/shapes.py builds it) is trained for 4 steps (`--steps`) on the GPU suite's mixed-length chat data
with the given 4-bit compute dtype, then merged into each merge dtype and verified the way `qlora-kit merge` does:
the adapter on the 4-bit base against the merged model, on held-out examples, both computed in float32 whatever the
run computed in (`--verify-in own` computes each in its own dtype instead, the adapter in the run's compute dtype
and the merged model in its stored one, as verification did before, to show why it no longer does; both by default).
One line per (layers, compute, merge, verification dtype) with the verification figures and whether they pass the
recipe's default thresholds, and beside them what of the adapter's update the merged weights carry (merged minus a
merge at weight 0, against the same in float32): its relative error, and the share of updated weights left at their
base value (a 16-bit merge rounds W + BA back onto W when the update is under half a rounding step).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_suite  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

REPO = Path(__file__).resolve().parents[1]
SHAPE = (
    "arch:llama-3.1-8b,num_hidden_layers={layers},hidden_size=1024,intermediate_size=3584,num_attention_heads=8,"
    "num_key_value_heads=2,vocab_size=4096"
)
FIGURES = (
    "max_abs_logit_diff",
    "mean_abs_logit_diff",
    "loss_adapter",
    "loss_merged",
    "loss_diff",
    "generation_agreement",
    "passed",
)


def trained_run(layers: int, compute: str, workdir: Path, steps: int = 4) -> Path:
    """A short QLoRA run of the random shape, computing in ``compute``."""
    from qlora_kit.train import train

    sizes = replace(gpu_suite.DRY, model=SHAPE.format(layers=layers), max_length=256, batch_size=2, rows=48)
    recipe_path = gpu_suite.write_data(sizes, str(REPO / "models" / "demo-base"), workdir)
    compute_dtype = f"quantization.bnb_4bit_compute_dtype={compute}"
    recipe = gpu_suite.short_run_recipe(recipe_path, workdir, steps, (compute_dtype,))
    run = workdir / "run"
    train(recipe, run, force=True)
    return run


@contextlib.contextmanager
def verification_dtype(where: str):
    """``float32``: verification as `qlora-kit merge` runs it. ``own``: float32 compute switched off, so the adapter
    computes in the run's compute dtype and the merged model in its stored dtype, as verification ran before."""
    from qlora_kit import model as model_stage

    upcast = model_stage.compute_in_float32
    if where == "own":
        model_stage.compute_in_float32 = lambda model: 0
    try:
        yield
    finally:
        model_stage.compute_in_float32 = upcast


def verified_merge(run: Path, merge_dtype: str, where: str) -> dict:
    """`qlora-kit merge`'s verification figures for one merge dtype, whether or not they pass."""
    with verification_dtype(where):
        report = gpu_suite.merge_report(run, [f"merge.dtype={merge_dtype}"])
    return {key: report["verification"][key] for key in FIGURES}


def merged_weights(run: Path, dtype: str, weight: float, scratch: Path) -> dict:
    """The run merged (unverified) at this adapter weight into ``dtype``, every tensor read back as float32."""
    from safetensors.torch import load_file

    from qlora_kit.merge import merge_run

    output = scratch / f"merged-{dtype}-{weight}"
    merge_run(run, output, ["merge.verify=false", f"merge.dtype={dtype}", f"merge.weight={weight}"], force=True)
    tensors = {}
    for shard in sorted(output.glob("*.safetensors")):
        tensors.update({name: t.float() for name, t in load_file(shard).items()})
    return tensors


def update(run: Path, dtype: str, scratch: Path) -> dict:
    """The adapter's update as the merged weights in ``dtype`` carry it: merged minus a merge at weight 0."""
    merged, base = merged_weights(run, dtype, 1.0, scratch), merged_weights(run, dtype, 0.0, scratch)
    return {name: tensor - base[name] for name, tensor in merged.items()}


def update_kept(exact: dict, stored: dict) -> dict:
    """What of the update (``exact``: float32) the stored weights carry, over the weights the adapter changes. A
    16-bit merge rounds W + BA to the grid W is stored on, so an update under half a rounding step disappears."""
    changed = [n for n, delta in exact.items() if delta.abs().max() > 0]
    error = sum(float((stored[n] - exact[n]).norm() ** 2) for n in changed) ** 0.5
    norm = sum(float(exact[n].norm() ** 2) for n in changed) ** 0.5
    updated = sum(int((exact[n] != 0).sum()) for n in changed)
    vanished = sum(int(((exact[n] != 0) & (stored[n] == 0)).sum()) for n in changed)
    return {"update_error": error / norm if norm else 0.0, "vanished": vanished / updated if updated else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--compute", nargs="+", default=["float32", "bfloat16"], help="4-bit compute dtypes")
    parser.add_argument("--merge", nargs="+", default=["float32", "bfloat16"], help="merged weights' dtypes")
    parser.add_argument("--steps", type=int, default=4, help="training steps before the merge (default 4)")
    parser.add_argument(
        "--verify-in", nargs="+", choices=["float32", "own"], default=["float32", "own"], help="verification's dtype"
    )
    args = parser.parse_args()
    print(
        "| layers | compute | merge | update error | updates lost | verified in | max abs logit diff | "
        "mean abs logit diff | loss merged - adapter | generations | passed |"
    )
    print("|---:|---|---|---:|---:|---|---:|---:|---:|---:|---|")
    for layers in args.layers:
        for compute in args.compute:
            with tempfile.TemporaryDirectory(prefix="merge-precision-") as scratch:
                run = trained_run(layers, compute, Path(scratch), args.steps)
                exact = update(run, "float32", Path(scratch))
                for merge_dtype in args.merge:
                    stored = exact if merge_dtype == "float32" else update(run, merge_dtype, Path(scratch))
                    kept = update_kept(exact, stored)
                    for where in args.verify_in:
                        if where == "own" and compute == merge_dtype == "float32":
                            continue  # the same as float32
                        v = verified_merge(run, merge_dtype, where)
                        verified_in = "float32" if where == "float32" else "own dtypes"
                        shift = v["loss_merged"] - v["loss_adapter"]
                        print(
                            f"| {layers} | {compute} | {merge_dtype} | {kept['update_error']:.1%} | "
                            f"{kept['vanished']:.1%} | {verified_in} | "
                            f"{v['max_abs_logit_diff']:.3g} | {v['mean_abs_logit_diff']:.3g} | {shift:+.3g} | "
                            f"{v['generation_agreement']:.0%} | {'yes' if v['passed'] else 'no'} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
