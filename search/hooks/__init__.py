"""Features that plug into the trial stages: latency tables, evolution, adaptation."""
