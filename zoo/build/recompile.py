"""A new circuit for a pinned build's weights: the same network compiled with other settings.

A variant whose registry ``params`` name ``compile_from: VARIANT@REV`` trains nothing. Its build

1. pulls that build (verified like any pull) and takes its head, its ``weights.safetensors`` and
   its resolved config, in which the variant's params replace the compile settings
   (:data:`COMPILE_KEYS`: ``p_error``, ``rounding_threshold_bits``, concrete's
   ``multi_parameter_strategy``, the ``max_bit_width`` bound);
2. loads the images that build was made from (their fingerprints must match its manifest's);
3. evaluates the Brevitas module in the clear (the parent's accuracy, recomputed), compiles it,
   calibrated on the same training images, and simulates it on the test images, as every
   recipe's :func:`~zoo.build.training.finish` does.

The build keeps the parent's profile name (it names how the weights were trained) and its
training history (the manifest's ``device`` comes from it); its weights and head are the
parent's tensors. Same parent, params and runtime ⇒ the same bytes, like any build.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from zoo.errors import BuildError

if TYPE_CHECKING:
    from zoo.build.run import BuildContext, RecipeResult

#: What a ``compile_from`` variant may set: the compile settings, nothing that changes the
#: network.
COMPILE_KEYS = frozenset(
    {"p_error", "rounding_threshold_bits", "multi_parameter_strategy", "max_bit_width"}
)
#: The parent's metrics that describe its weights, not its circuit: the build keeps them.
WEIGHT_METRICS = ("n_parameters", "float_top1")


def recompile(ctx: BuildContext, dataset: str) -> RecipeResult:
    """Build ``ctx.variant`` from the weights of the build its ``compile_from`` param names."""
    from zoo.build.data import load_split
    from zoo.build.training import Stages, data_record, finish, subset
    from zoo.fhe import head as zoo_head
    from zoo.fhe.runtime import load

    params = dict(ctx.params)
    parent_ref = params.pop("compile_from")
    other = sorted(set(params) - COMPILE_KEYS)
    if other:
        raise BuildError(
            f"{ctx.variant} compiles the weights of {parent_ref}, so it may not set {other}",
            hint=f"set only {', '.join(sorted(COMPILE_KEYS))}; a new network is a new variant",
        )
    if ctx.init is not None:
        raise BuildError(f"{ctx.variant} takes its weights from {parent_ref}, not from --init",
                         hint="leave out --init")  # fmt: skip
    parent = load(parent_ref, role="all", circuits=False, registry_path=ctx.registry_path)
    if parent.build.profile != ctx.profile:
        raise BuildError(
            f"{ctx.variant} takes the weights of {parent.build.short_ref}, trained with the "
            f"profile {parent.build.profile!r}, not {ctx.profile!r}",
            hint=f"build it with --profile {parent.build.profile}",
        )
    cfg = copy.deepcopy(parent.meta["recipe"]["config"])
    cfg["arch"].update(params)
    prof = cfg["profile"]
    stages = Stages()

    # 1-2. The parent's images, checked by their fingerprints.
    with stages("data"):
        train_x, train_y = subset(*load_split(ctx.data_dir, dataset, "train"), prof["n_train"])
        test = subset(*load_split(ctx.data_dir, dataset, "test"), prof["n_test"])
        # the parent's record may say more (VGG11's ``partial``): the fingerprints decide
        data = {**parent.meta["data"], **data_record(parent.meta["data"]["dataset"],
                                                     (train_x, train_y), test)}  # fmt: skip
    if data != parent.meta["data"]:
        raise BuildError(
            f"the images in {ctx.data_dir} are not those {parent.build.short_ref} was built "
            f"from ({parent.meta['data']['dataset']})",
            hint="pass the --data-dir that holds them (see ../shared/data/README.md)",
        )
    ctx.log.info("compiling the weights of %s with %s", parent.build.short_ref, params)

    # 3. Clear evaluation, compile, simulation.
    with stages("evaluate_clear"):
        clear = parent.logits(test[0], "disable")
    ctx.trained()  # --train-only stops before compiling, as for any build
    kept = {k: v for k, v in parent.meta["metrics"].items() if k in WEIGHT_METRICS}
    # a zoo safetensors file: its metadata names the variant whose training made the weights
    weights, weights_meta = zoo_head.load(parent.path / "weights.safetensors")
    result = finish(
        ctx, stages, cfg,
        circuit=parent.torch_module(),
        calibration=parent.head(train_x[: prof["n_calib"]]),
        onnx_name="encrypted.onnx",
        export_head=lambda: (parent.head_tensors, parent.head_config),
        clear=clear,
        test=test,
        weights=weights,
        data=data,
        metrics={**kept, **parent.meta["details"]},  # the training history among them
    )  # fmt: skip
    result.weights_of = weights_meta["variant"]
    return result
