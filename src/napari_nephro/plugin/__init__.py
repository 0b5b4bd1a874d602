"""The napari half: readers, writers, sample data, layer conversions, the demo and the dock widgets.

Everything here may import napari and Qt; the headless library beside it
(`io`, `annotations`, `inference`, `models`, `training`, `evaluation`,
`pipelines`, `prompts`) never imports this package.
"""
