"""A tiny text-to-image model trained here: procedural coloured shapes, their captions, and a detector.

``shapes.dataset`` draws the images and captions, ``shapes.text`` builds the tokenizers and text
encoders in memory, ``shapes.train`` trains a ``FluxPipeline`` on them, and ``shapes.detector`` /
``shapes.evaluate`` score how well generated images follow their prompts.
"""
