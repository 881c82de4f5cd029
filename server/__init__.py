"""The HTTP server: ``server.app.create_app`` builds the application, ``ditcache serve`` runs it."""
