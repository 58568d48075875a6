"""The chaos soak: the whole shop under order and deposit load while its processes are SIGKILLed
and SIGSTOPped and its broker paused, then exactly-once checked in its databases (`make chaos`;
tests/e2e/test_chaos_smoke.py runs it briefly)."""
