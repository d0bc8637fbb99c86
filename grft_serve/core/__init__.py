"""The shared core that training and serving both import: spec, row op, package format, backbones, files."""
