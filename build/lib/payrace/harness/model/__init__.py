"""The run model: what to fire, who fires it, what is recorded, what is observed, who judges."""
