"""HTTP backends that stand in for a developer's dev server in the benchmark."""
