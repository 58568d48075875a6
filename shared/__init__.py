"""Code both services use: configuration, database transactions, money, errors, event contracts,
and the transactional outbox and inbox machinery."""
