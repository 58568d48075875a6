"""Code every app uses (orders, payments, the gateway): configuration, database transactions,
money, errors, event contracts, and the transactional outbox and inbox machinery."""
