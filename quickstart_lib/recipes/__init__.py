"""The teacher recipes (`base.Recipe`), by their --teacher name."""

from quickstart_lib.recipes.base import Recipe
from quickstart_lib.recipes.minilm import MiniLmRecipe
from quickstart_lib.recipes.smollm2 import SmolLm2Recipe

RECIPES: dict[str, type[Recipe]] = {"minilm": MiniLmRecipe, "smollm2": SmolLm2Recipe}
