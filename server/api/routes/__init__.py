"""Thin routers: parse, call a service, shape the answer."""

from server.api.routes import admin, generations, health, images, jobs, models

# Open to all: probes and scrapers.
OPEN_ROUTERS = (health.router,)
# Behind the admin key, not the API key.
ADMIN_ROUTERS = (admin.router,)
# Behind the API key when the server has one.
V1_ROUTERS = (models.router, images.router, generations.router, jobs.router)
