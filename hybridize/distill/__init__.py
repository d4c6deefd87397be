"""Staged distillation of a converted hybrid from its teacher: recipes, losses, data, stages and the accelerate trainer.

Run a recipe with `hybridize distill RECIPE` (one process) or
`accelerate launch --config_file recipes/accelerate/<name>.yaml -m hybridize.distill RECIPE`.
"""
