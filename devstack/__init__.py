"""Local stack for HseShop: PostgreSQL, Redis, the broker, the three APIs (gateway, orders,
payments), the two gRPC servers and the Celery processes."""
