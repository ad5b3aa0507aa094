"""Stage 1 (rules/world.smk): the shapes world, its scenes, drawing, relations, questions and datasets."""
