"""Metrics for saliency maps, vectorized over maps, numpy in and out.

- `localization_error`: weakly supervised localization, the GFI paper's α sweep;
- `pointing_game`: arg-max within τ pixels of the object, per-class and overall;
- `salient_object`: adaptive-threshold precision, recall, F_β (β² = 0.3), MAE;
- `deletion_insertion`: Petsiuk et al.'s causal curves and AUC, blurred or zero substrate;
- `road` (+ `linear_imputation`): Rong et al.'s ROAD, MoRF and LeRF with noisy linear imputation;
- `grid_pointing` (+ `select_grids`, `mosaic`): Böhle et al.'s 2×2 grid pointing game;
- `cascading_randomization` (+ `spearman`): Adebayo et al.'s model-randomization check.

Bad input (mismatched shapes, empty ground truth, boxes outside the image, NaN maps) raises
a ValueError that names the problem.
"""
from gfi_jax.metrics.causal import auc, deletion_insertion, make_substrate
from gfi_jax.metrics.grid import grid_pointing, mosaic, select_grids
from gfi_jax.metrics.localization import (ALPHAS, box_iou, localization_error, pointing_game,
                                          tight_boxes)
from gfi_jax.metrics.randomization import cascading_randomization, layer_groups, rankdata, spearman
from gfi_jax.metrics.road import linear_imputation, road
from gfi_jax.metrics.saliency import salient_object

__all__ = ["ALPHAS", "auc", "box_iou", "cascading_randomization", "deletion_insertion",
           "grid_pointing", "layer_groups", "linear_imputation", "localization_error",
           "make_substrate", "mosaic", "pointing_game", "rankdata", "road", "salient_object",
           "select_grids", "spearman",
           "tight_boxes"]
