"""Thin routers: parse, call a service, shape the answer."""

from . import generations, health, images, jobs, models

ROUTERS = (health.router, models.router, images.router, generations.router, jobs.router)
