"""The browser play page: static files under ``static/`` and the routes in ``routes.py``."""
