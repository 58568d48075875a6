"""`make bench`: HseShop's throughput, latency, relay speed and memory, each beside a baseline."""
