"""The serving side (gateway, queue, workers); built on ``steering`` only."""
