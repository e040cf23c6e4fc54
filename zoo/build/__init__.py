"""Making a build: recipes' shared training steps, pinned CPU kernels, CIFAR loading, and the
deterministic packaging of the compiled circuit. Needs torch, brevitas and concrete-ml.

``from zoo.build import BuildContext, RecipeResult, build`` is what recipes and users need; torch
is imported by the recipe, after :func:`zoo.build.kernels.pin` has run.
"""

from zoo.build.run import PROFILES, BuildContext, RecipeResult, build, check

__all__ = ["PROFILES", "BuildContext", "RecipeResult", "build", "check"]
