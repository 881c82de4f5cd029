"""The HTTP server: ``server.api.app.create_app`` builds the application, ``ditcache serve`` runs it."""
