"""Local stack for HseShop: PostgreSQL, Redis, the broker, both APIs and the Celery processes."""
