"""The HTTP layer: the FastAPI app, its routes, dependencies and middleware, and the HTTP half of answers.

The only package that imports fastapi or starlette.
"""
