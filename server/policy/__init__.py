"""A request's cache policy: parsed from the wire into one typed object, turned into an engine config in
one place; presets and calibrated targets resolved as named policies of a model; the calibration command."""
