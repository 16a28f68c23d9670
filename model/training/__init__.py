"""Offline training and evaluation of ResMem-Net (datasets, feature cache, recipe, metrics)."""
