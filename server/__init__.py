"""The HTTP server: see app.py for the application and DESIGN.md for how a request travels."""
