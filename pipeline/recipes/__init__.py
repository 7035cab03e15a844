"""Bundled recipes (TOML files); ``pipeline.recipe.load_recipe`` reads them by name."""
