"""Spatial GRN perturbation engine (the method of SpaceTravLR, reimplemented): train per-cluster sparse group
lasso models of each gene on its TFs and received ligands, simulate knockouts / overexpression, propagate them
through the tissue and draw the resulting vector field."""
