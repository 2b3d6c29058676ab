"""Real trained models that ship with deploy or install from the package registry."""
