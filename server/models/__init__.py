"""The resident models: registry and loading, the built-in table, what each family's pipeline takes (call
specs, geometry), stage timings, one generation, the model's preset table and calibration, media encoding."""
