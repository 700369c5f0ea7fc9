"""The napari plugin: thin widgets and layer builders over :mod:`spatial_deconv_gui.api`."""
