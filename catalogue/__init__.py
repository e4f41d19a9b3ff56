"""The model catalogue: models.toml, validation, feasibility and placement."""
