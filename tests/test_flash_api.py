"""The flash engine through the public api and the method registry."""

from __future__ import annotations

import numpy as np

from spatial_deconv_gui.engines import registry


def test_run_deconvolution_with_flash(small_pair):
    from spatial_deconv_gui import api

    assert "flash" in registry.available_methods()
    spatial, reference = small_pair
    out = api.run_deconvolution(spatial, reference, method="flash", params={"lambda_spatial": "auto"}, device="cpu")
    props = out.adata.obsm["flash_proportions"].to_numpy()
    assert props.shape == (spatial.n_obs, reference.obs["cell_type"].nunique())
    np.testing.assert_allclose(props.sum(axis=1), 1.0, atol=1e-12)
    uns = out.adata.uns["flash"]
    assert uns["method"] == "flash" and uns["parameters"]["lambda_used"] > 0
    assert "flash_abundances" in out.adata.obsm and "flash_fit" in out.adata.uns
    truth = spatial.obsm["true_proportions"][list(out.result.cell_types)].to_numpy()
    r = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(props, truth)])
    assert r > 0.9
